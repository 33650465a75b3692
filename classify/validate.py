"""``cli.py validate``: can a head trained on TRAIN be trusted on someone else's X-rays?

For every backbone and head:
- **internal**: out-of-fold probabilities of a patient-grouped k-fold cross-validation of TRAIN (the
  ``train/`` split when there is one); groups are patient ids merged over the audit's duplicate clusters;
- **external**: the head fitted on all of TRAIN, applied to every image of EXT (never trained or tuned on);
- accuracy, per-class sensitivity / specificity, macro F1 and one-vs-rest AUC, each with a 95% patient-cluster
  bootstrap interval (``classify.bootstrap``), and the external - internal gap with its interval;
- **subgroups** of EXT (any column of its manifest or CSV): n, accuracy with a Wilson interval, sensitivity
  per class, conformal coverage; a subgroup whose interval lies wholly below the internal accuracy is flagged;
- **calibration** (``classify.calibration``): ECE, Brier score and reliability diagrams, internal and external,
  and with ``calibrate`` the same after sigmoid / isotonic recalibration on grouped folds of TRAIN only;
- **conformal sets** (``classify.conformal``, MAPIE cross-conformal on TRAIN only): coverage and mean set
  size internally (nested, so measured on images the calibration never saw) and externally, per class and
  per subgroup.

A run folder like compare's (written by ``classify.validate_report``): report.md (verdict first),
results.json, results.csv, accuracy.png, reliability.png, external_predictions.csv, record.json, and with
``save`` one ``<backbone>-<head>.joblib`` per model that ``predict`` loads (``--conformal ALPHA`` adds the
prediction set).
"""
from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from threadpoolctl import threadpool_limits

from cxr_transfer.classify.bootstrap import (
    DEFAULT_N_BOOT,
    bootstrap_metrics,
    gap_intervals,
    intervals,
    wilson_interval,
)
from cxr_transfer.classify.calibration import (
    CALIBRATION_METHODS,
    calibrated_head,
    calibration_summary,
)
from cxr_transfer.classify.conformal import ConformalHead, fit_conformal, nested_sets, prediction_sets, set_summary
from cxr_transfer.classify.duplicate_groups import duplicate_aware_groups
from cxr_transfer.classify.heads import make_head, parse_head_list
from cxr_transfer.classify.protocols import Split, cv_splits, resolve_groups
from cxr_transfer.classify.results import images_fingerprint
from cxr_transfer.classify.validate_report import verdict_lines, write_external_predictions, write_report
from cxr_transfer.core.cache_keys import dataset_cache_id
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.outputs import new_run_dir
from cxr_transfer.core.record import Stopwatch, run_record, write_json
from cxr_transfer.extract.dataset import MANIFEST_NAME, Dataset, load_dataset
from cxr_transfer.extract.pipeline import ExtractSettings, align_feature_sets, load_features

DUPLICATE_RULE_BACKBONE = "vgg16"
"""The audit's duplicate rule was calibrated on VGG16 embeddings: only those confirm a pHash match."""


@dataclass(frozen=True)
class ValidateSettings:
    """What validate fits, on what, and how it measures (see the module docstring)."""

    data: Path
    external: Path
    extract: ExtractSettings = field(default_factory=ExtractSettings)
    backbones: str = "vgg16"
    heads: str = "logreg"
    group_by: str | None = None        # None: patient_id when TRAIN has patient ids, else single images
    merge_duplicates: bool = True      # keep each near-duplicate cluster of TRAIN in one group
    subgroups: str = ""                # comma list of EXT manifest columns
    alpha: float = 0.1                 # conformal miscoverage
    calibrate: str | None = None       # "sigmoid" | "isotonic"
    folds: int = 5
    n_boot: int = DEFAULT_N_BOOT
    seed: int = 0
    save: bool = False
    explain: int = 0                   # heatmaps of the N most confident external errors (0: none)
    out_dir: Path = Path("runs")
    run_name: str | None = None
    n_jobs: int = -1

    def __post_init__(self) -> None:
        if self.calibrate is not None and self.calibrate not in CALIBRATION_METHODS:
            raise CxrError(f"--calibrate takes {' or '.join(CALIBRATION_METHODS)}, got '{self.calibrate}' instead")
        if not 0.0 < float(self.alpha) < 1.0:
            raise CxrError(f"--alpha (the miscoverage) must be between 0 and 1, got {self.alpha} instead")
        if self.folds < 2:
            raise CxrError(f"--folds must be at least 2, got {self.folds} instead")
        if self.explain < 0:
            raise CxrError(f"--explain takes a number of images (0: none), got {self.explain} instead")
        if self.n_boot < 100:
            raise CxrError(f"--n-boot must be at least 100 for a 95% interval, got {self.n_boot} instead")

    @property
    def subgroup_columns(self) -> list[str]:
        return [c.strip() for c in self.subgroups.split(",") if c.strip()]

    def record(self) -> dict[str, Any]:
        return {"data": str(self.data), "external": str(self.external), "extract": self.extract.record(),
                "backbones": self.backbones, "heads": self.heads, "group_by": self.group_by,
                "merge_duplicates": self.merge_duplicates, "subgroups": self.subgroups, "alpha": self.alpha,
                "calibrate": self.calibrate, "folds": self.folds, "n_boot": self.n_boot, "seed": self.seed,
                "save": self.save, "explain": self.explain}


