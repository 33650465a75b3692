"""Will it work on my X-rays? (``cxr.shift_check``): a shift check and label-free accuracy estimates for a
folder of target images without labels.

On the cached embeddings of TRAIN (its ``train/`` split when it has one) and TARGET:
- **two-sample tests** (``validation.two_sample``): a domain classifier (logistic regression, patient-grouped
  cross-validation, out-of-fold ROC AUC, permutation p-value over whole patients) and an MMD permutation test
  (RBF kernel, median heuristic). ``shift_detected``: either p-value at most ``alpha / 2`` (Bonferroni over
  the two tests);
- **subgroups** of TARGET (columns of its manifest): the domain AUC of the subgroup's images against TRAIN
  (from the same out-of-fold scores) and an MMD test of the subgroup alone against TRAIN;
- **atypical images**: TARGET ranked by the domain classifier's out-of-fold P(TARGET), with the distance to
  the nearest TRAIN image; the first ``top`` on a contact sheet;
- with ``model`` (a head saved by compare or validate ``save``): its predictions on TARGET and the expected
  accuracy by ATC and DoC (``validation.accuracy_estimates``), calibrated on out-of-fold predictions of TRAIN
  made by refitting the head's estimator (same class, same settings) in patient-grouped folds of TRAIN; each
  with a bootstrap interval; TARGET is scored for them by the same fold models, so that calibration and target
  confidences come from one kind of model. Where TARGET's folders carry TRAIN's class names, the head's accuracy
  on them is reported beside the estimates, for evaluation only: no estimator reads a target label.

Refused with one line: a TRAIN of one class, a TARGET with no images or fewer than ``MIN_TARGET_IMAGES``, a
TARGET whose images are all byte-identical to TRAIN's (not external). Target images identical to a TRAIN
image, or of a TRAIN patient, are left out and counted.

``evaluate_shift(settings)`` computes in memory; ``write_shift_run(result, out_dir)`` writes the run folder
(report.md, results.json, record.json, atypical.png, atypical.csv); ``run_shift`` does both.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import clone
from threadpoolctl import threadpool_limits

from cxr_transfer.classify.bootstrap import wilson_interval
from cxr_transfer.classify.conformal import ConformalHead
from cxr_transfer.classify.predict import check_weights, unlabeled_dataset
from cxr_transfer.classify.protocols import cv_splits
from cxr_transfer.classify.results import evaluate_then_write, images_fingerprint, writing_run_folder
from cxr_transfer.classify.saved_model import SavedFinetuned, load_saved_model
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.params import FOLDS, FRACTION, IMAGE_COUNT, N_BOOT, SEED, Interval, check_params, param
from cxr_transfer.core.plotting import subplots
from cxr_transfer.core.record import Stopwatch, run_record, write_json
from cxr_transfer.core.tables import markdown_table
from cxr_transfer.extract.dataset import Dataset, load_dataset
from cxr_transfer.extract.images import ImageDecodeError, is_image_file, read_rgb
from cxr_transfer.extract.pipeline import ExtractSettings, align_feature_sets, load_features
from cxr_transfer.validation.accuracy_estimates import METHOD_WORDS, estimate_accuracy
from cxr_transfer.validation.run import (DUPLICATE_RULE_BACKBONE, json_safe, overlap_words, patient_groups,
                                         train_overlap, training_pool)
from cxr_transfer.validation.two_sample import (
    DEFAULT_PERMUTATIONS,
    auc_score,
    domain_classifier_test,
    mmd_test,
    nearest_train_distance,
    prepare,
    rbf_kernel,
)

MIN_TARGET_IMAGES = 6
"""Fewer target images than this are refused: the domain classifier's folds need target images on both sides
of every split, and a permutation test on five images can hardly reject anything."""
MIN_SUBGROUP = 5
"""Subgroups of fewer target images get a row but no test."""
PERMUTATIONS = Interval(19, 100_000, why_low="(with fewer, a p-value cannot reach 0.05)")
OPTIMISM_WARNING = (
    "Shift is detected, so these estimates can be optimistic. ATC and DoC assume the model's confidence falls "
    "where its accuracy falls; on shifted images a model can be confidently wrong instead (in this project's "
    "data, adult bacterial pneumonia called covid with probability near 1, because every pneumonia in TRAIN is "
    "pediatric), and then neither the confidence nor the estimate drops. Read them as an upper bound, not a "
    "forecast: label a random sample of the target, each source or subgroup included, before relying on the model "
    "(the most atypical images alone miss such errors: they can look typical of the wrong class).")


@dataclass(frozen=True)
class ShiftSettings:
    """What shift compares, with which model, and how it tests (module docstring)."""

    data: Path
    target: Path
    extract: ExtractSettings = field(default_factory=ExtractSettings)
    model: Path | None = None
    subgroups: str = param("", help="comma list of TARGET manifest columns, e.g. source,age_group,view")
    alpha: float = param(0.05, FRACTION, "level of the shift decision (Bonferroni over the two tests: either "
                                         "p-value at most alpha/2)")
    permutations: int = param(DEFAULT_PERMUTATIONS, PERMUTATIONS, "permutations per test")
    folds: int = param(5, FOLDS, "patient-grouped folds (domain classifier; the head's out-of-fold refit)")
    n_boot: int = param(1000, N_BOOT, "bootstrap replicates per accuracy interval")
    top: int = param(16, IMAGE_COUNT, "most atypical target images on the contact sheet")
    seed: int = param(0, SEED, "folds, permutations and bootstrap")

    def __post_init__(self) -> None:
        check_params(self)

    @property
    def subgroup_columns(self) -> list[str]:
        return list(dict.fromkeys(c.strip() for c in self.subgroups.split(",") if c.strip()))   # each once

    def record(self) -> dict[str, Any]:
        return {"data": str(self.data), "target": str(self.target), "extract": self.extract.record(),
                "model": str(self.model) if self.model else None, "subgroups": self.subgroups,
                "alpha": self.alpha, "permutations": self.permutations, "folds": self.folds,
                "n_boot": self.n_boot, "top": self.top, "seed": self.seed}


@dataclass
class ShiftResult:
    """A finished shift check in memory: what ``write_shift_run`` writes and ``summary_lines`` prints."""

    settings: ShiftSettings
    results: dict[str, Any]                       # results.json (without the record)
    record: dict[str, Any]
    verdict: list[str]
    notes: list[str]
    ranking: list[dict[str, Any]]                 # target images, most atypical first
    target_root: Path
    warnings: list[str] = field(default_factory=list)
    run_dir: Path | None = None
    tracking: list[str] = field(default_factory=list)            # what MLflow logging did (tracking/)

    @property
    def shift_detected(self) -> bool:
        return bool(self.results["shift_detected"])

    def summary_lines(self) -> list[str]:
        lines = [f"warning: {w}" for w in self.warnings] + list(self.verdict) + [f"note: {n}" for n in self.notes]
        if self.run_dir is not None:
            lines += ["", f"run folder: {self.run_dir} (report.md, results.json, atypical.png, atypical.csv)"]
        return lines + self.tracking


# ---------------------------------------------------------------------------------------------- inputs


def load_target(path: str | Path) -> Dataset:
    """TARGET as a dataset: class folders (their names are kept as labels, for evaluation only) with an
    optional manifest, or a flat folder of images (no labels, no manifest columns)."""
    path = Path(path).expanduser()
    if path.is_dir():
        entries = [p for p in path.iterdir() if not p.name.startswith(".")]
        if not any(p.is_dir() for p in entries):
            if not any(is_image_file(p) for p in entries):
                raise CxrError(f"{path}: no images found in the target folder (neither image files nor class "
                               f"folders)", param="target")
            return unlabeled_dataset(path, [])
    return load_dataset(path)


def _refuse_small_target(n: int, where: str) -> None:
    if n < MIN_TARGET_IMAGES:
        raise CxrError(f"{where}: {n} target image(s){'' if n else ' left'}; a shift check needs at least "
                       f"{MIN_TARGET_IMAGES} (the domain classifier's folds and the permutation tests), give more "
                       f"images", param="target")


def _refuse_not_external(overlap: dict[str, Any], target: Dataset) -> None:
    n = overlap["n_external"]
    if overlap["identical"]["n"] == n:
        raise CxrError(f"{target.root}: all {n} target images are byte-identical to TRAIN images (same sha256): "
                       f"this target is not external, give images TRAIN does not hold", param="target")
    if overlap["n_external_evaluated"] == 0:
        raise CxrError(f"{target.root}: every one of the {n} target images overlaps TRAIN "
                       f"({overlap_words(overlap)}): this target is not external", param="target")


def _estimator(model: Any) -> Any:
    """The scikit-learn estimator inside a saved head (a validate head wraps it with its conformal model)."""
    return model.head if isinstance(model, ConformalHead) else model


def out_of_fold_with_target(model: Any, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, folds: int,
                            seed: int, class_names: list[str], X_target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(TRAIN's out-of-fold probabilities, TARGET's probabilities by each fold model (folds, n_target, classes)):
    the head's estimator refitted (cloned: same class and settings) in patient-grouped folds
    (``classify.protocols.cv_splits``, validate's folds).

    The estimators compare TRAIN's held-out confidences with TARGET's; both come from the same fold models, so
    that the one difference between them is the data (the head fitted on all of TRAIN has seen a quarter more
    images than each fold model; ``benchmarks/shift_null.py`` measures the estimates both ways)."""
    proba = np.zeros((len(y), len(class_names)))
    on_target = []
    with threadpool_limits(1):
        for split in cv_splits(y, folds, 1, seed, groups, class_names):
            fitted = clone(_estimator(model)).fit(X[split.train_idx], y[split.train_idx])
            columns = [int(c) for c in fitted.classes_]
            proba[np.ix_(split.test_idx, columns)] = fitted.predict_proba(X[split.test_idx])
            target = np.zeros((len(X_target), len(class_names)))
            target[:, columns] = fitted.predict_proba(X_target)
            on_target.append(target)
    return proba, np.stack(on_target)


