"""The evidence behind an exported model, read from the run records that made it (nothing typed by hand).

``run_evidence`` finds the run that saved a head: the ``results.json`` beside the ``.joblib`` whose record lists
it among its saved models and whose training data fingerprint is the head's (a validate or a compare run), or a
fine-tuned model's run folder (its ``results.json``). ``audit_evidence`` reads the newest audit of the training
data (``audit.run.latest_audit_for``) or an audit folder given. Both return plain JSON-able dicts, used for the
exported file's ``evaluation`` property and for its model card.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cxr_transfer.audit.report import AUDIT_JSON
from cxr_transfer.audit.run import DEFAULT_RUNS_DIR, latest_audit_for
from cxr_transfer.classify.conformal import ConformalHead
from cxr_transfer.classify.results import images_fingerprint
from cxr_transfer.core.errors import CxrError
from cxr_transfer.extract.dataset import load_dataset

RESULTS_JSON = "results.json"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _interval(metric: dict[str, Any]) -> dict[str, float]:
    """A metric's value (or mean over splits) with its interval bounds and, for split means, std and n."""
    keys = ("value", "mean", "std", "ci_low", "ci_high", "n")
    return {k: metric[k] for k in keys if metric.get(k) is not None}


def run_evidence(model_path: str | Path, info: dict[str, Any], backbone: str, head: str,
                 model: Any = None) -> dict[str, Any] | None:
    """The evaluation of a saved head by the run that saved it (validate or compare), or None when its run
    folder's records are not beside it (a head copied elsewhere)."""
    model_path = Path(model_path)
    results = _read_json(model_path.parent / RESULTS_JSON)
    if not results or results.get("kind") not in ("validate", "compare"):
        return None
    record = results.get("record") or {}
    saved = {Path(str(p)).name for p in record.get("saved_models") or []}
    trained_on = (info.get("training") or {}).get("trained_on")
    fingerprint = record.get("train_fingerprint") or record.get("dataset_fingerprint")
    if model_path.name not in saved or (trained_on and fingerprint and trained_on != fingerprint
                                        and trained_on != record.get("evaluated_fingerprint")):
        return None
    base = {"kind": results["kind"], "run": str(model_path.parent.resolve()), "created": record.get("created"),
            "report": str((model_path.parent / "report.md").resolve()), "seed": record.get("seed")}
    if results["kind"] == "validate":
        return _validate_evidence(results, record, base, backbone, head, model)
    return _summary_evidence(results, record, base, backbone, head)


def _validate_evidence(results: dict[str, Any], record: dict[str, Any], base: dict[str, Any], backbone: str,
                       head: str, model: Any) -> dict[str, Any] | None:
    found = [m for m in results.get("models", []) if m.get("backbone") == backbone and m.get("head") == head]
    if not found:
        return None
    m, settings = found[0], record.get("settings") or {}
    internal, external = m["internal"], m["external"]
    metrics = {name: {"internal": _interval(internal["metrics"][name]),
                      "external": _interval(external["metrics"].get(name, {})),
                      "gap": _interval(m.get("gap", {}).get(name, {}))}
               for name in internal["metrics"]}
    conformal = m.get("conformal") or {}
    overlap = results.get("overlap") or {}
    return {**base,
            "train": {"root": record.get("train_root"), "n": record.get("n_train"),
                      "fingerprint": record.get("train_fingerprint"), "note": record.get("train_note", "")},
            "external": {"root": record.get("external_root"), "n": record.get("n_external"),
                         "fingerprint": record.get("external_fingerprint")},
            "internal_method": {"folds": settings.get("folds"), "grouping": record.get("grouping"),
                                "interval": internal.get("interval"), "n_boot": settings.get("n_boot"),
                                "units": record.get("internal_clusters")},
            "external_method": {"interval": external.get("interval"), "units": record.get("external_clusters")},
            "metrics": metrics,
            "calibration": {side: {k: (m[side].get("calibration") or {}).get(k) for k in ("ece", "brier")}
                            for side in ("internal", "external")},
            "conformal": {"alpha": conformal.get("alpha"),
                          "internal_coverage": (conformal.get("internal") or {}).get("coverage"),
                          "external_coverage": (conformal.get("external") or {}).get("coverage"),
                          "external_mean_set_size": (conformal.get("external") or {}).get("mean_size"),
                          **lac_threshold(model)} if conformal else None,
            "subgroups": m.get("subgroups") or {},
            "flagged_subgroups": [{k: row.get(k) for k in ("column", "value", "class", "n", "accuracy", "ci_low",
                                                           "ci_high")}
                                  for row in results.get("flagged_subgroups", [])
                                  if row.get("model") == f"{backbone}+{head}"],
            "overlap": {"identical": (overlap.get("identical") or {}).get("n"),
                        "near_duplicate": (overlap.get("near_duplicate") or {}).get("n"),
                        "shared_patients": (overlap.get("shared_patients") or {}).get("n"),
                        "excluded": (overlap.get("excluded") or {}).get("n")},
            "merged_groups": record.get("merged_groups") or [], "verdict": results.get("verdict") or []}


def lac_threshold(model: Any) -> dict[str, Any]:
    """The conformal threshold of a validate head (MAPIE's LAC quantile of the out-of-fold conformity scores of
    TRAIN): a class is in the set when its probability is at least ``1 - quantile``. Empty for other heads."""
    if not isinstance(model, ConformalHead):
        return {}
    quantiles = getattr(getattr(model.conformal, "_mapie_classifier", None), "quantiles_", None)  # MAPIE 1.x
    if quantiles is None or len(quantiles) != 1:
        return {}
    q = float(quantiles[0])
    return {"lac_quantile": q, "min_probability": 1.0 - q,
            "rule": "the set holds each class whose probability is at least min_probability (LAC, split form of "
                    "the cross-conformal threshold; predict --conformal with the .joblib gives MAPIE's sets)"}


