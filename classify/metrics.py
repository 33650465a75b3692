"""The one metrics module: every stage (classify, finetune) scores predictions here.

Definitions follow Makris et al. 2020, section 3.3, computed one-vs-rest per class
from the confusion matrix, so that numbers are comparable with the paper's tables.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

from cxr_transfer.classify.stats import effective_test_size, proportion_interval
from cxr_transfer.core.errors import CxrError

HEADLINE_METRICS: tuple[str, ...] = ("accuracy", "covid_sensitivity", "covid_specificity", "macro_f1")
"""Names reports show first (for the default positive class "covid")."""


def _safe_ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, or 0.0 when the denominator is 0 (undefined metric)."""
    return float(numerator) / float(denominator) if denominator else 0.0


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Count (true, predicted) pairs into a K x K int64 matrix: rows = true, cols = predicted.

    Every label 0..K-1 gets a row and a column even when absent, so matrices from
    different folds can be summed.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise CxrError(f"y_true and y_pred must be 1-D and the same length, got shapes {y_true.shape} and {y_pred.shape}")
    if n_classes < 1:
        raise CxrError(f"n_classes must be at least 1, got {n_classes}")
    for name, values in (("y_true", y_true), ("y_pred", y_pred)):
        if values.size and (not np.issubdtype(values.dtype, np.integer) or values.min() < 0 or values.max() >= n_classes):
            raise CxrError(f"{name} must hold integer class indices in 0..{n_classes - 1}")
    flat = y_true.astype(np.int64) * n_classes + y_pred.astype(np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes).astype(np.int64)


def class_counts(cm: np.ndarray, index: int) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) of class ``index`` treated one-vs-rest in a confusion matrix (rows: true labels)."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = int(cm[index, index])
    fp = int(cm[:, index].sum()) - tp
    fn = int(cm[index, :].sum()) - tp
    return tp, fp, fn, int(cm.sum()) - tp - fp - fn


def metrics_from_confusion(cm: np.ndarray, class_names: Sequence[str]) -> dict:
    """Paper metrics from a confusion matrix (rows = true, cols = predicted).

    Per class c, one-vs-rest: TP = cm[c, c], FP = column sum - TP, FN = row sum - TP,
    TN = n - TP - FP - FN; precision = TP/(TP+FP), recall (= sensitivity) = TP/(TP+FN),
    F1 = 2PR/(P+R), specificity = TN/(TN+FP), support = TP+FN.
    Any metric whose denominator is 0 is reported as 0.0 (e.g. precision and F1 of a
    class that is never predicted), matching sklearn's ``zero_division=0``.
    Macro values are the unweighted mean over classes; accuracy = trace / n.

    Returns ``{"accuracy", "per_class": {name: {...}}, "macro": {...}, "confusion_matrix"}``.
    """
    cm = np.asarray(cm, dtype=np.int64)
    n_classes = len(class_names)
    if cm.shape != (n_classes, n_classes):
        raise CxrError(f"confusion matrix shape {cm.shape} does not match {n_classes} class names")
    total = int(cm.sum())
    per_class: dict[str, dict] = {}
    for index, name in enumerate(class_names):
        tp, fp, fn, tn = class_counts(cm, index)
        precision = _safe_ratio(tp, tp + fp)
        recall = _safe_ratio(tp, tp + fn)
        per_class[str(name)] = {
            "precision": precision,
            "recall": recall,
            "f1": _safe_ratio(2 * precision * recall, precision + recall),
            "specificity": _safe_ratio(tn, tn + fp),
            "support": tp + fn,
        }
    macro = {
        key: float(np.mean([values[key] for values in per_class.values()]))
        for key in ("precision", "recall", "f1", "specificity")
    }
    return {
        "accuracy": _safe_ratio(int(np.trace(cm)), total),
        "per_class": per_class,
        "macro": macro,
        "confusion_matrix": cm.tolist(),
    }


def macro_over_present(metrics: dict, key: str = "f1") -> float:
    """Mean of a per-class metric over the classes present in the true labels (support > 0) only.

    ``metrics`` is ``metrics_from_confusion`` output. Unlike its ``macro`` (the paper's mean over every class,
    an absent class counting as 0), a class without images says nothing here; nan when no class has images.
    For test sets that may lack a class (an external folder): its macro F1 is then that of its own classes.
    """
    present = [values[key] for values in metrics["per_class"].values() if values["support"] > 0]
    return float(np.mean(present)) if present else math.nan


