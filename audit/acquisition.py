"""Acquisition shortcuts: can the class be told from how the file was made, without looking at pixels?

Per class: file format, colour mode, bit depth, image size and file size, read from the file header with
Pillow (no decoding: fast). Then a random forest is cross-validated on those properties alone
([format one-hot, mode one-hot, bits per pixel, width, height, aspect, log file size, bytes per pixel]).
When its accuracy is more than ``MARGIN`` above chance (the majority-class share), the classes differ in
how they were acquired or exported, and a CNN can learn that difference instead of the disease.
The margin is a fixed effect-size rule rather than a p-value: with a few hundred images even a small edge
over chance is "significant", while 0.2 of accuracy is a difference nobody should ignore.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_transfer.classify.metrics import classification_metrics, summarize
from cxr_transfer.classify.protocols import cv_splits
from cxr_transfer.core.errors import CxrError
from cxr_transfer.extract.dataset import Dataset
from cxr_transfer.extract.dicom import is_dicom_file

MARGIN = 0.2
"""Accuracy above chance from which file properties count as a shortcut."""

_MODE_BITS = {"1": 1, "L": 8, "P": 8, "LA": 16, "La": 16, "PA": 16, "I;16": 16, "I;16B": 16, "I;16L": 16,
              "I;16N": 16, "I": 32, "F": 32, "RGB": 24, "YCbCr": 24, "LAB": 24, "HSV": 24, "RGBA": 32,
              "RGBa": 32, "RGBX": 32, "CMYK": 32}


@dataclass
class FileProperties:
    """What the file header says about one image."""

    path: str
    label: str
    format: str
    mode: str
    bits: int          # bits per pixel implied by the mode (8 grey, 24 RGB, 32 RGBA, 16 for 16-bit grey)
    width: int
    height: int
    file_size: int

    @property
    def aspect(self) -> float:
        return self.width / self.height if self.height else 0.0


def read_properties(dataset: Dataset) -> tuple[list[FileProperties], list[tuple[str, str]]]:
    """Header properties of every image (no pixel decoding), and the files Pillow could not open."""
    props, failed = [], []
    for sample in dataset.samples:
        try:
            with Image.open(sample.path) as image:
                fmt, mode, (width, height) = image.format or "?", image.mode, image.size
        except Exception as exc:  # noqa: BLE001 - any unreadable header is reported, not fatal
            failed.append((dataset.relative(sample), f"{type(exc).__name__}: {exc}"))
            continue
        props.append(FileProperties(dataset.relative(sample), sample.label, fmt, mode, _MODE_BITS.get(mode, 0),
                                    width, height, Path(sample.path).stat().st_size))
    return props, failed


def _spread(values: list[float]) -> dict:
    array = np.asarray(values, dtype=float)
    return {"min": float(array.min()), "median": float(np.median(array)), "max": float(array.max())}


def class_summary(props: list[FileProperties], class_names: list[str]) -> dict[str, dict]:
    """Per class: counts of format / mode / bits, and min/median/max of width, height, aspect, file size."""
    summary = {}
    for name in class_names:
        rows = [p for p in props if p.label == name]
        if not rows:
            continue
        summary[name] = {
            "n": len(rows),
            "format": dict(Counter(p.format for p in rows).most_common()),
            "mode": dict(Counter(p.mode for p in rows).most_common()),
            "bits": {str(k): v for k, v in Counter(p.bits for p in rows).most_common()},
            "width": _spread([p.width for p in rows]), "height": _spread([p.height for p in rows]),
            "aspect": _spread([p.aspect for p in rows]),
            "file_kib": _spread([p.file_size / 1024 for p in rows]),
        }
    return summary


def property_matrix(props: list[FileProperties]) -> tuple[np.ndarray, list[str]]:
    """The classifier's input: one row per image, and the column names."""
    formats = sorted({p.format for p in props})
    modes = sorted({p.mode for p in props})
    columns = [f"format={f}" for f in formats] + [f"mode={m}" for m in modes] + \
        ["bits", "width", "height", "aspect", "log_file_size", "bytes_per_pixel"]
    rows = []
    for p in props:
        rows.append([float(p.format == f) for f in formats] + [float(p.mode == m) for m in modes] +
                    [p.bits, p.width, p.height, p.aspect, float(np.log(max(p.file_size, 1))),
                     p.file_size / max(1, p.width * p.height)])
    return np.array(rows, dtype=float), columns