def _summary_evidence(results: dict[str, Any], record: dict[str, Any], base: dict[str, Any], backbone: str,
                      head: str) -> dict[str, Any] | None:
    found = [s for s in results.get("summary", []) if s.get("backbone") == backbone and s.get("model") == head]
    if not found:
        return None
    summary = found[0]
    return {**base, "protocol": summary.get("protocol"), "n_evaluations": summary.get("n_evaluations"),
            "train": {"root": record.get("dataset_root"), "n": record.get("evaluated_images"),
                      "fingerprint": record.get("evaluated_fingerprint") or record.get("dataset_fingerprint")},
            "metrics": {k: _interval(v) for k, v in summary.items() if isinstance(v, dict) and "mean" in v}}


def finetune_evidence(run_dir: Path) -> dict[str, Any] | None:
    """The evaluation a finetune run folder records for its model (its ``results.json`` summary)."""
    results = _read_json(run_dir / RESULTS_JSON)
    if not results or results.get("kind") != "finetune" or not results.get("summary"):
        return None
    summary, record = results["summary"][0], results.get("record") or {}
    return {"kind": "finetune", "run": str(run_dir.resolve()), "created": record.get("created"),
            "report": str((run_dir / "report.md").resolve()), "seed": record.get("seed"),
            "protocol": summary.get("protocol"), "n_evaluations": summary.get("n_evaluations"),
            "train": {"root": record.get("dataset_root"), "n": record.get("evaluated_images"),
                      "fingerprint": record.get("evaluated_fingerprint") or record.get("dataset_fingerprint")},
            "metrics": {k: _interval(v) for k, v in summary.items() if isinstance(v, dict) and "mean" in v}}


def audit_evidence(audit: str | Path | None, train_root: str | None, fingerprint: str | None,
                   runs_dir: str | Path = DEFAULT_RUNS_DIR) -> dict[str, Any] | None:
    """The findings of an audit of the training data: ``audit`` (an audit folder or its audit.json), else the
    newest audit under ``runs_dir`` of the data at ``train_root`` when it still has ``fingerprint``; None when
    there is none. CxrError when a given ``audit`` is not an audit or audits other data."""
    if audit is not None:
        path = Path(audit)
        path = path / AUDIT_JSON if path.is_dir() else path
        payload = _read_json(path)
        if not payload or payload.get("kind") != "audit":
            raise CxrError(f"`audit`: {audit} is not an audit folder (no readable {AUDIT_JSON})")
        if fingerprint and payload["dataset"].get("fingerprint") != fingerprint:
            covered = set(payload["dataset"].get("sha256", []))
            if not covered or not _training_hashes(train_root, fingerprint) <= covered:
                raise CxrError(f"`audit`: {audit} audits other data than the model was trained on (dataset "
                               f"fingerprint {str(payload['dataset'].get('fingerprint'))[:12]}, training data "
                               f"{fingerprint[:12]})")
    else:
        folder = _latest_audit(train_root, fingerprint, runs_dir)
        if folder is None:
            return None
        path = folder / AUDIT_JSON
        payload = _read_json(path)
        if not payload:
            return None
    return _audit_summary(payload, path)


def _training_hashes(train_root: str | None, fingerprint: str) -> set[str]:
    dataset = _training_data(train_root, fingerprint)
    return {s.sha256 for s in dataset.samples} if dataset else set()


def _training_data(train_root: str | None, fingerprint: str | None):
    """The training images at ``train_root`` (its train/ split when it has one) while they still have the
    training fingerprint (``classify.results.images_fingerprint`` of their sha256, as compare and validate record
    it); None when the folder is gone or changed."""
    if not train_root or not fingerprint:
        return None
    try:
        dataset = load_dataset(train_root)
    except (CxrError, OSError):
        return None
    for candidate in (dataset, dataset.subset("train")):
        if fingerprint in (candidate.fingerprint, images_fingerprint([s.sha256 for s in candidate.samples])):
            return candidate
    return None


def _latest_audit(train_root: str | None, fingerprint: str | None, runs_dir: str | Path) -> Path | None:
    dataset = _training_data(train_root, fingerprint)
    return latest_audit_for(dataset, runs_dir) if dataset is not None else None


def _audit_summary(payload: dict[str, Any], path: Path) -> dict[str, Any]:
    duplicates, leakage = payload.get("duplicates") or {}, payload.get("leakage") or {}
    acquisition, pixels = payload.get("acquisition") or {}, payload.get("pixel_shortcuts") or {}
    scores = pixels.get("scores") or {}
    return {"audit": str(path.resolve()), "created": (payload.get("record") or {}).get("created"),
            "dataset": {k: (payload.get("dataset") or {}).get(k) for k in ("root", "n_images", "counts",
                                                                            "fingerprint")},
            "verdict": payload.get("verdict"), "findings": payload.get("findings") or [],
            "duplicates": {k: duplicates.get(k) for k in ("n_exact", "n_near", "n_near_cross_split",
                                                          "n_near_different_patient", "n_near_cross_label")},
            "leakage": {k: leakage.get(k) for k in ("checked", "reason", "n_patients", "n_leaked")},
            "acquisition": {k: acquisition.get(k) for k in ("accuracy", "balanced_accuracy", "chance", "shortcut",
                                                            "skipped")},
            "pixel_shortcuts": {"chance": pixels.get("chance"), "separable_without_lungs":
                                pixels.get("separable_without_lungs"), "skipped": pixels.get("skipped"),
                                "accuracy": {name: (s.get("accuracy") or {}).get("mean")
                                             for name, s in scores.items()}}}