@dataclass
class ValidateRun:
    """A finished validation: its folder, the per-model results and the verdict lines."""

    run_dir: Path
    class_names: list[str]
    models: list[dict[str, Any]]
    verdict: list[str]
    notes: list[str]


# ---------------------------------------------------------------------------------------------- data


def _training_pool(dataset: Dataset) -> Dataset:
    """TRAIN's ``train/`` split when it has one, else every image."""
    return dataset.subset("train") if any(s.split == "train" for s in dataset.samples) else dataset


def read_columns(source: Path, dataset: Dataset) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Extra per-image columns of a dataset: its manifest.csv (folder) or the CSV itself, keyed by the path
    relative to the dataset root. Returns (column names, {relative path: {column: value}})."""
    source = Path(source).expanduser().resolve()
    table = source if source.is_file() else source / MANIFEST_NAME
    if not table.is_file():
        return [], {}
    with open(table, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c for c in (reader.fieldnames or []) if c != "path"]
        rows = {}
        for row in reader:
            path = Path(row.get("path") or "")
            absolute = path if path.is_absolute() else table.parent / path
            try:
                key = absolute.resolve().relative_to(dataset.root).as_posix()
            except ValueError:
                key = str(absolute)
            rows[key] = {c: (row.get(c) or "") for c in columns}
    return columns, rows




# ---------------------------------------------------------------------------------------------- fitting


def _fit_part(backbone: str, head: str, part: int | None, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None,
              outer: list[Split], X_ext: np.ndarray, settings: ValidateSettings, n_classes: int) -> dict[str, Any]:
    """One task of a worker process: ``part`` = k fits on outer fold k's training side and predicts its test
    side (head, recalibrated head, nested conformal sets); ``part`` = None fits on all of TRAIN and predicts
    EXT. Small tasks keep both cores busy when the heads' costs differ tenfold."""
    started = time.perf_counter()
    seed, folds, method = settings.seed, settings.folds, settings.calibrate
    out: dict[str, Any] = {"backbone": backbone, "head": head, "part": part}
    with threadpool_limits(1):
        if part is not None:
            split = outer[part]
            train, test = split.train_idx, split.test_idx
            out["rows"] = test
            out["internal_proba"] = make_head(head, seed).fit(X[train], y[train]).predict_proba(X[test])
            if method:
                inner = _inner_splits(y[train], groups[train] if groups is not None else None, folds, seed)
                model = calibrated_head(head, method, inner, seed).fit(X[train], y[train])
                out["internal_calibrated"] = model.predict_proba(X[test])
            sets = nested_sets(head, X, y, n_classes, settings.alpha, [split], groups, folds, seed)
            out["internal_sets"] = sets[test]
        else:
            final = make_head(head, seed).fit(X, y)
            out["external_proba"] = final.predict_proba(X_ext)
            if method:
                model = calibrated_head(head, method, _inner_splits(y, groups, folds, seed), seed).fit(X, y)
                out["external_calibrated"] = model.predict_proba(X_ext)
            conformal = fit_conformal(head, X, y, settings.alpha, groups, folds, seed)
            out["external_sets"] = prediction_sets(conformal, X_ext)
            if settings.save or settings.explain:
                out["saved_model"] = ConformalHead(final, conformal, settings.alpha)
    out["seconds"] = time.perf_counter() - started
    return out