# ---------------------------------------------------------------------------------------------- evaluate


def evaluate_shift(settings: ShiftSettings) -> ShiftResult:
    """The shift check in memory (module docstring); only the embedding and hash caches are written."""
    watch = Stopwatch()
    notes: list[str] = []
    warnings: list[str] = []
    full = load_dataset(settings.data)
    pool = training_pool(full)
    if len(pool.class_names) < 2:
        raise CxrError(f"{pool.root}: TRAIN has one class ({pool.class_names[0]}); the head and its out-of-fold "
                       f"calibration need at least two classes", param="data")
    target = load_target(settings.target)
    labelled = bool(target.samples[0].label) and set(target.class_names) <= set(pool.class_names)
    _refuse_small_target(len(target), str(target.root))
    _refuse_not_external(train_overlap(pool, pool.samples, target, target.samples), target)

    saved = None
    parts = [settings.extract]
    class_names = list(pool.class_names)
    if settings.model is not None:
        saved = load_saved_model(settings.model)
        if isinstance(saved, SavedFinetuned):
            raise CxrError(f"{settings.model}: shift needs a head saved by compare or validate `save` (.joblib); a "
                           f"fine-tuned model has no embeddings to test", param="model")
        if saved.info["class_names"] != class_names:
            raise CxrError(f"{settings.model}: the head's classes ({', '.join(saved.info['class_names'])}) are not "
                           f"TRAIN's ({', '.join(class_names)})", param="model")
        parts = [check_weights(part, settings.extract) for part in saved.info["backbones"]]
        names = "+".join(p.backbone for p in parts)
        if names != settings.extract.backbone:
            notes.append(f"the head's own backbone is used ({names}), not {settings.extract.backbone}")

    train_sets, target_sets, extraction, skipped = {}, {}, {}, []
    for k, part in enumerate(parts):
        key = f"{k}:{part.backbone}"
        train_sets[key], result = load_features(full, part)
        part_target = part if saved is not None else replace(part, int8_sample_digest=result.int8_sample_digest)
        target_sets[key], target_result = load_features(target, part_target)
        extraction[key] = {"backbone": part.backbone, "cache": str(result.cache_path),
                           "target_cache": str(target_result.cache_path), "weights": result.weights.describe(),
                           "weights_sha256": result.weights.sha256, "precision": result.precision}
        skipped += result.failures + target_result.failures
    watch.lap("read_and_embed")
    skipped = sorted(set(skipped) | set(full.skipped) | set(target.skipped))
    if skipped:
        notes.append(f"{len(skipped)} file(s) of TRAIN or TARGET could not be read or were left out (first: "
                     f"{skipped[0][0]}: {skipped[0][1]}); record.json 'skipped' lists them")
    train_samples, train_arrays = align_feature_sets(train_sets, {s.sha256 for s in pool.samples})
    target_samples, target_arrays = align_feature_sets(target_sets, {s.sha256 for s in target.samples})
    train_fingerprint = images_fingerprint([s.sha256 for s in train_samples])
    if saved is not None and saved.info["training"].get("trained_on") not in (None, train_fingerprint):
        notes.append("the head was trained on other images than this TRAIN; its out-of-fold calibration "
                     "refits its estimator on this TRAIN")
    overlap = train_overlap(pool, train_samples, target, target_samples)
    _refuse_not_external(overlap, target)
    if overlap["excluded"]["n"]:
        warnings.append(f"{overlap['excluded']['n']} of {overlap['n_external']} target images overlap TRAIN "
                        f"({overlap_words(overlap)}): left out of the check")
    excluded = set(overlap["excluded"]["images"])
    keep = [i for i, s in enumerate(target_samples) if target.relative(s) not in excluded]
    target_samples = [target_samples[i] for i in keep]
    X_train = np.hstack([train_arrays[k] for k in train_sets])
    X_target = np.hstack([target_arrays[k] for k in target_sets])[keep]
    _refuse_small_target(len(target_samples), f"{target.root} (after leaving out unreadable and overlapping images)")

    train = Dataset(pool.root, train_samples, class_names, pool.has_groups)
    groups = None
    if pool.has_groups:
        groups = patient_groups(full, train, "patient_id", train_arrays.get(f"0:{DUPLICATE_RULE_BACKBONE}"), True,
                                settings.extract.cache_dir)[0]
    else:
        notes.append("TRAIN has no patient ids: folds, permutations and bootstrap treat every image as a patient")
    target_groups = (np.array([s.group for s in target_samples])
                     if target.has_groups and all(s.group for s in target_samples) else None)
    if target_groups is None:
        notes.append("TARGET has no patient id for every image: its images are permuted and resampled one by one")
    watch.lap("groups")

    pooled = prepare(X_train, X_target, groups, target_groups, seed=settings.seed)
    domain = domain_classifier_test(pooled, settings.folds, settings.permutations, settings.seed)
    watch.lap("domain_classifier")
    kernel = rbf_kernel(pooled.features)
    mmd = mmd_test(pooled, settings.permutations, settings.seed, kernel=kernel)
    watch.lap("mmd")
    level = settings.alpha / 2
    detected = min(domain.p_value, mmd.p_value) <= level
    n_train = len(train_samples)
    target_scores = domain.scores[n_train:]
    distance = nearest_train_distance(pooled)

    subgroup_rows = _subgroups(settings, target, target_samples, pooled, domain.scores, kernel, notes)
    watch.lap("subgroups")

    results: dict[str, Any] = {
        "kind": "shift", "n_train": n_train, "n_target": len(target_samples),
        "domain_auc": domain.auc, "domain_p": domain.p_value, "mmd2": mmd.mmd2, "mmd_p": mmd.p_value,
        "mmd_bandwidth": mmd.bandwidth, "permutations": settings.permutations, "alpha": settings.alpha,
        "decision_rule": f"shift_detected when min(domain_p, mmd_p) <= alpha/2 = {level:g} (Bonferroni over the "
                         f"two tests)",
        "shift_detected": bool(detected), "features_dim": int(X_train.shape[1]),
        "tested_dim": int(pooled.features.shape[1]), "subgroups": subgroup_rows,
        "estimated_accuracy": None, "target_accuracy": None}

    predicted = confidence = None
    if saved is not None:
        y = np.array([class_names.index(s.label) for s in train_samples])
        oof, by_fold = out_of_fold_with_target(saved.model, X_train, y, groups, settings.folds, settings.seed,
                                               class_names, X_target)
        target_proba = saved.model.predict_proba(X_target)
        units = target_groups if target_groups is not None else np.arange(len(X_target))
        estimates = estimate_accuracy(oof, y, by_fold.reshape(-1, len(class_names)), groups,
                                      np.tile(units, len(by_fold)), settings.n_boot, settings.seed,
                                      units=f"TRAIN {'patients' if groups is not None else 'images'} and TARGET "
                                            f"{'patients' if target_groups is not None else 'images'}")
        results["estimated_accuracy"] = estimates.as_dict()
        results["estimated_accuracy"]["calibration"] = (
            f"out-of-fold predictions of TRAIN by the saved head's estimator refitted in {settings.folds} "
            f"patient-grouped folds, TARGET scored by the same fold models (the saved head, fitted on all of "
            f"TRAIN, is more confident than they are); the predictions and the accuracy on labelled targets are "
            f"the saved head's")
        results["estimated_accuracy"]["optimistic_warning"] = OPTIMISM_WARNING if detected else None
        predicted = target_proba.argmax(axis=1)
        confidence = target_proba.max(axis=1)
        if labelled:
            y_target = np.array([class_names.index(s.label) for s in target_samples])
            correct = int((predicted == y_target).sum())
            low, high = wilson_interval(correct, len(y_target))
            results["target_accuracy"] = {
                "value": correct / len(y_target), "ci_low": low, "ci_high": high, "interval": "Wilson 95%",
                "note": "from the target's class folders, for evaluating the estimates only; no estimator reads it"}
            if len(set(y_target.tolist())) == 1:
                notes.append(f"the target's folders name one class only ({class_names[y_target[0]]}): if those "
                             f"are its labels, this is label shift, which the tests detect and which ATC and DoC "
                             f"do not model")
        watch.lap("accuracy_estimates")

    order = np.argsort(-target_scores, kind="stable")
    columns = _manifest_columns(target)
    ranking = []
    for rank, i in enumerate(order, start=1):
        sample = target_samples[i]
        row = {"rank": rank, "path": target.relative(sample), "p_target": round(float(target_scores[i]), 4),
               "nearest_train_distance": round(float(distance[i]), 3)}
        if predicted is not None:
            row["predicted"] = class_names[int(predicted[i])]
            row["confidence"] = round(float(confidence[i]), 4)
        row.update({c: sample.column(c) or "" for c in columns})
        ranking.append(row)
    results["most_atypical"] = ranking[:settings.top]

    record = run_record("shift", settings.record(), seed=settings.seed, train_root=str(pool.root),
                        n_train=n_train, train_fingerprint=train_fingerprint,
                        target_root=str(target.root), n_target=len(target_samples),
                        target_fingerprint=images_fingerprint([s.sha256 for s in target_samples]),
                        grouping="patient_id merged over near-duplicate clusters" if groups is not None else "image",
                        target_grouping="patient_id" if target_groups is not None else "image",
                        extraction=extraction, overlap_excluded=overlap["excluded"]["n"],
                        skipped=[list(x) for x in skipped], timings=watch.timings,
                        seconds=watch.elapsed())
    verdict = _verdict(results)
    return ShiftResult(settings, results, record, verdict, notes, ranking, target.root, warnings)


