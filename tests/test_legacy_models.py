"""Heads saved before the redesign into layers (by commit ecd899c) still load and predict.

The fixtures are real files written by that commit's ``compare --save`` (hgb: its pipeline pickles
``classify.heads.CappedPCA``) and ``validate --save`` (logreg inside ``classify.conformal.ConformalHead``),
on mobilenetv2 features at 32 px (1280 dimensions). Moving a pickled class breaks them, so this test guards
the class paths that saved artefacts name.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cxr_transfer.classify.saved_model import load_head

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "legacy-heads"
CLASSES = ["covid", "normal", "pneumonia"]


@pytest.mark.parametrize("name, pickled_class", [("mobilenetv2-hgb", "CappedPCA"),
                                                  ("mobilenetv2-logreg-conformal", "ConformalHead")])
def test_a_head_saved_by_the_old_layout_loads_and_predicts(name: str, pickled_class: str, tmp_path: Path):
    for suffix in (".joblib", ".json"):
        shutil.copy(FIXTURES / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    model, info = load_head(tmp_path / f"{name}.joblib")
    assert info["class_names"] == CLASSES and info["backbones"][0]["backbone"] == "mobilenetv2"
    parts = [model] + list(getattr(model, "named_steps", {}).values()) + [getattr(model, "head", None)]
    assert any(type(part).__name__ == pickled_class for part in parts)
    features = np.random.default_rng(0).normal(size=(5, 1280)).astype(np.float32)
    proba = model.predict_proba(features)
    assert proba.shape == (5, 3) and np.allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    if pickled_class == "ConformalHead":
        sets = model.predict_sets(features, 0.2)   # the alpha it was saved with
        assert sets.shape == (5, 3) and sets.dtype == bool
