"""Label-free accuracy estimates for a target without labels, calibrated on TRAIN's out-of-fold predictions.

- **ATC** (Garg et al. 2022, "Leveraging unlabeled data to predict out-of-distribution performance"): pick
  the threshold t on a confidence score so that the share of TRAIN's out-of-fold predictions scoring above t
  equals their accuracy; the estimate is the share of TARGET predictions above t. Two scores: the maximum
  probability (``atc_mc``) and the negative entropy (``atc_ne``, the paper's better variant).
- **DoC** (Guillory et al. 2021, "Predicting with confidence on unseen distributions"): TRAIN's out-of-fold
  accuracy minus the drop in mean maximum probability from TRAIN to TARGET.

Both assume the model's confidence falls where its accuracy falls. They fail when the model is *confidently
wrong* on the target (a shortcut: adult bacterial pneumonia called covid with probability ~1): then the
confidence does not drop and the estimate stays high. ``estimate_accuracy`` returns each estimate with a
95% percentile bootstrap interval that resamples TARGET (patients when known) and TRAIN (its patients) together,
so the interval includes the uncertainty of the calibration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from cxr_transfer.classify.bootstrap import cluster_bootstrap_indices, percentile_interval

METHODS = ("atc_ne", "atc_mc", "doc")
METHOD_WORDS = {"atc_ne": "ATC, negative entropy (Garg et al. 2022)",
                "atc_mc": "ATC, maximum confidence (Garg et al. 2022)",
                "doc": "DoC, difference of confidences (Guillory et al. 2021)"}


def max_confidence(proba: np.ndarray) -> np.ndarray:
    return np.asarray(proba, float).max(axis=1)


def negative_entropy(proba: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(proba, float), 1e-12, 1.0)
    return (p * np.log(p)).sum(axis=1)


SCORES: dict[str, Callable[[np.ndarray], np.ndarray]] = {"atc_ne": negative_entropy, "atc_mc": max_confidence}


def atc_threshold(scores: np.ndarray, correct: np.ndarray) -> float:
    """The t with mean(scores > t) as close as possible to mean(correct): the (1 - accuracy) quantile."""
    scores = np.sort(np.asarray(scores, float))
    n, k = len(scores), int(round((1.0 - float(np.mean(correct))) * len(scores)))   # k scores at or below t
    if k <= 0:
        return float(scores[0] - 1e-9)
    if k >= n:
        return float(scores[-1])
    return float((scores[k - 1] + scores[k]) / 2) if scores[k] > scores[k - 1] else float(scores[k - 1])


def atc(source_proba: np.ndarray, source_correct: np.ndarray, target_proba: np.ndarray, score: str = "atc_ne") -> float:
    """The ATC estimate of the target accuracy with the ``score`` ('atc_ne' or 'atc_mc')."""
    function = SCORES[score]
    threshold = atc_threshold(function(source_proba), source_correct)
    return float(np.mean(function(target_proba) > threshold))


def doc(source_proba: np.ndarray, source_correct: np.ndarray, target_proba: np.ndarray) -> float:
    """The DoC estimate: source accuracy - (source mean confidence - target mean confidence), clipped to [0, 1]."""
    drop = max_confidence(source_proba).mean() - max_confidence(target_proba).mean()
    return float(np.clip(np.mean(source_correct) - drop, 0.0, 1.0))


def point_estimates(source_proba: np.ndarray, source_correct: np.ndarray, target_proba: np.ndarray) -> dict[str, float]:
    """Every method's estimate (``METHODS`` order)."""
    return {"atc_ne": atc(source_proba, source_correct, target_proba, "atc_ne"),
            "atc_mc": atc(source_proba, source_correct, target_proba, "atc_mc"),
            "doc": doc(source_proba, source_correct, target_proba)}


@dataclass(frozen=True)
class AccuracyEstimates:
    """Estimates with intervals, the source (TRAIN out-of-fold) accuracy and confidences they rest on."""

    estimates: dict[str, dict[str, float]]   # method -> value, ci_low, ci_high
    source_accuracy: float
    source_confidence: float                 # TRAIN out-of-fold mean maximum probability
    target_confidence: float                 # TARGET mean maximum probability
    n_boot: int
    units: str                               # what the bootstrap resampled

    def as_dict(self) -> dict[str, Any]:
        return {method: {**values, "method": METHOD_WORDS[method]} for method, values in self.estimates.items()} | {
            "source_accuracy": self.source_accuracy, "source_mean_confidence": self.source_confidence,
            "target_mean_confidence": self.target_confidence, "n_boot": self.n_boot, "bootstrap_units": self.units}


def estimate_accuracy(source_proba: np.ndarray, source_y: np.ndarray, target_proba: np.ndarray,
                      source_clusters: Sequence | None = None, target_clusters: Sequence | None = None,
                      n_boot: int = 1000, seed: int = 0, units: str | None = None) -> AccuracyEstimates:
    """ATC (both scores) and DoC with 95% bootstrap intervals (TRAIN and TARGET resampled by cluster); ``units``
    says in words what was resampled (default: TRAIN / TARGET patients where clusters are given, else images).
    TARGET may hold several rows per image (one per model scoring it): give them one cluster."""
    source_proba, target_proba = np.asarray(source_proba, float), np.asarray(target_proba, float)
    correct = source_proba.argmax(axis=1) == np.asarray(source_y)
    point = point_estimates(source_proba, correct, target_proba)
    source_rows = cluster_bootstrap_indices(len(correct), source_clusters, n_boot, seed)
    target_rows = cluster_bootstrap_indices(len(target_proba), target_clusters, n_boot, seed + 1)
    replicates = np.array([list(point_estimates(source_proba[s], correct[s], target_proba[t]).values())
                           for s, t in zip(source_rows, target_rows)])
    estimates = {}
    for column, method in enumerate(point):
        low, high = percentile_interval(replicates[:, column])
        estimates[method] = {"value": point[method], "ci_low": low, "ci_high": high}
    units = units or " and ".join(f"{where} {'patients' if clusters is not None else 'images'}"
                         for where, clusters in (("TRAIN", source_clusters), ("TARGET", target_clusters)))
    return AccuracyEstimates(estimates, float(correct.mean()), float(max_confidence(source_proba).mean()),
                             float(max_confidence(target_proba).mean()), n_boot, units)