def _manifest_columns(target: Dataset) -> list[str]:
    return [c for c in target.columns if c not in ("label", "sha256", "patient_id", "group")]


def _subgroups(settings: ShiftSettings, target: Dataset, samples: list, pooled, scores: np.ndarray,
               kernel: tuple[np.ndarray, float], notes: list[str]) -> list[dict[str, Any]]:
    """One row per value of each requested TARGET column: n, its domain AUC against TRAIN (the out-of-fold
    scores) and its own MMD test against TRAIN (``MIN_SUBGROUP`` images at least)."""
    rows: list[dict[str, Any]] = []
    wanted = settings.subgroup_columns
    n_train = pooled.n_train
    train_rows = np.arange(n_train)
    found: list[tuple[str, str, np.ndarray]] = []
    for column in wanted:
        if column not in target.columns and column != "label":
            notes.append(f"TARGET has no column '{column}' (columns found: {', '.join(target.columns) or 'none'}); "
                         f"no subgroup rows for it")
            continue
        values = np.array([(s.label if column == "label" else s.column(column)) or "(missing)" for s in samples])
        found += [(column, value, np.flatnonzero(values == value)) for value in sorted(set(values.tolist()))]
    n_tested = sum(len(members) >= MIN_SUBGROUP for _, _, members in found)
    level = settings.alpha / max(1, n_tested)
    # enough permutations that the smallest p-value, 1 / (permutations + 1), can reach the Bonferroni level
    permutations = max(settings.permutations, math.ceil(2 / level))
    for column, value, members in found:
        row: dict[str, Any] = {"column": column, "value": value, "n": int(len(members)), "domain_auc": None,
                               "mmd_p": None, "shifted": False}
        if len(members) >= MIN_SUBGROUP:
            rows_idx = np.r_[train_rows, n_train + members]
            labels = np.r_[np.zeros(n_train, int), np.ones(len(members), int)]
            row["domain_auc"] = auc_score(labels, scores[rows_idx])
            row["mmd_p"] = mmd_test(pooled, permutations, settings.seed, kernel, rows=rows_idx).p_value
            row["mmd_permutations"] = permutations
            row["shifted"] = row["mmd_p"] <= level
        rows.append(row)
    return rows


