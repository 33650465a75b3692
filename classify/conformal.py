"""Conformal prediction sets with MAPIE: a set of classes per image that holds the true class with
probability >= 1 - alpha (on data exchangeable with the training data).

Cross-conformal (MAPIE ``CrossConformalClassifier``, LAC score, scores aggregated by their mean): the head is
fitted on folds of the training data, and the out-of-fold conformity scores of the *training* images set the
threshold; folds are ``StratifiedGroupKFold`` by patient when patients are known, so an image is never scored
by a model that saw another image of the same patient. Nothing outside the training data is used.

The internal coverage is measured, not assumed: ``nested_sets`` repeats the whole procedure inside each fold
of an outer patient-grouped cross-validation and collects the sets of the held-out images.

MAPIE 1.x API (checked against mapie 1.6 source): ``CrossConformalClassifier(estimator, confidence_level,
conformity_score, cv, random_state).fit_conformalize(X, y, groups=...)``, then ``predict_set(X)`` returns
(labels, sets of shape (n, n_classes, n_levels)).
"""
from __future__ import annotations

import math
import numbers
from decimal import Decimal
from typing import Any, Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from cxr_transfer.classify.heads import make_head
from cxr_transfer.classify.protocols import Split
from cxr_transfer.core.errors import CxrError

CONFORMITY_SCORE = "lac"


def check_alpha(alpha: float) -> float:
    """``alpha`` (the miscoverage) as a float: TypeError unless it is a real number (NumPy's included, a bool
    not), CxrError (a ValueError) unless it lies strictly between 0 and 1 (nan does not)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a number, got {alpha!r} instead")
    if not 0.0 < float(alpha) < 1.0:
        raise CxrError(f"alpha (the miscoverage) must be between 0 and 1, got {float(alpha):g} instead", param="alpha")
    return float(alpha)


def _mapie_alpha(alpha: float) -> float:
    """The alpha MAPIE checks: 1 - confidence_level, computed its way (Decimal of the float's repr)."""
    return float(Decimal("1") - Decimal(str(1.0 - alpha)))


def _enough_scores(n: int, alpha: float) -> bool:
    """MAPIE's own condition on its conformity scores (mapie.utils._check_alpha_and_n_samples): as many
    scores as 1/alpha and 1/(1 - alpha); cross-conformal has one score per training image."""
    a = _mapie_alpha(alpha)
    return 0.0 < a < 1.0 and n >= max(1.0 / a, 1.0 / (1.0 - a))


def smallest_alpha(n: int) -> float:
    """The smallest alpha ``n`` training images give enough conformal scores for (about 1/n; the largest is 1
    minus it); nan below 2 images, where none does."""
    if n < 2:
        return math.nan
    alpha = 1.0 / n
    while not _enough_scores(n, alpha):
        alpha = float(np.nextafter(alpha, 1.0))
    return alpha


def _round(value: float, up: bool) -> float:
    """``value`` to 3 significant digits, rounded away from the invalid side."""
    scale = 10.0 ** (2 - math.floor(math.log10(value)))
    return (math.ceil if up else math.floor)(value * scale) / scale


def conformal_size_problem(n: int, alpha: float) -> str | None:
    """None when ``n`` training images give enough conformal scores for ``alpha``; else one sentence saying
    what is missing and the range of alpha that ``n`` images allow."""
    alpha = check_alpha(alpha)
    if _enough_scores(n, alpha):
        return None
    a = _mapie_alpha(alpha)
    need = math.ceil(max(1.0 / a, 1.0 / (1.0 - a)))
    why = "1/alpha" if a < 0.5 else "1/(1 - alpha)"
    text = f"alpha={alpha:g} needs at least {need} images for the conformal scores ({why}), got {n} images"
    low = smallest_alpha(n)
    if math.isnan(low):
        return text + "; no alpha works with fewer than 2 images"
    shown_low, shown_high = _round(low, up=True), _round(1.0 - low, up=False)
    while not _enough_scores(n, shown_low):
        shown_low = float(np.nextafter(shown_low, 1.0))
    while not _enough_scores(n, shown_high):
        shown_high = float(np.nextafter(shown_high, 0.0))
    if a < 0.5:
        return text + f"; the smallest alpha {n} images allow is {shown_low:.3g}"
    return text + f"; the largest alpha {n} images allow is {shown_high:.3g}"


def conformal_folds(folds: int, seed: int, grouped: bool):
    """The folds the conformal scores come from: patient-grouped when groups are given, stratified either way."""
    if grouped:
        return StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)


