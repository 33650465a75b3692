"""The images a fine-tuning run sees: decoded once into memory, and the paper's 80/20 split of them.

The split is ``classify.protocols.paper_splits`` on the same labels (and, when asked, patient groups) that
compare uses, so for the same seed finetune and compare test on the same images (same test fingerprint).
The paper kept no validation set apart from the test set: the per-epoch "validation" curves (its figure 2)
are the held-out 20 % evaluated after every epoch, and so are ours.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_transfer.classify.protocols import Split, paper_splits, resolve_groups
from cxr_transfer.classify.results import images_fingerprint
from cxr_transfer.core.errors import CxrError
from cxr_transfer.extract.dataset import Dataset, Sample
from cxr_transfer.extract.images import ImageDecodeError, read_rgb


@dataclass
class SplitImages:
    """Decoded images (uint8, N x S x S x 3) and integer labels of the training and test sides."""

    split: Split
    train_samples: list[Sample]
    test_samples: list[Sample]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def held_out_fingerprint(self) -> str:
        return images_fingerprint(s.sha256 for s in self.test_samples)


def select_split_subset(dataset: Dataset, split: str | None = "train") -> Dataset:
    """The samples the 80/20 split is drawn from: one split folder (the paper's 336 images are train/),
    or the whole dataset when it has no split folders. Raises CxrError when the split is empty."""
    if split and any(s.split for s in dataset.samples):
        subset = dataset.subset(split)
        if not subset.samples:
            found = ", ".join(sorted({s.split for s in dataset.samples}))
            raise CxrError(f"{dataset.root}: no images in split '{split}' (splits found: {found})")
        return subset
    return dataset


def paper_split(dataset: Dataset, seed: int, test_size: float = 0.2, group_by: str | None = None,
                hash_cache: Path | None = None) -> Split:
    """The paper's seeded, stratified 80/20 split of ``dataset`` (grouped by ``group_by`` when given, with
    near-duplicate clusters kept together exactly as compare does)."""
    groups = resolve_groups(dataset, group_by, hash_cache=hash_cache)
    return paper_splits(np.asarray(dataset.label_indices), [seed], test_size=test_size, groups=groups,
                        class_names=dataset.class_names)[0]


def _read_or_reason(sample: Sample, size: int) -> np.ndarray | str:
    try:
        return read_rgb(sample.path, size)
    except ImageDecodeError as exc:
        return str(exc)


def decode_readable(dataset: Dataset, size: int, workers: int = 2
                    ) -> tuple[Dataset, np.ndarray, list[tuple[str, str]]]:
    """Decode every image once; unreadable ones are left out and counted, as extraction does.

    Returns (the dataset of the readable images, their uint8 pixels (N, size, size, 3), (path, reason) of
    each skipped file). Raises CxrError when no image can be read.
    """
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        decoded = list(pool.map(lambda s: _read_or_reason(s, size), dataset.samples))
    kept = [i for i, item in enumerate(decoded) if not isinstance(item, str)]
    failures = [(dataset.relative(s), item.split(": ", 1)[-1])
                for s, item in zip(dataset.samples, decoded) if isinstance(item, str)]
    if not kept:
        raise CxrError(f"{dataset.root}: none of the {len(dataset)} images could be read")
    readable = Dataset(dataset.root, [dataset.samples[i] for i in kept], list(dataset.class_names),
                       dataset.has_groups, list(dataset.skipped))
    return readable, np.stack([decoded[i] for i in kept]), failures


def decode_images(samples: list[Sample], size: int, workers: int = 2) -> np.ndarray:
    """Every sample read with ``read_rgb`` at size x size, stacked as uint8 (N, size, size, 3)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        images = list(pool.map(lambda s: read_rgb(s.path, size), samples))
    return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)


def load_split_images(dataset: Dataset, split: Split, size: int, workers: int = 2,
                      images: np.ndarray | None = None) -> SplitImages:
    """Decode all images of the dataset once (unless ``images`` are given, aligned with it) and cut them
    along the split."""
    images = decode_images(dataset.samples, size, workers) if images is None else images
    labels = np.asarray(dataset.label_indices, dtype=np.int64)
    train, test = split.train_idx, split.test_idx
    return SplitImages(split, [dataset.samples[i] for i in train], [dataset.samples[i] for i in test],
                       images[train], labels[train], images[test], labels[test])
