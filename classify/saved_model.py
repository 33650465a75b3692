"""Saving fitted heads with joblib, and loading only files cxr-transfer wrote.

Loading a joblib (pickle) file runs code. A saved head is therefore two files: ``NAME.joblib`` and
``NAME.json``; the JSON is plain data (backbones, weights and ONNX sha256, input size, class names) and holds
the sha256 of the joblib file taken at save time. ``load_head`` reads the JSON, checks the hash, and only then
unpickles. A joblib file without its JSON, or whose bytes changed since it was saved, is refused.

Every field of the JSON that changes a result (``DESCRIBED``: class names, and per backbone its name, input
size, precision, int8 sample digest, weights and ONNX sha256) is also stored inside the hashed joblib file
(format ``cxr-transfer/head/2``); ``load_head`` refuses a JSON whose fields differ from those, naming the field.
Heads of the old format ``cxr-transfer/head/1`` (the model pickled alone) still load: for them only the joblib
hash and the fields' own shape are checked. Fields renamed since (``RENAMED_KEYS``) are read under their new
names from both the JSON and the joblib copy, so heads saved before a rename keep loading.
``refuse_incomplete_run`` refuses a head in a run folder that still holds the run's in-progress marker
(``core.outputs``: the run was killed while saving).

A fine-tuned model is the run folder of ``finetune`` (``MODEL_JSON`` beside model.keras and model.onnx, each
file's sha256 recorded in it). ``load_saved_model`` takes either kind of model and returns a ``SavedHead`` or a
``SavedFinetuned``: predict and explain load models only through it.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.hashing import sha256_bytes, sha256_file
from cxr_transfer.core.io import atomic_path
from cxr_transfer.core.outputs import incomplete_run
from cxr_transfer.core.record import library_versions, now_iso, write_json
from cxr_transfer.core.settings import PRECISIONS
from cxr_transfer.extract.runtime import open_session
from cxr_transfer.extract.user_onnx import saved_record

FORMAT = "cxr-transfer/head/2"
OLD_FORMAT = "cxr-transfer/head/1"   # up to 40c227d: the model pickled alone, only its sha256 in the JSON
DESCRIBED = ("kind", "class_names", "backbones", "training")
"""Sidecar fields also stored inside the hashed joblib file (format 2), so that editing one is refused."""
RENAMED_KEYS = {"calibration_digest": "int8_sample_digest"}
"""Per-backbone fields saved under an older name (old -> new); read under the new one."""


def save_head(path: str | Path, model: Any, class_names: list[str], backbones: list[dict[str, Any]],
              training: dict[str, Any]) -> Path:
    """Write the model and its JSON sidecar; ``backbones`` lists what produced the features, in order (each
    with its backbone, input_size, weights_sha256, precision and, for int8, int8_sample_digest)."""
    path = Path(path)
    description = _plain({"kind": "head", "class_names": list(class_names),
                          "backbones": [_part_record(b) for b in backbones], "training": training})
    problem = _sidecar_problem({**description, "joblib_sha256": "0" * 64}, FORMAT)
    if problem:
        raise ValueError(f"save_head: {problem}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        joblib.dump({"format": FORMAT, "description": description, "model": model}, tmp)
    write_json(path.with_suffix(".json"), {
        "format": FORMAT, "kind": "head", "joblib_sha256": sha256_file(path),
        **{k: description[k] for k in DESCRIBED if k != "kind"}, "created": now_iso(), "versions": library_versions()})
    return path


def _plain(value: Any) -> Any:
    """``value`` as the JSON sidecar reads back (tuples as lists, paths as text), so the two compare equal."""
    return json.loads(json.dumps(value, default=str))


def _part_record(part: dict[str, Any]) -> dict[str, Any]:
    """What the sidecar keeps of one backbone; a user ONNX model also gets its file, sha256 and wrap settings
    (``user_onnx``), so that predict and explain can register it again in another process."""

    record = {k: part[k] for k in ("backbone", "input_size", "weights_sha256", "onnx_sha256", "precision",
                                   "int8_sample_digest") if k in part}
    user_model = saved_record(str(part["backbone"]))
    if user_model is not None:
        record["user_onnx"] = user_model
    return record


def read_head_info(path: str | Path) -> dict[str, Any]:
    """The plain-data sidecar of a saved head (no code runs)."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if not path.is_file():
        raise CxrError(f"{path}: no such model file")
    if not sidecar.is_file():
        raise CxrError(f"{path}: no {sidecar.name} beside it; only heads saved by cxr-transfer (compare `save`) "
                       f"are loaded, since loading a joblib file runs code")
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CxrError(f"{sidecar}: not a readable head description ({type(exc).__name__}: {exc})") from None
    if not isinstance(info, dict) or info.get("format") not in (FORMAT, OLD_FORMAT):
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise CxrError(f"{sidecar}: not a cxr-transfer head description (format {found!r})")
    info = _current_names(info)
    problem = _sidecar_problem(info, info["format"])
    if problem:
        raise CxrError(f"{sidecar}: malformed head description: {problem}; save the head again with compare `save`")
    return info