@dataclass
class AcquisitionResult:
    """Per-class file properties and how well they alone predict the class."""

    summary: dict[str, dict]
    unreadable: list[tuple[str, str]]
    accuracy: dict | None            # summarize() over folds, or None when CV was impossible
    balanced_accuracy: float | None  # of the out-of-fold predictions
    per_class_recall: dict[str, float]
    chance: float
    importances: dict[str, float]    # random-forest impurity importance per column (sorted, top 8)
    grouped: bool
    skipped: str = ""

    @property
    def shortcut(self) -> bool:
        return self.accuracy is not None and self.accuracy["mean"] > self.chance + MARGIN

    def to_dict(self) -> dict:
        return {**asdict(self), "shortcut": self.shortcut, "margin": MARGIN}


def acquisition_shortcuts(dataset: Dataset, seed: int = 0, folds: int = 5) -> AcquisitionResult:
    """Read every header, summarise per class and cross-validate a random forest on the properties."""

    props, unreadable = read_properties(dataset)
    summary = class_summary(props, dataset.class_names)
    index = {name: i for i, name in enumerate(dataset.class_names)}
    group_of = {dataset.relative(s): s.group for s in dataset.samples}
    labels = np.array([index[p.label] for p in props], dtype=np.int64)
    chance = float(np.bincount(labels).max() / len(labels)) if len(labels) else 0.0
    groups = np.array([group_of[p.path] for p in props]) if dataset.has_groups and all(
        group_of[p.path] for p in props) else None
    empty = AcquisitionResult(summary, unreadable, None, None, {}, chance, {}, groups is not None)
    if not props:
        empty.skipped = _nothing_readable(dataset)
        return empty
    try:
        splits = cv_splits(labels, folds=folds, repeats=1, seed=seed, groups=groups,
                           class_names=dataset.class_names)
    except CxrError as exc:
        empty.skipped = f"no cross-validation: {exc}"
        return empty
    features, columns = property_matrix(props)
    predicted, fold_accuracy, importances = forest_cv(features, labels, splits, seed)
    metrics = classification_metrics(labels, predicted, dataset.class_names)
    recall = {name: round(values["recall"], 4) for name, values in metrics["per_class"].items()}
    top = sorted(zip(columns, importances), key=lambda item: -item[1])[:8]
    return AcquisitionResult(summary, unreadable, summarize(fold_accuracy), float(metrics["macro"]["recall"]),
                             recall, chance, {k: round(float(v), 4) for k, v in top}, groups is not None)


def _nothing_readable(dataset: Dataset) -> str:
    """Why the check cannot run when Pillow opened none of the images, in plain words."""
    n_dicom = sum(is_dicom_file(Path(s.path)) for s in dataset.samples)
    compared = "file format, colour mode and size were not compared"
    if n_dicom == len(dataset):
        return f"Pillow reads no DICOM file, and all {n_dicom} images are DICOM: {compared}"
    dicom = f" ({n_dicom} of them DICOM, which Pillow does not read)" if n_dicom else ""
    return f"Pillow could open none of the {len(dataset)} images{dicom}: {compared}"


def forest_cv(features: np.ndarray, labels: np.ndarray, splits: list,
              seed: int) -> tuple[np.ndarray, list[float], np.ndarray]:
    """A random forest on a table of non-pixel properties, cross-validated on ``splits``: out-of-fold
    predictions, each fold's accuracy and the mean feature importances (the audit's shortcut checks)."""
    from sklearn.ensemble import RandomForestClassifier

    predicted = np.empty_like(labels)
    fold_accuracy, importances = [], np.zeros(features.shape[1])
    for split in splits:
        model = RandomForestClassifier(n_estimators=200, min_samples_leaf=2, random_state=seed, n_jobs=2)
        model.fit(features[split.train_idx], labels[split.train_idx])
        predicted[split.test_idx] = model.predict(features[split.test_idx])
        fold_accuracy.append(float(np.mean(predicted[split.test_idx] == labels[split.test_idx])))
        importances += model.feature_importances_ / len(splits)
    return predicted, fold_accuracy, importances
