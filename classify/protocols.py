"""Train/test splits for evaluating heads: the paper's 80/20, k-fold CV and a fixed holdout.

Every split is a pure function of its inputs and seed, so the same seed gives the same
indices run after run. With ``groups`` (e.g. patient ids) no group is ever on both sides,
which keeps several images of one patient from leaking between train and test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.model_selection import (
    RepeatedStratifiedKFold,
    StratifiedGroupKFold,
    train_test_split,
)

from cxr_transfer.classify.duplicate_groups import duplicate_aware_groups
from cxr_transfer.core.errors import CxrError
from cxr_transfer.extract.dataset import Dataset, GROUP_COLUMNS
from cxr_transfer.extract.dicom import DICOM_GROUP_BY, GROUP_PREFIX as DICOM_GROUP_PREFIX


@dataclass(frozen=True)
class Split:
    """One train/test partition, as indices into the arrays the splitter was given."""

    protocol: str  # "paper" | "cv" | "holdout"
    repeat: int  # index into the seeds (paper) or the repeat number (cv)
    fold: int
    train_idx: np.ndarray
    test_idx: np.ndarray


def _as_labels(labels: np.ndarray | Sequence) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0:
        raise CxrError(f"labels must be a non-empty 1-D array, got shape {array.shape}")
    return array


def _as_groups(groups: np.ndarray | Sequence | None, n_rows: int) -> np.ndarray | None:
    if groups is None:
        return None
    array = np.asarray(groups)
    if array.shape != (n_rows,):
        raise CxrError(f"groups must have one entry per image ({n_rows}), got shape {array.shape}")
    return array


def _class_name(label, class_names: Sequence[str] | None) -> str:
    """Readable name of a label: class_names[label] for integer labels when names are given."""
    if class_names is not None and isinstance(label, (int, np.integer)) and 0 <= label < len(class_names):
        return str(class_names[label])
    return str(label)


def check_splittable(
    labels: np.ndarray | Sequence,
    folds: int,
    class_names: Sequence[str] | None = None,
    groups: np.ndarray | Sequence | None = None,
) -> None:
    """Raise CxrError (one line, naming the class) when stratified ``folds``-way splitting cannot work.

    Fails when there is a single class, when a class has fewer images than folds, or, with
    groups, when a class spans fewer distinct groups than folds (a fold would lack the class).
    """
    if folds < 2:
        raise CxrError(f"need at least 2 folds, got {folds}")
    _check_class_sizes(labels, folds, f"{folds}-fold splitting", class_names, groups)


def _check_class_sizes(
    labels: np.ndarray | Sequence,
    minimum: int,
    needed_for: str,
    class_names: Sequence[str] | None = None,
    groups: np.ndarray | Sequence | None = None,
) -> None:
    """Shared checks: at least two classes, each with ``minimum`` images (and groups, if given)."""
    labels = _as_labels(labels)
    groups = _as_groups(groups, len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        name = _class_name(classes[0], class_names)
        raise CxrError(f"only one class ('{name}', {counts[0]} images); need at least two classes to split")
    for label, count in zip(classes, counts):
        if count < minimum:
            name = _class_name(label, class_names)
            raise CxrError(f"class '{name}' has {count} images but {needed_for} needs at least {minimum}")
    if groups is not None:
        for label in classes:
            n_groups = len(np.unique(groups[labels == label]))
            if n_groups < minimum:
                name = _class_name(label, class_names)
                raise CxrError(f"class '{name}' spans {n_groups} groups but {needed_for} needs at least {minimum}")


def paper_splits(
    labels: np.ndarray | Sequence,
    seeds: Sequence[int],
    test_size: float = 0.2,
    groups: np.ndarray | Sequence | None = None,
    class_names: Sequence[str] | None = None,
) -> list[Split]:
    """The paper's protocol: one seeded stratified 80/20 split per seed.

    class_names: names for integer labels in error messages.

    Without groups: ``train_test_split(stratify=labels, random_state=seed)``. With groups:
    the first fold of ``StratifiedGroupKFold(round(1/test_size), shuffle=True, random_state=seed)``
    is the test set, so no group is on both sides. Indices are sorted.
    """
    labels = _as_labels(labels)
    groups = _as_groups(groups, len(labels))
    if not 0.0 < test_size < 1.0:
        raise CxrError(f"test_size must be between 0 and 1, got {test_size}")
    if len(seeds) == 0:
        raise CxrError("paper_splits needs at least one seed")
    indices = np.arange(len(labels))
    splits = []
    if groups is None:
        _check_class_sizes(labels, 2, "a stratified train/test split", class_names)
        n_test = int(np.ceil(test_size * len(labels)))
        n_classes = len(np.unique(labels))
        if min(n_test, len(labels) - n_test) < n_classes:
            raise CxrError(
                f"test_size {test_size} on {len(labels)} images leaves fewer images than the {n_classes} classes on one side"
            )
        for repeat, seed in enumerate(seeds):
            train_idx, test_idx = train_test_split(
                indices, test_size=test_size, stratify=labels, random_state=int(seed)
            )
            splits.append(Split("paper", repeat, 0, np.sort(train_idx), np.sort(test_idx)))
        return splits
    n_splits = max(2, round(1.0 / test_size))
    _check_class_sizes(labels, n_splits, f"a grouped split (test = 1 of {n_splits} group folds)", class_names,
                       groups=groups)
    for repeat, seed in enumerate(seeds):
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=int(seed))
        train_idx, test_idx = next(splitter.split(indices, labels, groups))
        splits.append(Split("paper", repeat, 0, np.sort(train_idx), np.sort(test_idx)))
    return splits


def cv_splits(
    labels: np.ndarray | Sequence,
    folds: int = 5,
    repeats: int = 1,
    seed: int = 0,
    groups: np.ndarray | Sequence | None = None,
    class_names: Sequence[str] | None = None,
) -> list[Split]:
    """Stratified k-fold, repeated: every image is tested exactly once per repeat.

    Without groups: ``RepeatedStratifiedKFold(folds, repeats, random_state=seed)``. With groups:
    ``StratifiedGroupKFold(folds, shuffle=True, random_state=seed + repeat)`` for each repeat.
    """
    labels = _as_labels(labels)
    groups = _as_groups(groups, len(labels))
    if repeats < 1:
        raise CxrError(f"repeats must be at least 1, got {repeats}")
    check_splittable(labels, folds, class_names, groups=groups)
    indices = np.arange(len(labels))
    if groups is None:
        splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
        return [
            Split("cv", number // folds, number % folds, np.sort(train_idx), np.sort(test_idx))
            for number, (train_idx, test_idx) in enumerate(splitter.split(indices, labels))
        ]
    splits = []
    for repeat in range(repeats):
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + repeat)
        for fold, (train_idx, test_idx) in enumerate(splitter.split(indices, labels, groups)):
            splits.append(Split("cv", repeat, fold, np.sort(train_idx), np.sort(test_idx)))
    return splits


def holdout_split(split_names: Sequence[str], train: str = "train", test: str = "test") -> list[Split]:
    """A fixed split from a per-image column: fit on rows named ``train``, test on rows named ``test``.

    Rows with any other name (e.g. "val") are left out of both.
    """
    names = np.asarray(split_names).astype(str)
    if names.ndim != 1:
        raise CxrError(f"split names must be 1-D, got shape {names.shape}")
    train_idx = np.flatnonzero(names == train)
    test_idx = np.flatnonzero(names == test)
    found = ", ".join(sorted(set(names.tolist()))) or "none"
    for role, wanted, idx in (("train", train, train_idx), ("test", test, test_idx)):
        if idx.size == 0:
            raise CxrError(f"no images in {role} split '{wanted}' (split names found: {found})")
    return [Split("holdout", 0, 0, train_idx, test_idx)]


def resolve_groups(dataset: Dataset, group_by: str | None, merge_duplicates: bool = True,
                   hash_cache: Path | None = None) -> np.ndarray | None:
    """The group of every sample, or None without ``group_by``; with ``merge_duplicates`` each near-duplicate
    cluster of the audit is kept in one group (``classify.duplicate_groups``)."""
    if not group_by:
        return None
    if group_by not in GROUP_COLUMNS + (DICOM_GROUP_BY,):
        raise CxrError(f"`group_by` takes one of: {', '.join(GROUP_COLUMNS + (DICOM_GROUP_BY,))}; got '{group_by}'")
    if not dataset.has_groups:
        raise CxrError(f"{dataset.root}: no '{group_by}' column (add a manifest.csv with path,patient_id "
                       f"beside the class folders, or a group column to the dataset CSV)")
    groups = np.array(dataset.groups)
    missing = int((groups == "").sum())
    if missing:
        unmatched = dataset.manifest_unmatched
        why = (f": {len(unmatched)} row(s) of manifest.csv match no image (first: '{unmatched[0]}'; its paths must "
               f"be relative to the manifest's folder, like '{dataset.relative(dataset.samples[0])}')"
               if unmatched else "")
        raise CxrError(f"{dataset.root}: {missing} images have no {group_by}{why}; every image needs one to group "
                       f"by it")
    if group_by == DICOM_GROUP_BY and not all(g.startswith(DICOM_GROUP_PREFIX) for g in dataset.groups):
        raise CxrError(f"{dataset.root}: the groups come from a manifest or CSV, not from DICOM headers; "
                       f"use `group_by` patient_id")
    if merge_duplicates:

        groups = duplicate_aware_groups(dataset, groups, hash_cache=hash_cache).groups
    return groups
