"""Pixel shortcuts, in the spirit of Maguolo & Nanni (2021): does the classifier still work without the lungs?

The embeddings of every image under three masks are classified with the same head and cross-validation:
- ``full``:        the resized image as the network sees it;
- ``no-center``:   the central box (80 % of each side, 64 % of the area: the lungs and heart) set to 0, so
                   only a frame 10 % of the side wide is left;
- ``border-only``: everything set to 0 except a frame 5 % of the side wide (19 % of the area): corners,
                   edges, burnt-in markers, collimation, the image's own border.
When the masked images are still classified well above chance, the classes differ in something outside the
chest -- source, age, equipment, labels -- and a high accuracy on full images says little about disease.
Masks are ``extract.images.ImageMask`` objects (defined there, shared with ``explain``): their features
are cached under their own names.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from cxr_transfer.classify.heads import make_head
from cxr_transfer.classify.metrics import classification_metrics, summarize
from cxr_transfer.classify.protocols import cv_splits
from cxr_transfer.core.errors import CxrError
from cxr_transfer.extract.dataset import Dataset
from cxr_transfer.extract.images import BORDER_FRACTION, BORDER_ONLY, CENTER_FRACTION, NO_CENTER, ImageMask
from cxr_transfer.extract.pipeline import ExtractSettings, FeatureSet, load_features

MARGIN = 0.2
"""Accuracy above chance from which the images under a mask count as "still separable"."""


MASKS: dict[str, ImageMask | None] = {"full": None, "no-center": NO_CENTER, "border-only": BORDER_ONLY}
"""Report name -> mask (None = the unmasked image)."""


@dataclass
class MaskScore:
    """Cross-validated accuracy of the head on the embeddings of the images under one mask."""

    mask: str
    n_images: int
    accuracy: dict              # summarize() over the folds
    balanced_accuracy: float    # macro recall of the out-of-fold predictions
    per_class_recall: dict[str, float]
    confusion_matrix: list[list[int]]
    extract_seconds: float
    n_computed: int


@dataclass
class PixelShortcutResult:
    head: str
    folds: int
    grouped: bool
    chance: float
    scores: dict[str, MaskScore]
    skipped: str = ""

    @property
    def separable_without_lungs(self) -> bool:
        masked = [self.scores[v] for v in ("no-center", "border-only") if v in self.scores]
        return any(s.accuracy["mean"] > self.chance + MARGIN for s in masked)

    def to_dict(self) -> dict:
        return {"head": self.head, "folds": self.folds, "grouped": self.grouped, "chance": self.chance,
                "margin": MARGIN, "center_fraction": CENTER_FRACTION, "border_fraction": BORDER_FRACTION,
                "separable_without_lungs": self.separable_without_lungs, "skipped": self.skipped,
                "scores": {k: asdict(v) for k, v in self.scores.items()}}


def cross_validated_accuracy(features: FeatureSet, head: str = "logreg", folds: int = 5, seed: int = 0,
                             grouped: bool = True) -> tuple[dict, dict]:
    """(summarize() of fold accuracies, classification_metrics of the out-of-fold predictions).

    Folds are stratified, and grouped by patient when ``grouped`` and every image has a group.
    """
    labels = features.labels
    groups = features.groups if grouped and len(features.samples) and all(features.groups) else None
    splits = cv_splits(labels, folds=folds, repeats=1, seed=seed, groups=groups, class_names=features.class_names)
    predicted = np.empty_like(labels)
    fold_accuracy = []
    for split in splits:
        model = make_head(head, seed)
        model.fit(features.embeddings[split.train_idx], labels[split.train_idx])
        predicted[split.test_idx] = model.predict(features.embeddings[split.test_idx])
        fold_accuracy.append(float(np.mean(predicted[split.test_idx] == labels[split.test_idx])))
    return summarize(fold_accuracy), classification_metrics(labels, predicted, features.class_names)


def pixel_shortcuts(dataset: Dataset, settings: ExtractSettings, head: str = "logreg", folds: int = 5,
                    seed: int = 0, full: FeatureSet | None = None) -> PixelShortcutResult:
    """Embed the images under each mask (cached), cross-validate ``head`` on each, and compare with chance.

    full: the unmasked features when the caller already has them (saves a cache read).
    """
    labels = np.array(dataset.label_indices)
    chance = float(np.bincount(labels).max() / len(labels))
    grouped = dataset.has_groups and all(dataset.groups)
    result = PixelShortcutResult(head, folds, grouped, chance, {})
    for name, mask in MASKS.items():
        if mask is None and full is not None:
            features, seconds, computed = full, 0.0, 0
        else:
            features, extract = load_features(dataset, _with_mask(settings, mask))
            seconds, computed = extract.seconds, extract.n_computed
        try:
            accuracy, metrics = cross_validated_accuracy(features, head, folds, seed, grouped)
        except CxrError as exc:
            result.skipped = f"no cross-validation: {exc}"
            return result
        result.scores[name] = MaskScore(
            name, len(features.samples), accuracy, float(metrics["macro"]["recall"]),
            {k: round(v["recall"], 4) for k, v in metrics["per_class"].items()}, metrics["confusion_matrix"],
            round(seconds, 2), computed)
    return result


def _with_mask(settings: ExtractSettings, mask: ImageMask | None) -> ExtractSettings:
    from dataclasses import replace

    return replace(settings, mask=mask)
