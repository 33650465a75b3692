"""Saving fitted heads with joblib, and loading only files cxr-transfer wrote.

Loading a joblib (pickle) file runs code. A saved head is therefore two files: ``NAME.joblib`` and
``NAME.json``; the JSON is plain data (backbones, weights and ONNX sha256, input size, class names) and holds
the sha256 of the joblib file taken at save time. ``load_head`` reads the JSON, checks the hash, and only then
unpickles. A joblib file without its JSON, or whose bytes changed since it was saved, is refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import joblib

from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.hashing import sha256_file
from cxr_transfer.core.record import library_versions, now_iso, write_json

FORMAT = "cxr-transfer/head/1"


def save_head(path: str | Path, model: Any, class_names: list[str], backbones: list[dict[str, Any]],
              training: dict[str, Any]) -> Path:
    """Write the model and its JSON sidecar; ``backbones`` lists what produced the features, in order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".joblib.tmp")
    joblib.dump(model, tmp)
    tmp.replace(path)
    write_json(path.with_suffix(".json"), {
        "format": FORMAT, "kind": "head", "joblib_sha256": sha256_file(path), "class_names": list(class_names),
        "backbones": [{k: b[k] for k in ("backbone", "input_size", "weights_sha256", "onnx_sha256", "precision",
                                        "calibration_digest") if k in b}
                      for b in backbones],
        "training": training, "created": now_iso(), "versions": library_versions()})
    return path


def read_head_info(path: str | Path) -> dict[str, Any]:
    """The plain-data sidecar of a saved head (no code runs)."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if not path.is_file():
        raise CxrError(f"{path}: no such model file")
    if not sidecar.is_file():
        raise CxrError(f"{path}: no {sidecar.name} beside it; only heads saved by cxr-transfer (compare --save) "
                       f"are loaded, since loading a joblib file runs code")
    info = json.loads(sidecar.read_text())
    if info.get("format") != FORMAT:
        raise CxrError(f"{sidecar}: not a cxr-transfer head description (format {info.get('format')!r})")
    return info


def load_head(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(fitted pipeline, info) after checking the joblib file is byte for byte the one saved."""
    info = read_head_info(path)
    actual = sha256_file(path)
    if actual != info["joblib_sha256"]:
        raise CxrError(f"{path}: sha256 {actual[:12]}... differs from the {info['joblib_sha256'][:12]}... recorded "
                       f"when cxr-transfer saved it; refusing to load a changed file")
    return joblib.load(path), info