def classification_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    class_names: Sequence[str],
    proba: np.ndarray | None = None,
) -> dict:
    """Paper metrics for integer labels, plus one-vs-rest ROC AUC when ``proba`` is given.

    ``roc_auc`` maps each class name (and "macro") to a float, or None when there are no
    probabilities or the class lacks positives or negatives in ``y_true`` (AUC undefined).
    Macro AUC is the mean over the classes where it is defined, None if there are none.
    """
    y_true = np.asarray(y_true)
    n_classes = len(class_names)
    result = metrics_from_confusion(confusion_matrix(y_true, y_pred, n_classes), class_names)
    roc_auc: dict[str, float | None] = {str(name): None for name in class_names}
    if proba is not None:
        proba = np.asarray(proba, dtype=float)
        if proba.shape != (len(y_true), n_classes):
            raise CxrError(f"proba must have shape ({len(y_true)}, {n_classes}), got {proba.shape}")
        for index, name in enumerate(class_names):
            is_positive = y_true == index
            if is_positive.any() and not is_positive.all():
                roc_auc[str(name)] = float(roc_auc_score(is_positive, proba[:, index]))
    defined = [value for value in roc_auc.values() if value is not None]
    roc_auc["macro"] = float(np.mean(defined)) if defined else None
    result["roc_auc"] = roc_auc
    return result


def summarize(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean, sample std (ddof=1) and Student-t confidence interval over repeats/folds.

    Interval = mean +/- t_{(1+confidence)/2, n-1} * std / sqrt(n); not clipped to [0, 1]. For a
    proportion (accuracy, sensitivity, specificity) use ``summarize_proportion``, whose interval stays in
    [0, 1]. With one value, std = 0 and the interval is (mean, mean).
    """
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or array.size == 0:
        raise CxrError("summarize needs a non-empty list of numbers")
    if not 0.0 < confidence < 1.0:
        raise CxrError(f"confidence must be between 0 and 1, got {confidence}")
    n = int(array.size)
    mean = float(array.mean())
    if n == 1:
        return {"mean": mean, "std": 0.0, "ci_low": mean, "ci_high": mean, "n": 1}
    std = float(array.std(ddof=1))
    half_width = float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci_low": mean - half_width, "ci_high": mean + half_width, "n": n}


def summarize_proportion(values: Sequence[float], n_test: float, n_train: float,
                         confidence: float = 0.95) -> dict:
    """Mean and std of a proportion over splits, with an interval inside [0, 1].

    ``n_test`` is the number of images each value is a proportion of (mean over splits: test images for
    accuracy, positives for sensitivity, negatives for specificity) and ``n_train`` the training images per
    split. The interval is the Wilson score interval at the mean with the Nadeau-Bengio effective sample size
    (``classify.stats.proportion_interval``): overlapping splits are not counted as independent evidence.
    """
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or array.size == 0:
        raise CxrError("summarize_proportion needs a non-empty list of numbers")
    if np.any((array < 0) | (array > 1)):
        raise ValueError(f"proportions must lie in [0, 1]; got {array.min()}..{array.max()} instead")
    n = int(array.size)
    mean = float(array.mean())
    low, high = proportion_interval(mean, n_test, n_train, n, confidence)
    return {"mean": mean, "std": float(array.std(ddof=1)) if n > 1 else 0.0, "ci_low": low, "ci_high": high,
            "n": n, "interval": "wilson", "n_effective": round(effective_test_size(n_test, n_train, n), 1)}


def headline(metrics: dict, positive_class: str = "covid") -> dict:
    """Flatten the numbers reports lead with; positive-class keys are None if the class is absent."""
    positive = metrics["per_class"].get(positive_class)
    macro = metrics["macro"]
    roc_auc = metrics.get("roc_auc") or {}
    return {
        "accuracy": metrics["accuracy"],
        f"{positive_class}_sensitivity": positive["recall"] if positive else None,
        f"{positive_class}_specificity": positive["specificity"] if positive else None,
        "macro_f1": macro["f1"],
        "macro_precision": macro["precision"],
        "macro_recall": macro["recall"],
        "macro_specificity": macro["specificity"],
        "roc_auc_macro": roc_auc.get("macro"),
    }