def fit_conformal(head: str, X: np.ndarray, y: np.ndarray, alpha: float, groups: np.ndarray | None = None,
                  folds: int = 5, seed: int = 0):
    """A fitted MAPIE cross-conformal classifier of ``head`` on (X, y), grouped by ``groups`` when given."""
    from mapie.classification import CrossConformalClassifier

    alpha = check_alpha(alpha)
    problem = conformal_size_problem(len(y), alpha)
    if problem:   # MAPIE would fit every fold first and refuse only at prediction
        raise CxrError(problem)
    model = CrossConformalClassifier(estimator=make_head(head, seed), confidence_level=1.0 - alpha,
                                     conformity_score=CONFORMITY_SCORE,
                                     cv=conformal_folds(folds, seed, groups is not None), random_state=seed)
    return model.fit_conformalize(X, y, groups=groups)


def prediction_sets(model: Any, X: np.ndarray) -> np.ndarray:
    """Boolean (n_images, n_classes): class k is in image i's set. Columns are the label indices 0..K-1."""
    _, sets = model.predict_set(X)
    return np.asarray(sets)[:, :, 0].astype(bool)


def nested_sets(head: str, X: np.ndarray, y: np.ndarray, n_classes: int, alpha: float, outer: Sequence[Split],
                groups: np.ndarray | None = None, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Sets for every image from a conformal model whose scores never saw it: for each outer split, fit
    ``fit_conformal`` on the training side and predict the test side. Rows not in any test side stay empty."""
    sets = np.zeros((len(y), n_classes), dtype=bool)
    for split in outer:
        inner_groups = groups[split.train_idx] if groups is not None else None
        model = fit_conformal(head, X[split.train_idx], y[split.train_idx], alpha, inner_groups, folds, seed)
        sets[split.test_idx] = prediction_sets(model, X[split.test_idx])
    return sets


def set_summary(sets: np.ndarray, y: np.ndarray) -> dict[str, float | int]:
    """Coverage (share of images whose set holds the true class), mean set size, share of empty sets, n."""
    sets = np.asarray(sets, dtype=bool)
    y = np.asarray(y)
    n = len(y)
    if n == 0:
        return {"n": 0, "covered": 0, "coverage": float("nan"), "mean_size": float("nan"), "empty": float("nan")}
    covered = int(sets[np.arange(n), y].sum())
    sizes = sets.sum(axis=1)
    return {"n": n, "covered": covered, "coverage": covered / n, "mean_size": float(sizes.mean()),
            "empty": float((sizes == 0).mean())}


def format_set(row: np.ndarray, class_names: Sequence[str]) -> str:
    """A set as text for CSVs: class names joined by '|' ('' for the empty set)."""
    return "|".join(name for name, inside in zip(class_names, row) if inside)


class ConformalHead:
    """A saved head that also gives conformal sets: the head fitted on all training images (``predict_proba``
    for the probability columns) and the cross-conformal model fitted on the same images (``predict_sets``)."""

    def __init__(self, head: Any, conformal: Any, alpha: float):
        self.head = head
        self.conformal = conformal
        self.alpha = check_alpha(alpha)

    @property
    def classes_(self) -> np.ndarray:
        return self.head.classes_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.head.predict_proba(X)

    def predict_sets(self, X: np.ndarray, alpha: float) -> np.ndarray:
        """Boolean (n, n_classes) sets; ``alpha`` must be the one the model's conformal threshold is for."""
        if not np.isclose(check_alpha(alpha), self.alpha):
            raise CxrError(f"this model's conformal threshold is for alpha {self.alpha:g}, got {alpha:g}; "
                           f"rerun validate with `save` and `alpha` {alpha:g} for another level")
        return prediction_sets(self.conformal, X)


def conformal_sets_for(model: Any, X: np.ndarray, alpha: float, model_path: Any) -> np.ndarray:
    """``predict --conformal``: the sets of a loaded model, or CxrError when it carries no conformal threshold."""
    if not isinstance(model, ConformalHead):
        raise CxrError(f"{model_path}: this head carries no conformal threshold; save one with "
                       f"validate with `save` and `alpha` {alpha:g} (its conformal scores come from its training "
                       f"images only)")
    return model.predict_sets(X, alpha)