def _ci(stat: dict[str, float]) -> str:
    if math.isnan(stat.get("ci_low", math.nan)):
        return f"{stat['value']:.3f}"
    return f"{stat['value']:.3f} [{stat['ci_low']:.3f}, {stat['ci_high']:.3f}]"


def _verdict(results: dict[str, Any]) -> list[str]:
    detected = results["shift_detected"]
    lines = [f"Shift {'DETECTED' if detected else 'not detected'} between TRAIN ({results['n_train']} images) and "
             f"TARGET ({results['n_target']} images): domain classifier AUC {results['domain_auc']:.3f} "
             f"(p = {results['domain_p']:.3f}), MMD p = {results['mmd_p']:.3f}; "
             f"{results['decision_rule']}."]
    if not detected:
        lines.append(f"Not detecting a shift is no proof there is none: a shift these embeddings do not show, or one "
                     f"confined to a few of the {results['n_target']} target images, can go unseen.")
    shifted = [r for r in results["subgroups"] if r["shifted"]]
    if shifted:
        lines.append("Subgroups that differ from TRAIN (MMD, Bonferroni over the subgroups): " + "; ".join(
            f"{r['column']}={r['value']} (n={r['n']}, AUC {r['domain_auc']:.2f}, p={r['mmd_p']:.3f})"
            for r in shifted) + ".")
    estimates = results["estimated_accuracy"]
    if estimates:
        parts = [f"{method} {_ci(estimates[method])}" for method in ("atc_ne", "atc_mc", "doc")]
        lines.append(f"Expected accuracy on TARGET (label-free): {', '.join(parts)}; TRAIN out-of-fold accuracy "
                     f"{estimates['source_accuracy']:.3f}.")
        if estimates["optimistic_warning"]:
            lines.append(estimates["optimistic_warning"])
    if results["target_accuracy"]:
        lines.append(f"Accuracy on TARGET from its folder labels (evaluation only, no estimator reads it): "
                     f"{_ci(results['target_accuracy'])} (Wilson 95%).")
    return lines


