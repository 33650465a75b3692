"""classify.protocols: deterministic, stratified, group-safe splits and clear errors."""

import numpy as np
import pytest

from cxr_transfer.classify.protocols import (
    Split,
    check_splittable,
    cv_splits,
    holdout_split,
    paper_splits,
)
from cxr_transfer.core.errors import CxrError

CLASS_NAMES = ("covid", "normal", "pneumonia")


def paper_sized_labels() -> np.ndarray:
    """336 images in uneven classes, shuffled so that order carries no information."""
    labels = np.repeat([0, 1, 2], [130, 104, 102])
    return np.random.default_rng(0).permutation(labels)


def grouped_labels(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Patients with 1-4 images each, every image of a patient sharing the patient's class."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for patient in range(150):
        size = int(rng.integers(1, 5))
        labels += [patient % 3] * size
        groups += [patient] * size
    order = rng.permutation(len(labels))
    return np.array(labels)[order], np.array(groups)[order]


def assert_partition(split: Split, n_rows: int) -> None:
    assert np.intersect1d(split.train_idx, split.test_idx).size == 0
    np.testing.assert_array_equal(np.union1d(split.train_idx, split.test_idx), np.arange(n_rows))


def same_indices(a: list[Split], b: list[Split]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x.train_idx, y.train_idx) and np.array_equal(x.test_idx, y.test_idx) for x, y in zip(a, b)
    )


# --- paper protocol -------------------------------------------------------------------------


def test_paper_split_is_deterministic_per_seed():
    labels = paper_sized_labels()
    first = paper_splits(labels, seeds=[0, 1, 2])
    again = paper_splits(labels, seeds=[0, 1, 2])
    assert same_indices(first, again)
    assert [(s.protocol, s.repeat, s.fold) for s in first] == [("paper", 0, 0), ("paper", 1, 0), ("paper", 2, 0)]
    assert not np.array_equal(first[0].test_idx, first[1].test_idx)


def test_paper_split_is_stratified_80_20():
    labels = paper_sized_labels()
    for split in paper_splits(labels, seeds=[0, 1, 2, 3]):
        assert_partition(split, len(labels))
        assert abs(len(split.test_idx) - 0.2 * len(labels)) <= 1
        for label in range(3):
            in_class = np.sum(labels == label)
            in_test = np.sum(labels[split.test_idx] == label)
            assert abs(in_test - 0.2 * in_class) <= 1, (label, in_test, in_class)


def test_paper_split_accepts_string_labels():
    labels = np.array(CLASS_NAMES)[paper_sized_labels()]
    by_name = paper_splits(labels, seeds=[5])
    by_index = paper_splits(paper_sized_labels(), seeds=[5])
    assert same_indices(by_name, by_index)  # stratification depends on the partition only


def test_paper_split_with_groups_keeps_patients_on_one_side():
    labels, groups = grouped_labels()
    splits = paper_splits(labels, seeds=[0, 1], groups=groups)
    for split in splits:
        assert_partition(split, len(labels))
        assert np.intersect1d(groups[split.train_idx], groups[split.test_idx]).size == 0
        assert 0.1 < len(split.test_idx) / len(labels) < 0.3
        assert set(labels[split.test_idx]) == {0, 1, 2}
    assert same_indices(splits, paper_splits(labels, seeds=[0, 1], groups=groups))
    assert not np.array_equal(splits[0].test_idx, splits[1].test_idx)


def test_paper_split_errors():
    labels = paper_sized_labels()
    with pytest.raises(CxrError):
        paper_splits(labels, seeds=[])
    with pytest.raises(CxrError):
        paper_splits(labels, seeds=[0], test_size=1.5)
    with pytest.raises(CxrError, match="'rare' has 1 images"):
        paper_splits(np.array(["common"] * 10 + ["rare"]), seeds=[0])
    with pytest.raises(CxrError, match="classes"):
        paper_splits(np.array([0, 0, 1, 1, 2, 2]), seeds=[0])  # 20% of 6 -> 2 test images for 3 classes
    labels, groups = grouped_labels()
    groups = groups.copy()
    groups[labels == 2] = 999  # all of class 2 is one patient: it cannot sit in both sides' folds
    with pytest.raises(CxrError, match="'2' spans 1 groups"):
        paper_splits(labels, seeds=[0], groups=groups)


# --- k-fold cross-validation ----------------------------------------------------------------


@pytest.mark.parametrize("repeats", [1, 3])
def test_cv_folds_are_disjoint_and_cover_everything(repeats):
    labels = paper_sized_labels()
    splits = cv_splits(labels, folds=5, repeats=repeats, seed=0)
    assert len(splits) == 5 * repeats
    for repeat in range(repeats):
        in_repeat = [s for s in splits if s.repeat == repeat]
        assert [s.fold for s in in_repeat] == [0, 1, 2, 3, 4]
        for split in in_repeat:
            assert split.protocol == "cv"
            assert_partition(split, len(labels))
            for label in range(3):  # stratified: each fold holds ~1/5 of every class
                in_class = np.sum(labels == label)
                assert abs(np.sum(labels[split.test_idx] == label) - in_class / 5) <= 1
        tested = np.sort(np.concatenate([s.test_idx for s in in_repeat]))
        np.testing.assert_array_equal(tested, np.arange(len(labels)))  # each image tested once
    if repeats > 1:
        assert not np.array_equal(splits[0].test_idx, splits[5].test_idx)