def _assemble(parts: list[dict[str, Any]], n_images: int, n_classes: int) -> list[dict[str, Any]]:
    """Per (backbone, head): the out-of-fold arrays put together from the fold tasks, the final task's
    external predictions, and the summed seconds of its tasks."""
    models: dict[tuple[str, str], dict[str, Any]] = {}
    for part in parts:
        model = models.setdefault((part["backbone"], part["head"]), {
            "backbone": part["backbone"], "head": part["head"], "seconds": 0.0,
            "internal_proba": np.zeros((n_images, n_classes)), "internal_sets": np.zeros((n_images, n_classes), bool)})
        model["seconds"] += part["seconds"]
        if part["part"] is None:
            model.update({k: v for k, v in part.items() if k.startswith(("external", "saved"))})
            continue
        rows = part["rows"]
        model["internal_proba"][rows] = part["internal_proba"]
        model["internal_sets"][rows] = part["internal_sets"]
        if "internal_calibrated" in part:
            model.setdefault("internal_calibrated", np.zeros((n_images, n_classes)))[rows] = part["internal_calibrated"]
    return list(models.values())


def _inner_splits(y: np.ndarray, groups: np.ndarray | None, folds: int, seed: int) -> list[tuple]:
    return [(s.train_idx, s.test_idx) for s in cv_splits(y, folds, 1, seed, groups)]


# ---------------------------------------------------------------------------------------------- scoring


def _subgroup_rows(y_ext: np.ndarray, proba: np.ndarray, sets: np.ndarray, values: list[str], column: str,
                   class_names: list[str]) -> list[dict[str, Any]]:
    """One row per subgroup value (all classes) and per (value, class): n, accuracy with Wilson interval,
    sensitivity per class, conformal coverage and mean set size."""
    pred = proba.argmax(axis=1)
    values_array = np.array(values)
    rows = []
    for value in sorted(set(values)):
        in_value = values_array == value
        for class_index in [None, *range(len(class_names))]:
            mask = in_value if class_index is None else in_value & (y_ext == class_index)
            n = int(mask.sum())
            if n == 0:
                continue
            correct = int((pred[mask] == y_ext[mask]).sum())
            low, high = wilson_interval(correct, n)
            class_name = "all" if class_index is None else class_names[class_index]
            row = {"column": column, "value": value, "class": class_name, "n": n, "accuracy": correct / n,
                   "ci_low": low, "ci_high": high}
            for k, name in enumerate(class_names):
                positives = mask & (y_ext == k)
                row[f"sensitivity_{name}"] = float((pred[positives] == k).mean()) if positives.any() else None
                row[f"n_{name}"] = int(positives.sum())
            summary = set_summary(sets[mask], y_ext[mask])
            row["coverage"], row["mean_set_size"] = summary["coverage"], summary["mean_size"]
            rows.append(row)
    return rows


def _score(fitted: dict[str, Any], y: np.ndarray, clusters: np.ndarray | None, y_ext: np.ndarray,
           ext_clusters: np.ndarray | None, subgroup_values: dict[str, list[str]], class_names: list[str],
           settings: ValidateSettings) -> dict[str, Any]:
    """Metrics with intervals, calibration, conformal coverage and subgroups for one fitted model."""
    n_boot, seed = settings.n_boot, settings.seed
    point_int, reps_int = bootstrap_metrics(y, fitted["internal_proba"], class_names, clusters, n_boot, seed)
    point_ext, reps_ext = bootstrap_metrics(y_ext, fitted["external_proba"], class_names, ext_clusters, n_boot,
                                            seed + 1)
    result: dict[str, Any] = {
        "backbone": fitted["backbone"], "head": fitted["head"], "seconds": round(fitted["seconds"], 2),
        "internal": {"n": len(y), "metrics": intervals(point_int, reps_int),
                     "calibration": calibration_summary(y, fitted["internal_proba"])},
        "external": {"n": len(y_ext), "metrics": intervals(point_ext, reps_ext),
                     "calibration": calibration_summary(y_ext, fitted["external_proba"])},
        "gap": gap_intervals(point_int, reps_int, point_ext, reps_ext),
    }
    if "internal_calibrated" in fitted:
        result["calibrated"] = {
            "method": settings.calibrate,
            "internal": calibration_summary(y, fitted["internal_calibrated"]),
            "external": calibration_summary(y_ext, fitted["external_calibrated"]),
            "internal_accuracy": float((fitted["internal_calibrated"].argmax(1) == y).mean()),
            "external_accuracy": float((fitted["external_calibrated"].argmax(1) == y_ext).mean())}
    conformal = {"alpha": settings.alpha}
    for where, sets, labels in (("internal", fitted["internal_sets"], y), ("external", fitted["external_sets"], y_ext)):
        conformal[where] = set_summary(sets, labels)
        conformal[where]["per_class"] = {name: set_summary(sets[labels == k], labels[labels == k])
                                         for k, name in enumerate(class_names)}
        covered = conformal[where]["covered"]
        conformal[where]["ci_low"], conformal[where]["ci_high"] = wilson_interval(covered, len(labels))
    result["conformal"] = conformal
    result["subgroups"] = {column: _subgroup_rows(y_ext, fitted["external_proba"], fitted["external_sets"], values,
                                                  column, class_names)
                           for column, values in subgroup_values.items()}
    return result