# ---------------------------------------------------------------------------------------------- write


RANKING_CSV = "atypical.csv"
SHEET_PNG = "atypical.png"


def write_shift_run(result: ShiftResult, out_dir: str | Path, run_name: str | None = None) -> Path:
    """Write the run folder under ``out_dir`` (named ``run_name``, else ``shift-<time>-<random>``): report.md,
    results.json, record.json, atypical.csv (every target image, most atypical first) and atypical.png (the
    first ``top``). Sets ``result.run_dir``."""
    with writing_run_folder(out_dir, "shift", run_name, "shift") as run_dir:
        write_json(run_dir / "record.json", result.record)
        write_json(run_dir / "results.json", json_safe({**result.results, "verdict": result.verdict,
                                                         "notes": result.notes, "warnings": result.warnings,
                                                         "record": result.record}))
        with open(run_dir / RANKING_CSV, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(result.ranking[0]))
            writer.writeheader()
            writer.writerows(result.ranking)
        shown = _contact_sheet(result, run_dir / SHEET_PNG)
        (run_dir / "report.md").write_text(_report(result, shown), encoding="utf-8")
    result.run_dir = run_dir
    return run_dir


def run_shift(settings: ShiftSettings, out_dir: str | Path, run_name: str | None = None) -> ShiftResult:
    """``evaluate_shift`` then ``write_shift_run``, the folder checked first."""
    return evaluate_then_write(evaluate_shift, write_shift_run, settings, out_dir, run_name)


