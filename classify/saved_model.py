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
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CxrError(f"{sidecar}: not a readable head description ({type(exc).__name__}: {exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise CxrError(f"{sidecar}: not a cxr-transfer head description (format {found!r})")
    problem = _sidecar_problem(info)
    if problem:
        raise CxrError(f"{sidecar}: malformed head description: {problem}; save the head again with compare --save")
    return info


def _sidecar_problem(info: dict[str, Any]) -> str | None:
    """What is wrong with a sidecar's fields (None when every field predict needs is well formed)."""
    if not isinstance(info.get("joblib_sha256"), str) or len(info["joblib_sha256"]) != 64:
        return "joblib_sha256 must be a 64-character sha256"
    names = info.get("class_names")
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n for n in names):
        return "class_names must list at least two class names"
    parts = info.get("backbones")
    if not isinstance(parts, list) or not parts:
        return "backbones must list the backbones the head was trained on"
    for part in parts:
        if not isinstance(part, dict) or not isinstance(part.get("backbone"), str) or \
                not isinstance(part.get("weights_sha256"), str):
            return "each backbone needs its name and weights_sha256"
        size = part.get("input_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            return f"input_size of {part.get('backbone')} must be a positive whole number, got {size!r} instead"
    return None


def load_head(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(fitted pipeline, info) after checking the joblib file is byte for byte the one saved."""
    info = read_head_info(path)
    actual = sha256_file(path)
    if actual != info["joblib_sha256"]:
        raise CxrError(f"{path}: sha256 {actual[:12]}... differs from the {info['joblib_sha256'][:12]}... recorded "
                       f"when cxr-transfer saved it; refusing to load a changed file")
    return joblib.load(path), info