def test_cv_is_deterministic_per_seed():
    labels = paper_sized_labels()
    assert same_indices(cv_splits(labels, seed=3), cv_splits(labels, seed=3))
    assert not same_indices(cv_splits(labels, seed=3), cv_splits(labels, seed=4))


def test_cv_with_string_labels():
    labels = np.array(CLASS_NAMES)[paper_sized_labels()]
    for split in cv_splits(labels, folds=4):
        assert_partition(split, len(labels))
        assert set(labels[split.test_idx]) == set(CLASS_NAMES)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_cv_never_splits_a_group(seed):
    labels, groups = grouped_labels(seed)
    splits = cv_splits(labels, folds=5, repeats=2, seed=seed, groups=groups)
    assert len(splits) == 10
    for split in splits:
        assert_partition(split, len(labels))
        assert np.intersect1d(groups[split.train_idx], groups[split.test_idx]).size == 0
    for repeat in (0, 1):
        tested = np.sort(np.concatenate([s.test_idx for s in splits if s.repeat == repeat]))
        np.testing.assert_array_equal(tested, np.arange(len(labels)))
    assert same_indices(splits, cv_splits(labels, folds=5, repeats=2, seed=seed, groups=groups))
    # repeat r uses seed + r, so the two repeats differ
    assert not np.array_equal(splits[0].test_idx, splits[5].test_idx)


# --- fixed holdout --------------------------------------------------------------------------


def test_holdout_uses_the_split_column():
    names = ["train", "test", "train", "val", "test", "train"]
    (split,) = holdout_split(names)
    assert (split.protocol, split.repeat, split.fold) == ("holdout", 0, 0)
    np.testing.assert_array_equal(split.train_idx, [0, 2, 5])
    np.testing.assert_array_equal(split.test_idx, [1, 4])  # "val" is in neither
    (custom,) = holdout_split(names, train="val", test="train")
    np.testing.assert_array_equal(custom.train_idx, [3])
    np.testing.assert_array_equal(custom.test_idx, [0, 2, 5])


def test_holdout_missing_side_raises():
    with pytest.raises(CxrError, match="'test'"):
        holdout_split(["train", "train", "val"])
    with pytest.raises(CxrError, match="'train'"):
        holdout_split(["test", "val"])
    with pytest.raises(CxrError, match="'dev'"):
        holdout_split(["train", "test"], train="dev")


# --- check_splittable -----------------------------------------------------------------------


def test_check_splittable_accepts_good_data():
    check_splittable(paper_sized_labels(), folds=5)
    labels, groups = grouped_labels()
    check_splittable(labels, folds=5, groups=groups)


def test_single_class_raises_with_its_name():
    with pytest.raises(CxrError, match="only one class \\('covid', 12 images\\)") as error:
        check_splittable(np.array(["covid"] * 12), folds=5)
    assert "\n" not in str(error.value)
    with pytest.raises(CxrError, match="'normal'"):
        check_splittable(np.ones(12, dtype=int), folds=5, class_names=CLASS_NAMES)
    with pytest.raises(CxrError, match="one class"):
        cv_splits(np.zeros(20, dtype=int))


def test_small_class_raises_with_name_and_count():
    labels = np.array([0] * 20 + [1] * 20 + [2] * 3)
    with pytest.raises(CxrError, match="'pneumonia' has 3 images.*5") as error:
        check_splittable(labels, folds=5, class_names=CLASS_NAMES)
    assert "\n" not in str(error.value)
    with pytest.raises(CxrError, match="'2' has 3 images"):
        cv_splits(labels, folds=5)
    with pytest.raises(CxrError, match="'rare' has 2 images"):
        cv_splits(np.array(["common"] * 20 + ["rare"] * 2), folds=3)
    cv_splits(labels, folds=3)  # three images are enough for three folds


def test_too_few_groups_raises_with_name_and_count():
    labels = np.array([0] * 10 + [1] * 10)
    groups = np.concatenate([np.arange(10), [100, 100, 100, 101, 101, 101, 102, 102, 103, 103]])
    with pytest.raises(CxrError, match="'normal' spans 4 groups.*5"):
        check_splittable(labels, folds=5, class_names=CLASS_NAMES, groups=groups)
    with pytest.raises(CxrError, match="'1' spans 4 groups"):
        cv_splits(labels, folds=5, groups=groups)
    check_splittable(labels, folds=4, groups=groups)


def test_bad_arguments_raise():
    labels = paper_sized_labels()
    with pytest.raises(CxrError):
        check_splittable(labels, folds=1)
    with pytest.raises(CxrError):
        cv_splits(labels, repeats=0)
    with pytest.raises(CxrError):
        cv_splits(labels, groups=np.arange(5))
    with pytest.raises(CxrError):
        cv_splits(np.array([]))
