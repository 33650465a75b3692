"""Intervals for one evaluation: patient-cluster bootstrap of every metric, and Wilson for small proportions.

A single test set (out-of-fold predictions, or an external folder) has no "splits" to average over, so the
uncertainty of its numbers comes from resampling the test images themselves. Images of one patient are not
independent, so whole patients (``clusters``) are drawn with replacement, as many as there are, and every
metric is recomputed on each replicate; the interval is the 2.5 / 97.5 percentile of the replicates. A
percentile interval of a proportion never leaves [0, 1]. Replicates where a metric is undefined (a class
absent, so no sensitivity) are left out of that metric's interval.

Wilson's score interval is used where the sample is a handful of images (subgroup tables): it stays inside
[0, 1] and is not degenerate for n = 1, where every bootstrap replicate would be the same image.

The rule for a whole evaluation (``evaluation_intervals``): with at least ``SMALL_SAMPLE`` resampling units
(patients, or images without patient ids) every metric gets the bootstrap interval; with fewer, the proportions
(accuracy, sensitivity, specificity) get Wilson intervals on their images and macro F1 and AUC get none (a
bootstrap of a handful of units is near-degenerate: of one image, zero width). A gap between two evaluations
takes the bootstrap interval of the replicate differences when both are bootstrapped, else the MOVER
(Newcombe) interval built from the two sides' intervals, and none where a side has none.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats

from cxr_transfer.classify.metrics import class_counts, confusion_matrix, macro_over_present, metrics_from_confusion

DEFAULT_N_BOOT = 1000
"""Bootstrap replicates per evaluation: the 2.5 % tail then holds 25 replicates."""

SMALL_SAMPLE = 30
"""Fewest resampling units (patients, or images) for bootstrap intervals; below it, Wilson (module docstring)."""


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``; (nan, nan) when n is 0."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence} instead")
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n} instead")
    if n == 0:
        return math.nan, math.nan
    z = float(stats.norm.ppf(0.5 + confidence / 2.0))
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denominator
    # the interval always holds p; rounding left 15 of 15 with an upper end of 0.9999999999999999
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def ovr_auc(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of one class against the rest (Mann-Whitney with mid-ranks for ties, as sklearn's
    ``roc_auc_score``); nan when ``is_positive`` lacks positives or negatives."""
    is_positive = np.asarray(is_positive, dtype=bool)
    n_pos = int(is_positive.sum())
    n_neg = len(is_positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = stats.rankdata(scores)
    return float((ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def metric_names(class_names: Sequence[str]) -> list[str]:
    """Names of the flat metrics ``flat_metrics`` returns, in a stable order."""
    names = ["accuracy", "macro_f1", "auc_macro"]
    for name in class_names:
        names += [f"sensitivity_{name}", f"specificity_{name}", f"auc_{name}"]
    return names


def flat_metrics(y: np.ndarray, proba: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Accuracy, macro F1, macro and per-class one-vs-rest AUC, per-class sensitivity and specificity.

    Counts come from ``classify.metrics`` (the one definition of the paper's metrics); the prediction is
    the most probable class. A metric whose denominator is empty is nan here (not 0), so that bootstrap
    replicates lacking a class do not drag an interval towards 0; for the same reason macro F1 is the mean
    over the classes present in ``y`` (``metrics.macro_over_present``), which equals the paper's macro F1
    when every class is present.
    """
    y = np.asarray(y)
    proba = np.asarray(proba, dtype=float)
    n_classes = len(class_names)
    metrics = metrics_from_confusion(confusion_matrix(y, proba.argmax(axis=1), n_classes), class_names)
    out = {"accuracy": metrics["accuracy"] if len(y) else math.nan, "macro_f1": macro_over_present(metrics, "f1")}
    aucs = []
    for index, name in enumerate(class_names):
        positive = y == index
        per_class = metrics["per_class"][str(name)]
        out[f"sensitivity_{name}"] = per_class["recall"] if positive.any() else math.nan
        out[f"specificity_{name}"] = per_class["specificity"] if (~positive).any() else math.nan
        out[f"auc_{name}"] = ovr_auc(positive, proba[:, index])
        aucs.append(out[f"auc_{name}"])
    defined = [a for a in aucs if not math.isnan(a)]
    out["auc_macro"] = float(np.mean(defined)) if defined else math.nan
    return {name: out[name] for name in metric_names(class_names)}


def cluster_bootstrap_indices(n: int, clusters: Sequence | None, n_boot: int, seed: int) -> list[np.ndarray]:
    """Row indices of ``n_boot`` replicates: draw as many clusters as there are, with replacement, and take
    every row of each drawn cluster. ``clusters=None``: every row is its own cluster."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot} instead")
    rng = np.random.default_rng(seed)
    if clusters is None:
        return [rng.integers(0, n, size=n) for _ in range(n_boot)]
    clusters = np.asarray(clusters)
    if clusters.shape != (n,):
        raise ValueError(f"clusters must have one entry per row ({n}), got shape {clusters.shape} instead")
    _, codes = np.unique(clusters, return_inverse=True)
    members = [np.flatnonzero(codes == c) for c in range(codes.max() + 1)] if n else []
    replicates = []
    for _ in range(n_boot):
        drawn = rng.integers(0, len(members), size=len(members))
        replicates.append(np.concatenate([members[c] for c in drawn]))
    return replicates


def bootstrap_metrics(y: np.ndarray, proba: np.ndarray, class_names: Sequence[str], clusters: Sequence | None = None,
                      n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> tuple[dict[str, float], np.ndarray]:
    """Point values of ``flat_metrics`` and a (n_boot, n_metrics) array of replicate values (columns in
    ``metric_names`` order), from a patient-cluster bootstrap."""
    y = np.asarray(y)
    proba = np.asarray(proba, dtype=float)
    point = flat_metrics(y, proba, class_names)
    names = metric_names(class_names)
    replicates = np.array([list(flat_metrics(y[rows], proba[rows], class_names).values())
                           for rows in cluster_bootstrap_indices(len(y), clusters, n_boot, seed)])
    return point, replicates.reshape(n_boot, len(names))


def percentile_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The central ``confidence`` percentile interval of replicate values, ignoring nan; nan when all are."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return math.nan, math.nan
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def intervals(point: dict[str, float], replicates: np.ndarray, confidence: float = 0.95) -> dict[str, dict]:
    """``{metric: {"value", "ci_low", "ci_high"}}`` from ``bootstrap_metrics`` output."""
    out = {}
    for column, name in enumerate(point):
        low, high = percentile_interval(replicates[:, column], confidence)
        out[name] = {"value": point[name], "ci_low": low, "ci_high": high}
    return out


def gap_intervals(point_a: dict[str, float], replicates_a: np.ndarray, point_b: dict[str, float],
                  replicates_b: np.ndarray, confidence: float = 0.95) -> dict[str, dict]:
    """``b - a`` for every metric with the percentile interval of the replicate differences (two independent
    samples, e.g. internal and external: replicate k of one minus replicate k of the other)."""
    if replicates_a.shape != replicates_b.shape:
        raise ValueError(f"replicate arrays differ in shape: {replicates_a.shape} vs {replicates_b.shape}")
    out = {}
    for column, name in enumerate(point_a):
        low, high = percentile_interval(replicates_b[:, column] - replicates_a[:, column], confidence)
        out[name] = {"value": point_b[name] - point_a[name], "ci_low": low, "ci_high": high}
    return out


def resampling_units(n: int, clusters: Sequence | None) -> int:
    """How many units a cluster bootstrap draws: distinct clusters, or ``n`` images without clusters."""
    return int(len(np.unique(np.asarray(clusters)))) if clusters is not None else int(n)


def wilson_intervals(y: np.ndarray, proba: np.ndarray, class_names: Sequence[str],
                     confidence: float = 0.95) -> dict[str, dict]:
    """``intervals``-shaped output for a small set: Wilson intervals of accuracy, per-class sensitivity and
    specificity on their images; no interval (nan) for macro F1 and AUC."""
    y = np.asarray(y)
    proba = np.asarray(proba, dtype=float)
    point = flat_metrics(y, proba, class_names)
    cm = confusion_matrix(y, proba.argmax(axis=1), len(class_names))
    counts = {"accuracy": (int(np.trace(cm)), int(cm.sum()))}
    for index, name in enumerate(class_names):
        tp, fp, fn, tn = class_counts(cm, index)
        counts[f"sensitivity_{name}"] = (tp, tp + fn)
        counts[f"specificity_{name}"] = (tn, tn + fp)
    out = {}
    for name, value in point.items():
        low = high = math.nan
        if name in counts and counts[name][1] > 0:
            low, high = wilson_interval(*counts[name], confidence=confidence)
        out[name] = {"value": value, "ci_low": low, "ci_high": high}
    return out


def evaluation_intervals(y: np.ndarray, proba: np.ndarray, class_names: Sequence[str],
                         clusters: Sequence | None = None, n_boot: int = DEFAULT_N_BOOT,
                         seed: int = 0) -> tuple[dict, np.ndarray | None]:
    """Every metric of one evaluation with its interval, by the module docstring's rule.

    Returns ``({"interval": "bootstrap" | "wilson", "units": int, "metrics": {metric: {...}}}, replicates)``;
    replicates (for ``evaluation_gap``) are None under the Wilson rule.
    """
    units = resampling_units(len(y), clusters)
    if units >= SMALL_SAMPLE:
        point, replicates = bootstrap_metrics(y, proba, class_names, clusters, n_boot, seed)
        return {"interval": "bootstrap", "units": units, "metrics": intervals(point, replicates)}, replicates
    return {"interval": "wilson", "units": units, "metrics": wilson_intervals(y, proba, class_names)}, None


def mover_gap_intervals(stats_a: dict[str, dict], stats_b: dict[str, dict]) -> dict[str, dict]:
    """``b - a`` for every metric with the MOVER (Newcombe) interval of a difference of two independent
    estimates from their own intervals: d - sqrt((b - b_low)^2 + (a_high - a)^2) to
    d + sqrt((b_high - b)^2 + (a - a_low)^2). nan where either side has no interval."""
    out = {}
    for name, a in stats_a.items():
        b = stats_b[name]
        value = b["value"] - a["value"]
        low = value - math.hypot(b["value"] - b["ci_low"], a["ci_high"] - a["value"])
        high = value + math.hypot(b["ci_high"] - b["value"], a["value"] - a["ci_low"])
        if math.isnan(low) or math.isnan(high):
            low = high = math.nan
        out[name] = {"value": value, "ci_low": low, "ci_high": high}
    return out


def evaluation_gap(a: dict, replicates_a: np.ndarray | None, b: dict,
                   replicates_b: np.ndarray | None) -> dict[str, dict]:
    """``b - a`` of two ``evaluation_intervals`` results: the bootstrap interval of the replicate differences
    when both were bootstrapped, else the MOVER interval (``mover_gap_intervals``)."""
    if replicates_a is not None and replicates_b is not None:
        point_a = {k: v["value"] for k, v in a["metrics"].items()}
        point_b = {k: v["value"] for k, v in b["metrics"].items()}
        return gap_intervals(point_a, replicates_a, point_b, replicates_b)
    return mover_gap_intervals(a["metrics"], b["metrics"])
