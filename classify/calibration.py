"""Are the probabilities honest? Expected calibration error, Brier score, reliability diagrams, and a head
recalibrated on grouped folds of the training data.

Binning (one rule, stated in every report): **top-label ECE with 10 equal-width bins** of the predicted
class's probability ("confidence"), bins right-closed ``(0.0, 0.1], ..., (0.9, 1.0]``;
ECE = sum over bins of (images in bin / images) x |accuracy in bin - mean confidence in bin|.
The Brier score is the multi-class one: mean over images of sum over classes of (p_k - [y = k])^2 (0 is
perfect, 2 the worst).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.calibration import CalibratedClassifierCV

from cxr_transfer.classify.heads import make_head
from cxr_transfer.core.plotting import subplots

ECE_BINS = 10
CALIBRATION_METHODS = ("sigmoid", "isotonic")
BINNING_WORDS = (f"top-label ECE, {ECE_BINS} equal-width right-closed bins of the predicted class's probability; "
                 "Brier = mean over images of the sum over classes of (p - [y = class])^2")


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each confidence: 0 for (0, 1/n], ..., n-1 for ((n-1)/n, 1]."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)


def reliability_bins(y: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS) -> list[dict]:
    """Per bin: its edges, the number of images, their mean confidence and their accuracy (nan when empty)."""
    y = np.asarray(y)
    proba = np.asarray(proba, dtype=float)
    if proba.ndim != 2 or len(proba) != len(y):
        raise ValueError(f"proba must have shape ({len(y)}, n_classes), got {proba.shape} instead")
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    index = _bin_index(confidence, n_bins)
    bins = []
    for b in range(n_bins):
        inside = index == b
        n = int(inside.sum())
        bins.append({"low": b / n_bins, "high": (b + 1) / n_bins, "n": n,
                     "confidence": float(confidence[inside].mean()) if n else math.nan,
                     "accuracy": float(correct[inside].mean()) if n else math.nan})
    return bins


def expected_calibration_error(y: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE (module docstring); nan for no images."""
    bins = reliability_bins(y, proba, n_bins)
    total = sum(b["n"] for b in bins)
    if total == 0:
        return math.nan
    return float(sum(b["n"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["n"]))


def brier_score(y: np.ndarray, proba: np.ndarray) -> float:
    """Multi-class Brier score (module docstring); nan for no images."""
    y = np.asarray(y)
    proba = np.asarray(proba, dtype=float)
    if len(y) == 0:
        return math.nan
    onehot = np.zeros_like(proba)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((proba - onehot) ** 2).sum(axis=1).mean())


def calibration_summary(y: np.ndarray, proba: np.ndarray) -> dict:
    """ECE, Brier score and the reliability bins of one set of predictions."""
    return {"ece": expected_calibration_error(y, proba), "brier": brier_score(y, proba),
            "bins": reliability_bins(y, proba)}


def calibrated_head(head: str, method: str, splits: Sequence[tuple[np.ndarray, np.ndarray]], seed: int = 0):
    """``head`` wrapped in CalibratedClassifierCV(method) whose calibration folds are ``splits`` (patient-grouped
    folds of the training data the wrapper is fitted on, so no image calibrates a model that saw it)."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r} instead")
    return CalibratedClassifierCV(make_head(head, seed), method=method, cv=list(splits))


def plot_reliability(path: Path, panels: dict[str, dict[str, list[dict]]]) -> Path:
    """One reliability diagram per panel (e.g. per head); each panel maps a curve name ("internal",
    "external", "external, isotonic", ...) to its ``reliability_bins``. Marker area ~ images in the bin."""
    names = list(panels)
    columns = min(3, len(names)) or 1
    rows = math.ceil(len(names) / columns) or 1
    fig, axes = subplots(rows, columns, figsize=(3.4 * columns, 3.3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
        for curve, bins in panels[name].items():
            filled = [b for b in bins if b["n"]]
            total = sum(b["n"] for b in filled) or 1
            line, = ax.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], linewidth=1,
                            label=f"{curve} (n={total})")
            ax.scatter([b["confidence"] for b in filled], [b["accuracy"] for b in filled], color=line.get_color(),
                       s=[4 + 200 * b["n"] / total for b in filled], alpha=0.7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("mean confidence in bin", fontsize=8)
        ax.set_ylabel("accuracy in bin", fontsize=8)
        ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)