def _contact_sheet(result: ShiftResult, path: Path) -> int:
    """The ``top`` most atypical target images, five per row, with rank, P(TARGET) and prediction."""
    shown = result.ranking[:result.settings.top]
    if not shown:
        return 0
    per_row = min(5, len(shown))
    rows = (len(shown) + per_row - 1) // per_row
    figure, axes = subplots(rows, per_row, figsize=(2.4 * per_row, 2.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, row in enumerate(shown):
        ax = axes.flat[k]
        try:
            ax.imshow(read_rgb(result.target_root / row["path"], 160))
        except (ImageDecodeError, OSError):
            ax.text(0.5, 0.5, "unreadable", ha="center", transform=ax.transAxes)
        name = row["path"] if len(row["path"]) <= 26 else "..." + row["path"][-23:]
        caption = f"#{row['rank']} p={row['p_target']:.2f}" + (
            f" {row['predicted']} {row['confidence']:.2f}" if "predicted" in row else "")
        ax.set_title(f"{name}\n{caption}", fontsize=6.5)
    figure.suptitle(f"most atypical target images ({len(shown)} of {len(result.ranking)}): domain classifier "
                    f"P(TARGET)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    return len(shown)


def _report(result: ShiftResult, shown: int) -> str:
    r, s = result.results, result.settings
    lines = ["# Shift check", "", f"TRAIN: `{result.record['train_root']}` ({r['n_train']} images); TARGET: "
             f"`{result.record['target_root']}` ({r['n_target']} images)"
             + (f"; model: `{s.model}`" if s.model else "") + ".", "", "## Verdict", ""]
    lines += [f"- {line}" for line in result.warnings + result.verdict] + [""]
    lines += ["## Two-sample tests", "",
              markdown_table([
                  {"test": "domain classifier (logistic regression, patient-grouped CV)",
                   "statistic": f"ROC AUC {r['domain_auc']:.3f}", "p-value": f"{r['domain_p']:.4f}"},
                  {"test": f"MMD (RBF kernel, bandwidth {r['mmd_bandwidth']:.2f}: median heuristic)",
                   "statistic": f"MMD² {r['mmd2']:.5f}", "p-value": f"{r['mmd_p']:.4f}"}]), "",
              f"Both on standardized embeddings reduced by PCA from {r['features_dim']} to {r['tested_dim']} "
              f"dimensions (fitted on both samples, no domain label); p-values from {r['permutations']} "
              f"permutations of whole patients. {r['decision_rule']}: shift "
              f"{'detected' if r['shift_detected'] else 'not detected'}.", ""]
    if r["subgroups"]:
        lines += ["## Subgroups of TARGET", "", markdown_table([
            {"column": row["column"], "value": row["value"], "n": row["n"],
             "domain AUC vs TRAIN": "-" if row["domain_auc"] is None else f"{row['domain_auc']:.3f}",
             "MMD p": "-" if row["mmd_p"] is None else f"{row['mmd_p']:.4f}",
             "differs": "yes" if row["shifted"] else ""} for row in r["subgroups"]]), "",
            f"Domain AUC: the main classifier's out-of-fold scores of the subgroup against TRAIN's. MMD: the subgroup "
            f"alone against TRAIN ({MIN_SUBGROUP} images at least); 'differs' at alpha / number of subgroups tested.",
            ""]
    estimates = r["estimated_accuracy"]
    if estimates:
        lines += ["## Expected accuracy (label-free)", ""]
        if estimates["optimistic_warning"]:
            lines += [f"**{estimates['optimistic_warning']}**", ""]
        lines += [markdown_table([{"method": METHOD_WORDS[m], "expected accuracy [95% bootstrap]": _ci(estimates[m])}
                                  for m in ("atc_ne", "atc_mc", "doc")]), "",
                  f"Calibrated on {estimates['calibration']}: TRAIN out-of-fold accuracy "
                  f"{estimates['source_accuracy']:.3f}, mean confidence {estimates['source_mean_confidence']:.3f}; "
                  f"TARGET mean confidence {estimates['target_mean_confidence']:.3f}. Intervals: "
                  f"{estimates['n_boot']} bootstrap replicates resampling {estimates['bootstrap_units']}.", ""]
        if r["target_accuracy"]:
            lines += [f"Accuracy on TARGET from its folder labels: {_ci(r['target_accuracy'])} (Wilson 95%); "
                      f"{r['target_accuracy']['note']}.", ""]
    lines += ["## Most atypical target images", ""]
    if shown:
        lines += [f"![most atypical target images]({SHEET_PNG})", ""]
    lines += [markdown_table(result.ranking[:s.top]), "",
              f"Every target image, most atypical first: `{RANKING_CSV}` (p_target: the domain classifier's "
              f"out-of-fold probability that the image is from TARGET; nearest_train_distance: in the tested "
              f"space).", ""]
    if result.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in result.notes] + [""]
    return "\n".join(lines)