def _flags(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Subgroup rows whose accuracy interval lies wholly below the model's internal accuracy."""
    flagged = []
    for m in models:
        internal = m["internal"]["metrics"]["accuracy"]["value"]
        for column, rows in m["subgroups"].items():
            for row in rows:
                if row["ci_high"] < internal:
                    flagged.append({"model": f"{m['backbone']}+{m['head']}", "internal_accuracy": internal, **row})
    return flagged


# ---------------------------------------------------------------------------------------------- run


def _json_safe(value: Any) -> Any:
    """``value`` with every nan (an undefined metric) as None, so results.json is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _mapie_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("mapie")
    except metadata.PackageNotFoundError:
        return "?"


def run_validate(settings: ValidateSettings) -> ValidateRun:
    """Fit, evaluate internally and externally, and write the run folder (module docstring)."""
    from cxr_transfer.classify.saved_model import save_head
    from cxr_transfer.extract.registry import parse_backbone_list

    watch = Stopwatch()
    configs = parse_backbone_list(settings.backbones)
    heads = parse_head_list(settings.heads)
    notes: list[str] = []
    full = load_dataset(settings.data)
    pool = _training_pool(full)
    external = load_dataset(settings.external)
    class_names = list(pool.class_names)
    unknown = sorted(set(external.class_names) - set(class_names))
    if unknown:
        raise CxrError(f"{external.root}: classes {', '.join(unknown)} are not among TRAIN's classes "
                       f"({', '.join(class_names)})")
    columns, extra = read_columns(settings.external, external)
    subgroup_columns = []
    for column in settings.subgroup_columns:
        if column in columns or column in ("label", "split"):
            subgroup_columns.append(column)
        else:
            notes.append(f"EXT has no column '{column}' (columns found: {', '.join(columns) or 'none'}); "
                         f"no subgroup table for it")
    group_by = settings.group_by or ("patient_id" if pool.has_groups else None)
    if group_by is None:
        notes.append("TRAIN has no patient ids: folds and bootstrap treat every image as its own patient")
    resolve_groups(pool, group_by, merge_duplicates=False)  # fail before extracting when grouping cannot work

    features, ext_features, extraction = {}, {}, {}
    for config in configs:
        extract = settings.extract.with_backbone(config.name)
        features[config.name], result = load_features(full, extract)
        ext_features[config.name], ext_result = load_features(external, extract)
        extraction[config.name] = {"cache": str(result.cache_path), "external_cache": str(ext_result.cache_path),
                                   "weights": result.weights.describe(), "weights_sha256": result.weights.sha256,
                                   "onnx_sha256": result.onnx_sha256, "input_size": features[config.name].attrs.get(
                                       "input_size"), "skipped": result.failures + ext_result.failures}
    watch.lap("read_and_embed")
    samples, arrays = align_feature_sets(features, {s.sha256 for s in pool.samples})
    ext_samples, ext_arrays = align_feature_sets(ext_features)
    index = {name: i for i, name in enumerate(class_names)}
    y = np.array([index[s.label] for s in samples])
    y_ext = np.array([index[s.label] for s in ext_samples])
    train = Dataset(pool.root, samples, class_names, pool.has_groups)

    clusters = groups = None
    merged: list[str] = []
    if group_by:
        groups = resolve_groups(train, group_by, merge_duplicates=False)
        clusters = groups
        if settings.merge_duplicates:
            vgg = arrays.get(DUPLICATE_RULE_BACKBONE)
            embeddings = {s.sha256: vgg[i] for i, s in enumerate(samples)} if vgg is not None else None
            hash_cache = Path(settings.extract.cache_dir) / dataset_cache_id(full.root) / _hash_cache_name()
            found = duplicate_aware_groups(train, groups, embeddings, hash_cache)
            groups = clusters = found.groups
            merged = found.merged
            if merged:
                notes.append(f"{len(merged)} group(s) joined patients that share a near-duplicate radiograph "
                             f"(audit rule{'' if embeddings else ', pHash alone'}): {'; '.join(merged[:5])}"
                             + (" ..." if len(merged) > 5 else ""))
    watch.lap("groups_and_duplicates")
    outer = cv_splits(y, settings.folds, 1, settings.seed, groups)
    ext_clusters = np.array([s.group for s in ext_samples]) if external.has_groups and all(
        s.group for s in ext_samples) else None
    ext_extra = [extra.get(external.relative(s), {}) for s in ext_samples]
    subgroup_values = {}
    for column in subgroup_columns:
        if column == "label":
            subgroup_values[column] = [s.label for s in ext_samples]
        elif column == "split":
            subgroup_values[column] = [s.split or "-" for s in ext_samples]
        else:
            subgroup_values[column] = [row.get(column) or "(missing)" for row in ext_extra]

    tasks = [(backbone, head, part) for backbone in arrays for head in heads for part in [None, *range(len(outer))]]
    parts = Parallel(n_jobs=settings.n_jobs)(
        delayed(_fit_part)(backbone, head, part, arrays[backbone], y, groups, outer, ext_arrays[backbone], settings,
                           len(class_names))
        for backbone, head, part in tasks)
    fitted = _assemble(parts, len(y), len(class_names))
    watch.lap("fit")
    models = Parallel(n_jobs=settings.n_jobs)(
        delayed(_score)({k: v for k, v in f.items() if k != "saved_model"}, y, clusters, y_ext, ext_clusters,
                        subgroup_values, class_names, settings)
        for f in fitted)
    watch.lap("bootstrap_and_scores")
    flagged = _flags(models)
    verdict = verdict_lines(models, flagged, settings)

    run_dir = new_run_dir(settings.out_dir, "validate", settings.run_name)
    record = run_record("validate", settings.record(), seed=settings.seed, train_root=str(pool.root),
                        train_note=", train/ split" if pool is not full else "", n_train=len(samples),
                        train_fingerprint=images_fingerprint([s.sha256 for s in samples]),
                        external_root=str(external.root), n_external=len(ext_samples),
                        external_fingerprint=images_fingerprint([s.sha256 for s in ext_samples]),
                        grouping=(f"{group_by}" + (" merged over near-duplicate clusters"
                                                   if settings.merge_duplicates else "")) if group_by else "image",
                        internal_clusters="patients" if clusters is not None else "images",
                        external_clusters="patients" if ext_clusters is not None else "images",
                        merged_groups=merged, mapie=_mapie_version(), extraction=extraction, timings=watch.timings,
                        seconds=watch.elapsed())
    if settings.save or settings.explain:   # explain needs the heads on disk
        record["saved_models"] = []
        for f in fitted:
            path = save_head(run_dir / f"{f['backbone']}-{f['head']}.joblib", f["saved_model"], class_names,
                             [{"backbone": f["backbone"], **extraction[f["backbone"]]}],
                             {"trained_on": record["train_fingerprint"], "n_train": len(y), "head": f["head"],
                              "seed": settings.seed, "dataset": str(pool.root), "conformal_alpha": settings.alpha})
            record["saved_models"].append(str(path))
    if settings.explain:
        record["explain"] = explain_errors(run_dir, fitted, models, ext_samples, y_ext, class_names, settings)
    write_json(run_dir / "record.json", record)
    write_json(run_dir / "results.json", _json_safe({"kind": "validate", "class_names": class_names,
                                                     "record": record, "verdict": verdict, "notes": notes,
                                                     "flagged_subgroups": flagged, "models": models}))
    write_external_predictions(run_dir / "external_predictions.csv", [external.relative(s) for s in ext_samples],
                               [s.label for s in ext_samples], subgroup_values, fitted, class_names)
    write_report(run_dir, models, verdict, notes, class_names, record, settings)
    if settings.explain:
        with open(run_dir / "report.md", "a", encoding="utf-8") as handle:
            handle.write("\n" + explain_section(record["explain"]) + "\n")
    return ValidateRun(run_dir, class_names, models, verdict, notes)


LINEAR_HEADS = ("logreg", "linsvm")
"""Heads whose heatmaps are exact class activation maps (cheap); others need occlusion (64 passes per image)."""


def explain_errors(run_dir: Path, fitted: list[dict[str, Any]], models: list[dict[str, Any]], ext_samples: list,
                   y_ext: np.ndarray, class_names: list[str], settings: ValidateSettings) -> dict[str, Any]:
    """``--explain N``: a sheet of the N most confident external errors of one model, with heatmaps, and the
    mean share of positive evidence in the border region per true class over every external image.

    The model: the linear head (exact CAM) with the best external accuracy, else the best model (occlusion).
    """
    from cxr_transfer.explain.explainers import load_explainer
    from cxr_transfer.explain.run import explanation_sheet, iter_explanations, mean_shares

    accuracy = {(m["backbone"], m["head"]): m["external"]["metrics"]["accuracy"]["value"] for m in models}
    linear = [f for f in fitted if f["head"] in LINEAR_HEADS]
    chosen = max(linear or fitted, key=lambda f: accuracy[(f["backbone"], f["head"])])
    name = f"{chosen['backbone']}+{chosen['head']}"
    model_path = run_dir / f"{chosen['backbone']}-{chosen['head']}.joblib"
    extract = settings.extract.with_backbone(chosen["backbone"])
    proba = chosen["external_proba"]
    predicted = proba.argmax(axis=1)
    errors = [i for i in np.argsort(-proba.max(axis=1), kind="stable") if predicted[i] != y_ext[i]]
    shown = errors[:settings.explain]
    result: dict[str, Any] = {"model": name, "why": "linear head with the best external accuracy (exact CAM)"
                              if linear else "best external accuracy (no linear head: occlusion)",
                              "n_errors": len(errors), "shown": []}
    if shown:
        sheet, explained = explanation_sheet(
            [ext_samples[i].path for i in shown], model_path, run_dir / "explain-errors.png",
            captions=[f"true {class_names[y_ext[i]]}: {Path(ext_samples[i].path).name[:28]}" for i in shown],
            settings=extract)
        result["sheet"] = sheet.name
        result["shown"] = [{"path": str(ext_samples[i].path), "true": class_names[y_ext[i]],
                            "predicted": e.predicted, "probability": round(e.probability, 4),
                            "border_share": e.shares["border"]} for i, e in zip(shown, explained)]
    explainer = load_explainer(model_path, extract, "auto")
    external = Dataset(Path(os.path.commonpath([str(Path(s.path).parent) for s in ext_samples])),
                       list(ext_samples), list(class_names))
    skipped: list[tuple[str, str]] = []
    pairs = list(iter_explanations(external, explainer, extract, skipped))
    truth = {s.sha256: class_names[y] for s, y in zip(ext_samples, y_ext)}
    shares = mean_shares([e for e, _ in pairs], [truth[s.sha256] for _, s in pairs])
    result["method"] = explainer.method
    result["border_share_by_true_class"] = {k: {"mean": v[0], "n": v[1]} for k, v in shares.items()}
    return result


def explain_section(info: dict[str, Any]) -> str:
    """The report's heatmap section (``--explain N``)."""
    lines = ["## What the model looks at (`--explain`)", "",
             f"Model: {info['model']} ({info['why']}; method {info['method']}). "
             f"{len(info['shown'])} of its {info['n_errors']} external errors, most confident first:", ""]
    if info.get("sheet"):
        lines += [f"![most confident external errors]({info['sheet']})", ""]
    lines += ["| image | true | predicted | p | border share |", "|---|---|---|---|---|"]
    lines += [f"| {Path(r['path']).name} | {r['true']} | {r['predicted']} | {r['probability']:.2f} | "
              f"{r['border_share']:.0%} |" for r in info["shown"]]
    lines += ["", "Mean share of the positive evidence in the border frame (5 % of each side; 19 % by area), "
              "per true class, over every external image:", "", "| class | border share | images |", "|---|---|---|"]
    lines += [f"| {k} | {v['mean']:.1%} | {v['n']} |" for k, v in info["border_share_by_true_class"].items()]
    return "\n".join(lines)


def _hash_cache_name() -> str:
    from cxr_transfer.audit.duplicates import HASH_CACHE_NAME

    return HASH_CACHE_NAME
