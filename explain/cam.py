"""The exact class activation map of a linear head on globally average-pooled features (Zhou et al. 2016).

A saved logreg or linsvm head scores class k as ``s_k(x) = w_k . (x - mean) / scale + b_k`` (its
StandardScaler, then its own weights and intercept), and its input x is the mean of the last convolutional
feature map over its P positions: ``x = (1/P) sum_p F_p``. With ``W_k = w_k / scale``,
``s_k - b_k = sum_p W_k . (F_p - mean) / P``: the map ``M_k[p] = W_k . (F_p - mean) / P`` splits the class
score minus the head's bias exactly into one contribution per position. Positive: at this position the image
looks more like class k than the average training image does, in the head's own (standardised) terms.

Class scores: logreg, its decision function (one logit per class; binary: +-the log-odds);
linsvm, the sum of the class's signed one-vs-one SVC decision values (linear in x; scikit-learn's one-vs-rest
decision function breaks vote ties with it). Tuned heads (GridSearchCV) are unwrapped to their best estimator.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LinearScores:
    """Per-class linear scores on raw pooled features: ``scores = (X - center) @ weights.T + bias``."""

    weights: np.ndarray     # (n_classes, n_features): the head's weights divided by the scaler's scale
    center: np.ndarray      # (n_features,): the scaler's mean (zeros without a scaler)
    bias: np.ndarray        # (n_classes,): the head's own intercepts
    kind: str               # what the score is, for reports

    def scores(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, np.float64) - self.center) @ self.weights.T + self.bias


def unwrap(model: Any) -> Any:
    """The fitted pipeline inside a head saved with its conformal sets (validate) or a tuned head
    (GridSearchCV), else the model itself."""
    model = getattr(model, "head", model)
    return getattr(model, "best_estimator_", model)


def _ovo_to_class_scores(coef: np.ndarray, intercept: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum the signed one-vs-one decision functions into one linear score per class (pair (i, j): + for i)."""
    weights = np.zeros((n_classes, coef.shape[1]))
    bias = np.zeros(n_classes)
    for row, (i, j) in enumerate(combinations(range(n_classes), 2)):
        weights[i] += coef[row]
        bias[i] += intercept[row]
        weights[j] -= coef[row]
        bias[j] -= intercept[row]
    return weights, bias


def _classifier_scores(clf: Any) -> tuple[np.ndarray, np.ndarray, str] | None:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    if isinstance(clf, LogisticRegression):
        coef, intercept, kind = np.asarray(clf.coef_, np.float64), np.asarray(clf.intercept_, np.float64), "logit"
    elif (isinstance(clf, CalibratedClassifierCV) and len(clf.calibrated_classifiers_) == 1
          and isinstance(clf.calibrated_classifiers_[0].estimator, SVC)
          and clf.calibrated_classifiers_[0].estimator.kernel == "linear"):
        svc = clf.calibrated_classifiers_[0].estimator
        coef, intercept = np.asarray(svc.coef_, np.float64), np.asarray(svc.intercept_, np.float64)
        kind = "sum of one-vs-one SVC decision values"
        if len(svc.classes_) > 2:
            return (*_ovo_to_class_scores(coef, intercept, len(svc.classes_)), kind)
    else:
        return None
    if coef.shape[0] == 1:   # binary: one score for classes_[1]; class 0 gets its negation
        return np.vstack([-coef, coef]), np.array([-intercept[0], intercept[0]]), kind
    return coef, intercept, kind


def linear_scores(model: Any) -> LinearScores | None:
    """The per-class linear scores of a fitted head on raw features, or None when the head is not linear.

    Linear: a Pipeline of an optional StandardScaler ("scale") and a LogisticRegression or a single linear
    SVC calibrated without ensembling (the registry's logreg and linsvm), as saved by compare --save.
    """
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    model = unwrap(model)
    if not isinstance(model, Pipeline):
        return None
    steps = [step for _, step in model.steps if step is not None and step != "passthrough"]
    scaler = steps[0] if len(steps) == 2 and isinstance(steps[0], StandardScaler) else None
    if len(steps) != (2 if scaler is not None else 1):
        return None
    found = _classifier_scores(steps[-1])
    if found is None:
        return None
    weights, bias, kind = found
    center = np.zeros(weights.shape[1])
    if scaler is not None:
        if scaler.with_std:
            weights = weights / np.asarray(scaler.scale_, np.float64)
        if scaler.with_mean:
            center = np.asarray(scaler.mean_, np.float64)
    return LinearScores(weights, center, bias, kind)


def class_activation_maps(feature_maps: np.ndarray, scores: LinearScores, classes: np.ndarray) -> np.ndarray:
    """(N, h, w) maps: position p's contribution ``W_k . (F_p - center) / P`` to class ``classes[i]``'s score.

    feature_maps: (N, h, w, C), the tensor the backbone's global average pooling averages.
    Each map sums to ``scores.scores(pooled)[i, k] - scores.bias[k]`` (pooled = the mean over positions).
    """
    feature_maps = np.asarray(feature_maps, np.float64)
    if feature_maps.ndim != 4 or feature_maps.shape[3] != scores.weights.shape[1]:
        raise ValueError(f"feature_maps must have shape (N, h, w, {scores.weights.shape[1]}), got "
                         f"{feature_maps.shape} instead")
    classes = np.asarray(classes, int)
    positions = feature_maps.shape[1] * feature_maps.shape[2]
    return np.einsum("nhwc,nc->nhw", feature_maps - scores.center, scores.weights[classes]) / positions