def refuse_incomplete_run(path: str | Path) -> None:
    """CxrError when the head ``path`` lies in a run folder that still holds its in-progress marker (the run was
    killed or interrupted while saving, or is still running): its heads and record may be partial."""
    incomplete = incomplete_run(Path(path).parent)
    if incomplete:
        raise CxrError(f"{path}: refused, {incomplete}")


def _current_names(description: dict[str, Any]) -> dict[str, Any]:
    """``description`` (a sidecar, or the copy inside the joblib file) with each backbone's fields under their
    current names (``RENAMED_KEYS``)."""
    parts = description.get("backbones")
    if not isinstance(parts, list):
        return description
    return {**description, "backbones": [{RENAMED_KEYS.get(k, k): v for k, v in part.items()}
                                         if isinstance(part, dict) else part for part in parts]}


def _sidecar_problem(info: dict[str, Any], form: str = FORMAT) -> str | None:
    """What is wrong with a sidecar's fields (None when every field predict needs is well formed); the format
    2 sidecar must record each backbone's precision, the old one defaults to float32."""
    if not isinstance(info.get("joblib_sha256"), str) or len(info["joblib_sha256"]) != 64:
        return "joblib_sha256 must be a 64-character sha256"
    names = info.get("class_names")
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n for n in names):
        return f"class_names must list at least two class names, got {names!r} instead"
    if len(set(names)) != len(names):
        return f"class_names must name each class once, got {names!r} instead"
    parts = info.get("backbones")
    if not isinstance(parts, list) or not parts:
        return "backbones must list the backbones the head was trained on"
    for part in parts:
        if not isinstance(part, dict) or not isinstance(part.get("backbone"), str) or \
                not isinstance(part.get("weights_sha256"), str):
            return "each backbone needs its name and weights_sha256"
        name = part["backbone"]
        size = part.get("input_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            return f"input_size of {name} must be a positive whole number, got {size!r} instead"
        if "onnx_sha256" in part and not isinstance(part["onnx_sha256"], str):
            return f"onnx_sha256 of {name} must be a sha256, got {part['onnx_sha256']!r} instead"
        if "precision" not in part and form == FORMAT:
            return f"precision of {name} is missing (the head must record {' or '.join(PRECISIONS)})"
        precision = part.get("precision", "float32")
        if precision not in PRECISIONS:
            return f"precision of {name} must be {' or '.join(PRECISIONS)}, got {precision!r} instead"
        digest = part.get("int8_sample_digest")
        if precision == "int8" and (not isinstance(digest, str) or not digest):
            return f"int8_sample_digest of {name} is missing: an int8 head must record its int8 sample"
        if precision == "float32" and digest is not None:
            return f"int8_sample_digest of {name} is set, but its precision is float32"
    return None


def _differences(saved: Any, here: Any, name: str) -> list[str]:
    """Each field where the sidecar (``here``) differs from the description saved in the joblib file."""
    if isinstance(saved, dict) and isinstance(here, dict):
        return [found for key in sorted(set(saved) | set(here))
                for found in _differences(saved.get(key), here.get(key), f"{name}.{key}")]
    if isinstance(saved, list) and isinstance(here, list) and len(saved) == len(here) and \
            any(isinstance(v, (dict, list)) for v in saved + here):
        return [found for i, (a, b) in enumerate(zip(saved, here)) for found in _differences(a, b, f"{name}[{i}]")]
    return [] if saved == here else [f"{name} is {here!r} here but was {saved!r} when saved"]


def _check_classes(model: Any, info: dict[str, Any], sidecar: Path) -> None:
    """Every class the model predicts has a name (an edited old-format sidecar may have too few)."""
    names = info["class_names"]
    classes = getattr(model, "classes_", None)
    if classes is None:
        return
    if len(classes) > len(names) or any(int(c) != i for i, c in enumerate(classes)):
        raise CxrError(f"{sidecar}: class_names lists {len(names)} classes ({', '.join(names)}) but the model "
                       f"predicts {len(classes)}; refusing an edited description (save the head again)")


def load_head(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(fitted pipeline, info) after checking the joblib file is byte for byte the one saved and that the
    sidecar's fields are the ones saved inside it (format 2)."""
    info = read_head_info(path)
    actual = sha256_file(path)
    if actual != info["joblib_sha256"]:
        raise CxrError(f"{path}: sha256 {actual[:12]}... differs from the {info['joblib_sha256'][:12]}... recorded "
                       f"when cxr-transfer saved it; refusing to load a changed file")
    payload = joblib.load(path)
    sidecar = Path(path).with_suffix(".json")
    if info["format"] == OLD_FORMAT:
        if isinstance(payload, dict) and payload.get("format") == FORMAT or not hasattr(payload, "predict_proba"):
            raise CxrError(f"{sidecar}: format {OLD_FORMAT!r} does not match what {Path(path).name} holds "
                           f"(a {FORMAT!r} head or no model); refusing an edited description, save the head again")
        model = payload
    else:
        if not isinstance(payload, dict) or payload.get("format") != FORMAT or \
                not isinstance(payload.get("description"), dict) or "model" not in payload:
            raise CxrError(f"{path}: not a head saved by cxr-transfer in format {FORMAT}")
        saved = _current_names(payload["description"])
        found = [text for field in DESCRIBED for text in _differences(saved.get(field), info.get(field), field)]
        if found:
            raise CxrError(f"{sidecar}: {'; '.join(found)} (the copy inside {Path(path).name} is hashed); "
                           f"refusing an edited description, save the head again")
        model = payload["model"]
    _check_classes(model, info, sidecar)
    return model, info


MODEL_JSON = "model.json"
"""The description of a fine-tuned model in its run folder (written by ``finetune.export``)."""


@dataclass(frozen=True)
class SavedHead:
    """A head saved by ``compare --save`` / ``validate --save``, loaded by ``load_head`` (checked)."""

    path: Path
    model: Any                 # the fitted pipeline
    info: dict[str, Any]       # its sidecar


@dataclass(frozen=True)
class SavedFinetuned:
    """A fine-tuned model: its ``MODEL_JSON`` (checked by ``read_finetune_info``); the model files are checked
    against their recorded sha256 when used (``checked_file``)."""

    info_path: Path
    info: dict[str, Any]

    @property
    def input_size(self) -> int:
        return int(self.info["input_size"])

    @property
    def class_names(self) -> list[str]:
        return list(self.info["class_names"])

    def checked_file(self, kind: str) -> Path:
        """The run folder's ``kind`` file ("onnx" or "keras"), after checking it is byte for byte the one saved."""
        if kind not in ("onnx", "keras"):
            raise ValueError(f"kind must be 'onnx' or 'keras', got {kind!r} instead")
        name = self.info.get(f"{kind}_file")
        if not name:
            what = "an ONNX export" if kind == "onnx" else "a Keras model file"
            raise CxrError(f"{self.info_path}: not a fine-tuned model with {what}")
        path = self.info_path.parent / name
        if not path.is_file() or sha256_file(path) != self.info[f"{kind}_sha256"]:
            raise CxrError(f"{path}: missing or changed since it was saved (sha256 differs from "
                           f"{self.info_path.name})")
        return path

    def onnx_probabilities(self, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
        """``proba(pixels)``: the model.onnx (checked) in one onnxruntime session with ``threads`` intra-op
        threads; RGB pixels (N, input_size, input_size, 3) in [0, 255] -> float32 (N, classes)."""
        session = open_session(self.checked_file("onnx"), threads)
        name = session.get_inputs()[0].name

        def proba(pixels: np.ndarray) -> np.ndarray:
            return session.run(None, {name: np.asarray(pixels, np.float32)})[0]

        return proba


def finetuned_model_json(model_path: str | Path) -> Path | None:
    """``MODEL_JSON`` of a fine-tuned model given as its run folder, model.json or model.onnx; None for anything
    else (a saved head); CxrError when the fine-tuned model's description is not there."""
    path = Path(model_path)
    if path.suffix == ".keras":
        raise CxrError(f"{model_path}: a Keras model file is not loaded directly; give its finetune run folder "
                       f"({path.parent}) or its model.onnx")
    candidate = path / MODEL_JSON if path.is_dir() else path.with_name(MODEL_JSON)
    if path.is_dir() or path.suffix == ".onnx" or path.name == MODEL_JSON:
        if not candidate.is_file():
            raise CxrError(f"{model_path}: no {MODEL_JSON} found (give a finetune run folder or a .joblib head)")
        return candidate
    return None


def load_saved_model(path: str | Path, own_run: bool = False) -> SavedHead | SavedFinetuned:
    """A saved head (``NAME.joblib``: refused in a run that did not finish, then ``load_head``) or a fine-tuned
    model (its run folder, model.json or model.onnx: ``read_finetune_info``); CxrError naming the file when
    it is refused. ``own_run``: the caller is writing that run itself (validate's explain reads the heads it
    has just saved, before its in-progress marker goes)."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__} instead")
    info_path = finetuned_model_json(path)
    if info_path is not None:
        return SavedFinetuned(info_path, read_finetune_info(info_path))
    if not own_run:
        refuse_incomplete_run(path)
    model, info = load_head(path)   # its sidecar's fields checked against the hashed file first
    return SavedHead(Path(path), model, info)


def read_finetune_info(path: str | Path) -> dict[str, Any]:
    """The model.json of a fine-tuned model (``finetune.export``), checked field by field: CxrError naming the
    file and the field when it is not JSON, not a fine-tuned model's description, or a field is malformed."""
    path = Path(path)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CxrError(f"{path}: not a readable fine-tuned model description ({type(exc).__name__}: {exc})") from None
    if not isinstance(info, dict) or info.get("kind") != "finetune":
        found = info.get("kind") if isinstance(info, dict) else type(info).__name__
        raise CxrError(f"{path}: not a fine-tuned model description (kind {found!r}, expected 'finetune')")
    problem = _finetune_problem(info)
    if problem:
        raise CxrError(f"{path}: malformed fine-tuned model description: {problem}; run finetune again")
    recorded = info.get("description_sha256")      # absent in model.json files written before it existed
    if recorded is not None and recorded != finetune_description_digest(info):
        raise CxrError(f"{path}: its fields were edited since the model was saved (description_sha256 does not "
                       f"match {', '.join(FINETUNE_DESCRIBED)}); run finetune again or restore the file")
    return info


FINETUNE_DESCRIBED = ("model", "backbone", "input_size", "class_names", "weights_sha256", "keras_sha256",
                      "onnx_sha256")
"""model.json fields that change a fine-tuned model's result, covered by its ``description_sha256``."""


def finetune_description_digest(info: dict[str, Any]) -> str:
    """The sha256 over a fine-tuned model's result-changing fields (``FINETUNE_DESCRIBED``), written into
    model.json at save time and checked by ``read_finetune_info``: an edited class name or input size is refused."""
    fields = {name: info.get(name) for name in FINETUNE_DESCRIBED}
    return sha256_bytes(json.dumps(fields, sort_keys=True, ensure_ascii=True).encode("ascii"))


def _finetune_problem(info: dict[str, Any]) -> str | None:
    size = info.get("input_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        return f"input_size must be a positive whole number, got {size!r} instead"
    names = info.get("class_names")
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n for n in names):
        return f"class_names must list at least two class names, got {names!r} instead"
    if len(set(names)) != len(names):
        return f"class_names must name each class once, got {names!r} instead"
    if not isinstance(info.get("backbone"), str):
        return f"backbone must be a backbone name, got {info.get('backbone')!r} instead"
    for kind in ("onnx", "keras"):
        file, digest = info.get(f"{kind}_file"), info.get(f"{kind}_sha256")
        if file is not None and (not isinstance(file, str) or not file or Path(file).name != file):
            return f"{kind}_file must be a file name in the run folder, got {file!r} instead"
        if file is not None and (not isinstance(digest, str) or len(digest) != 64):
            return f"{kind}_sha256 must be the 64-character sha256 of {file}, got {digest!r} instead"
    return None
