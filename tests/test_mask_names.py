"""The image masks' renaming (``ImageView`` -> ``ImageMask``) keeps every existing cache valid: the file names
and the stored identity attribute are what they were."""
from __future__ import annotations

from pathlib import Path

import h5py
import pytest

from cxr_transfer.core.errors import CxrError
from cxr_transfer.extract.cache import MASK_ATTR, read_cache
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.duplicates import HASH_CACHE_NAME
from cxr_transfer.extract.images import NO_CENTER
from cxr_transfer.extract.pipeline import ExtractSettings, extract_features
from testkit.synthetic import write_class_tree

TINY = dict(backbone="mobilenetv2", random_weights=True, input_size=32, batch_size=4, progress=False)


def test_a_masked_cache_keeps_its_file_name_and_stored_attribute(tmp_path: Path):
    root = write_class_tree(tmp_path / "d", per_class=2)
    settings = ExtractSettings.from_options(cache_dir=tmp_path / "c", mask=NO_CENTER, **TINY)
    first = extract_features(load_dataset(root), settings)
    assert first.cache_path.name.endswith("-nocenter80.h5")
    _, _, attrs = read_cache(first.cache_path)
    assert MASK_ATTR == "view" and attrs["view"] == "nocenter80"      # as caches written before the rename
    assert settings.record()["mask"] == "nocenter80"
    assert extract_features(load_dataset(root), settings).n_computed == 0

    with h5py.File(first.cache_path, "a") as handle:                   # the attribute is still its identity
        handle.attrs["view"] = "border05"
    with pytest.raises(CxrError, match="holds features with mask=border05, not nocenter80"):
        extract_features(load_dataset(root), settings)


def test_the_hash_cache_keeps_its_file_name():
    assert HASH_CACHE_NAME == "audit-phash16-views81-decode256.npz"
