"""External validation (``cxr.validate``): can a head trained on TRAIN be trusted on someone else's X-rays?

For every backbone and head:
- **internal**: out-of-fold probabilities of a patient-grouped k-fold cross-validation of TRAIN (the
  ``train/`` split when there is one); groups are patient ids merged over the audit's duplicate clusters;
- **external**: the head fitted on all of TRAIN, applied to every image of EXT (never trained or tuned on);
- **overlap**: EXT images byte-identical to a TRAIN image, near duplicates of one (the audit's rule) or of a
  TRAIN patient are left out of the external metrics and named (``train_overlap``); an EXT that overlaps
  TRAIN entirely is refused;
- accuracy, per-class sensitivity / specificity, macro F1 and one-vs-rest AUC, each with a 95% patient-cluster
  bootstrap interval (``classify.bootstrap``; Wilson / none below 30 patients), and the external - internal
  gap with its interval; TRAIN's listing is checked against ``folds`` and ``alpha`` before any embedding
  (``check_sizes``);
- **subgroups** of EXT (any column of its manifest or CSV): n, accuracy with a Wilson interval, sensitivity
  per class, conformal coverage; a subgroup whose interval lies wholly below the internal accuracy is flagged;
- **calibration** (``classify.calibration``): ECE, Brier score and reliability diagrams, internal and external,
  and with ``calibrate`` the same after sigmoid / isotonic recalibration on grouped folds of TRAIN only;
- **conformal sets** (``classify.conformal``, MAPIE cross-conformal on TRAIN only): coverage and mean set
  size internally (nested, so measured on images the conformal scores never saw) and externally, per class and
  per subgroup.

``evaluate_validate(settings)`` computes all of this in memory (a ``ValidateResult``; only the embedding and
hash caches are written); ``write_validate_run(result, out_dir)`` writes a run folder like compare's (formatted
by ``validation.report``): report.md (verdict first), results.json, results.csv, accuracy.png, reliability.png,
external_predictions.csv, record.json, and with ``save`` one ``<backbone>-<head>.joblib`` per model that
``predict`` loads (``--conformal ALPHA`` adds the prediction set).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from joblib import Parallel, delayed
from threadpoolctl import threadpool_limits

from cxr_transfer.classify.bootstrap import (
    DEFAULT_N_BOOT,
    SMALL_SAMPLE,
    evaluation_gap,
    evaluation_intervals,
    resampling_units,
    wilson_interval,
)
from cxr_transfer.classify.calibration import CALIBRATION_METHODS, calibrated_head, calibration_summary
from cxr_transfer.classify.conformal import (
    ConformalHead,
    conformal_size_problem,
    check_alpha,
    conformal_folds,
    fit_conformal,
    nested_sets,
    prediction_sets,
    set_summary,
)
from cxr_transfer.classify.duplicate_groups import duplicate_aware_groups
from cxr_transfer.classify.heads import get_head, make_head, parse_head_list
from cxr_transfer.classify.protocols import Split, check_splittable, cv_splits, resolve_groups
from cxr_transfer.classify.results import evaluate_then_write, images_fingerprint, writing_run_folder
from cxr_transfer.classify.saved_model import save_head
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.params import FOLDS, FRACTION, IMAGE_COUNT, JOBS, N_BOOT, Options, SEED, check_params, param
from cxr_transfer.core.record import Stopwatch, run_record, write_json
from cxr_transfer.explain.explainers import load_explainer
from cxr_transfer.explain.run import explanation_sheet, iter_explanations, mean_shares
from cxr_transfer.extract.dataset import Dataset, Sample, load_dataset
from cxr_transfer.extract.duplicates import (
    DuplicateRule,
    cosine_matrix,
    hash_cache_path,
    hash_samples,
    phash_distance_matrix,
)
from cxr_transfer.extract.pipeline import ExtractSettings, align_feature_sets, load_features
from cxr_transfer.extract.registry import parse_backbone_list
from cxr_transfer.validation.report import verdict_lines, write_external_predictions, write_report

DUPLICATE_RULE_BACKBONE = "vgg16"
"""The audit's duplicate thresholds were measured on VGG16 embeddings: only those confirm a pHash match."""


@dataclass(frozen=True)
class ValidateSettings:
    """What validate fits, on what, and how it measures (see the module docstring)."""

    data: Path
    external: Path
    extract: ExtractSettings = field(default_factory=ExtractSettings)
    backbones: str = param("vgg16", help="backbone names, comma list or 'all'", flag="--backbone")
    heads: str = param("logreg", help="comma list of logreg,linsvm,rbfsvm,knn,rf,hgb,mlp or 'all'")
    group_by: str | None = param(None, help="patient_id (default when TRAIN has patient ids): folds and bootstrap "
                                            "by patient")
    merge_duplicates: bool = param(True, help="join patients that share a near-duplicate radiograph into one group")
    subgroups: str = param("", help="comma list of EXT manifest columns, e.g. source,age_group,view")
    alpha: float = param(0.1, FRACTION, "conformal miscoverage (sets cover 1 - alpha)")
    calibrate: str | None = param(None, Options(CALIBRATION_METHODS), "also recalibrate each head on grouped folds "
                                  "of TRAIN and report before / after", none_means="no recalibration")
    folds: int = param(5, FOLDS, "patient-grouped folds of TRAIN")
    n_boot: int = param(DEFAULT_N_BOOT, N_BOOT, "bootstrap replicates per interval")
    seed: int = param(0, SEED, "folds, bootstrap and heads")
    save: bool = param(False, help="save each head with its conformal threshold (for predict --conformal)")
    explain: int = param(0, IMAGE_COUNT, "heatmaps of the N most confident external errors and the border share "
                                         "per class (saves the heads, which explain reads)")
    n_jobs: int = param(-1, JOBS, "parallel fits (default: all cores)", flag="--jobs")

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        check_params(self)

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
class ValidateResult:
    """A finished validation, in memory: what ``write_validate_run`` writes and ``summary_lines`` prints."""

    settings: ValidateSettings
    class_names: list[str]
    models: list[ModelResult]
    verdict: list[str]
    notes: list[str]
    record: dict[str, Any]                                 # record.json (without saved_models and explain)
    fitted: list[FittedModel]                              # predictions (and, for save / explain, the heads)
    external_images: list[Sample]                          # the EXT images evaluated (overlap left out)
    external_names: list[str]                              # ... their paths relative to EXT's root
    subgroup_values: dict[str, list[str]]                  # EXT column -> value of each evaluated image
    flagged: list[dict[str, Any]] = field(default_factory=list)   # subgroups below the internal accuracy
    warnings: list[str] = field(default_factory=list)     # for the summary, loud: TRAIN/EXT overlap
    overlap: dict[str, Any] = field(default_factory=dict)  # results.json "overlap" (``train_overlap``)
    skipped: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # "TRAIN"/"EXT": (path, reason)
    run_dir: Path | None = None                            # set once the run folder is written
    tracking: list[str] = field(default_factory=list)     # what MLflow logging did (tracking/)

    def summary_lines(self) -> list[str]:
        """What the validate command prints: warnings, verdict, notes, skipped files and, once written, the run
        folder and what MLflow logging did."""
        lines = [f"warning: {warning}" for warning in self.warnings] + list(self.verdict)
        lines += [f"note: {note}" for note in self.notes]
        for where, entries in self.skipped.items():
            if entries:
                lines.append(f"{where}: {len(entries)} file(s) skipped or left out:")
                lines += [f"  skipped {path}: {reason}" for path, reason in entries]
        if self.run_dir is not None:
            lines += ["", f"run folder: {self.run_dir} (report.md, results.json, results.csv, accuracy.png, "
                          f"reliability.png)"]
        return lines + self.tracking


# ---------------------------------------------------------------------------------------------- data


def training_pool(dataset: Dataset) -> Dataset:
    """TRAIN's ``train/`` split when it has one, else every image."""
    return dataset.subset("train") if any(s.split == "train" for s in dataset.samples) else dataset


# ---------------------------------------------------------------------------------------------- TRAIN/EXT overlap


def near_duplicate_pairs(train: Dataset, train_samples: list[Sample], external: Dataset, ext_samples: list[Sample],
                         train_embeddings: np.ndarray | None = None, ext_embeddings: np.ndarray | None = None,
                         cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """EXT images that the audit's duplicate rule (``extract.duplicates.DuplicateRule``: pHash of 81 trimmed
    crops, confirmed by the VGG16 cosine when embeddings are given) calls a near duplicate of a TRAIN image
    with other bytes: one row per such EXT image, its closest TRAIN image first (paths relative to each root)."""
    # layering: moves below classify in issue 23

    def hashes(dataset: Dataset, samples: list[Sample]) -> list:
        return hash_samples(samples, hash_cache_path(dataset, cache_dir) if cache_dir else None)

    train_hashes, ext_hashes = hashes(train, train_samples), hashes(external, ext_samples)
    rows_t = [i for i, h in enumerate(train_hashes) if not isinstance(h, str)]
    rows_e = [j for j, h in enumerate(ext_hashes) if not isinstance(h, str)]
    if not rows_t or not rows_e:
        return []
    n = len(rows_t)
    phash = phash_distance_matrix(np.stack([train_hashes[i] for i in rows_t] + [ext_hashes[j] for j in rows_e]))
    phash = phash[:n, n:]
    cosine = None
    if train_embeddings is not None and ext_embeddings is not None:
        cosine = cosine_matrix(np.vstack([train_embeddings[rows_t], ext_embeddings[rows_e]]))[:n, n:]
    hits = DuplicateRule().flags(phash, cosine)
    pairs = []
    for column, j in enumerate(rows_e):
        matched = [k for k in np.flatnonzero(hits[:, column])
                   if train_samples[rows_t[k]].sha256 != ext_samples[j].sha256]
        if not matched:
            continue
        k = min(matched, key=lambda k: (phash[k, column], -(cosine[k, column] if cosine is not None else 0.0)))
        pairs.append({"external": external.relative(ext_samples[j]),
                      "train": train.relative(train_samples[rows_t[k]]), "phash_distance": int(phash[k, column]),
                      "cosine": None if cosine is None else round(float(cosine[k, column]), 4),
                      "train_matches": len(matched)})
    return pairs


def train_overlap(train: Dataset, train_samples: list[Sample], external: Dataset, ext_samples: list[Sample],
                  near: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What EXT shares with TRAIN: byte-identical images (sha256), near duplicates (``near_duplicate_pairs``;
    ``near=None``: not looked for, their count None) and patient ids, with counts; ``excluded``: the EXT images in
    any of the three, which validate leaves out of the external metrics. Paths are relative to each dataset's
    root."""
    by_sha = {s.sha256: s for s in train_samples}
    identical = [{"external": external.relative(e), "train": train.relative(by_sha[e.sha256])}
                 for e in ext_samples if e.sha256 in by_sha]
    same = {p["external"] for p in identical}
    checked = near is not None
    near = [p for p in (near or []) if p["external"] not in same]
    train_patients: dict[str, int] = {}
    for s in train_samples:
        if s.group:
            train_patients[s.group] = train_patients.get(s.group, 0) + 1
    shared = sorted({e.group for e in ext_samples if e.group in train_patients}) if train_patients else []
    shared_images = [{"external": external.relative(e), "patient_id": e.group, "train_images": train_patients[e.group]}
                     for e in ext_samples if e.group and e.group in train_patients]
    flagged = same | {p["external"] for p in near} | {p["external"] for p in shared_images}
    excluded = [external.relative(e) for e in ext_samples if external.relative(e) in flagged]
    return {"identical": {"n": len(identical), "pairs": identical},
            "near_duplicate": {"n": len(near) if checked else None, "pairs": near,
                               "rule": "extract.duplicates.DuplicateRule" if checked else "not looked for"},
            "shared_patients": {"n": len(shared), "patient_ids": shared, "n_external_images": len(shared_images),
                                "n_train_images": sum(train_patients[g] for g in shared), "images": shared_images},
            "excluded": {"n": len(excluded), "images": excluded},
            "n_external": len(ext_samples), "n_external_evaluated": len(ext_samples) - len(excluded)}


def overlap_words(overlap: dict[str, Any]) -> str:
    """'2 byte-identical, 1 near-duplicate, 1 sharing a patient id with TRAIN (1 patient(s))': the overlap's
    counts in words."""
    shared = overlap["shared_patients"]
    near = overlap["near_duplicate"]["n"]
    return (f"{overlap['identical']['n']} byte-identical, "
            + ("near duplicates not looked for" if near is None else f"{near} near-duplicate")
            + f", {shared['n_external_images']} sharing a patient id with TRAIN ({shared['n']} patient(s))")


def _refuse_full_overlap(overlap: dict[str, Any], external: Dataset) -> None:
    """CxrError when every EXT image overlaps TRAIN: nothing would be left to validate on."""
    if overlap["n_external"] and overlap["n_external_evaluated"] == 0:
        hint = (" (if the patient ids come from unrelated numberings, prefix them, e.g. with the source)"
                if overlap["shared_patients"]["n"] else "")
        raise CxrError(f"{external.root}: every one of the {overlap['n_external']} images of EXT overlaps TRAIN "
                       f"({overlap_words(overlap)}): nothing is left to validate on; give images of other "
                       f"patients{hint}")


def _overlap_warning(overlap: dict[str, Any]) -> str | None:
    if not overlap["excluded"]["n"]:
        return None
    return (f"{overlap['excluded']['n']} of {overlap['n_external']} external images overlap TRAIN "
            f"({overlap_words(overlap)}): left out of the external metrics, which cover the other "
            f"{overlap['n_external_evaluated']} (report.md, 'Overlap with TRAIN')")


def _skipped(dataset: Dataset, failures: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Files of a dataset left out when reading it or when embedding it, each once (the reason without the
    file's absolute path in front, since the path is named beside it)."""
    out = list(dataset.skipped)
    for path, reason in failures:
        if all(path != seen for seen, _ in out):
            out.append((path, reason.removeprefix(f"{dataset.root / path}: ")))
    return out




# ---------------------------------------------------------------------------------------------- fitting


@dataclass
class FitPart:
    """What one worker task of ``_fit_part`` returns: an outer fold's predictions of its test rows of TRAIN
    (``part`` = k), or the final fit's predictions of EXT (``part`` = None)."""

    backbone: str
    head: str
    part: int | None
    proba: np.ndarray                     # class probabilities of the predicted images
    sets: np.ndarray                      # their conformal sets (n, n_classes) bool
    calibrated: np.ndarray | None = None  # probabilities after recalibration (``calibrate``)
    rows: np.ndarray | None = None        # outer fold: the TRAIN rows predicted
    model: ConformalHead | None = None    # final fit, kept when it will be saved (``save``, ``explain``)
    seconds: float = 0.0


@dataclass
class FittedModel:
    """One (backbone, head) of validate: out-of-fold predictions of TRAIN, predictions of EXT and, when it will
    be saved, the head fitted on all of TRAIN with its conformal threshold."""

    backbone: str
    head: str
    internal_proba: np.ndarray
    internal_sets: np.ndarray
    external_proba: np.ndarray | None = None
    external_sets: np.ndarray | None = None
    internal_calibrated: np.ndarray | None = None
    external_calibrated: np.ndarray | None = None
    model: ConformalHead | None = None
    seconds: float = 0.0

    @property
    def name(self) -> str:
        """``<backbone>-<head>``: the stem of its saved head and of its external_predictions.csv columns."""
        return f"{self.backbone}-{self.head}"


def _fit_part(backbone: str, head: str, part: int | None, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None,
              outer: list[Split], X_ext: np.ndarray, settings: ValidateSettings, n_classes: int) -> FitPart:
    """One task of a worker process: ``part`` = k fits on outer fold k's training side and predicts its test
    side (head, recalibrated head, nested conformal sets); ``part`` = None fits on all of TRAIN and predicts
    EXT. Small tasks keep both cores busy when the heads' costs differ tenfold."""
    started = time.perf_counter()
    seed, folds, method = settings.seed, settings.folds, settings.calibrate
    calibrated = model = None
    with threadpool_limits(1):
        if part is not None:   # the order of the fits is the original one (each is seeded on its own)
            split = outer[part]
            train, test = split.train_idx, split.test_idx
            proba = make_head(head, seed).fit(X[train], y[train]).predict_proba(X[test])
            if method:
                inner = _inner_splits(y[train], groups[train] if groups is not None else None, folds, seed)
                calibrated = calibrated_head(head, method, inner, seed).fit(X[train], y[train]).predict_proba(X[test])
            sets = nested_sets(head, X, y, n_classes, settings.alpha, [split], groups, folds, seed)[test]
        else:
            test = None
            final = make_head(head, seed).fit(X, y)
            proba = final.predict_proba(X_ext)
            if method:
                calibrated = calibrated_head(head, method, _inner_splits(y, groups, folds, seed), seed).fit(
                    X, y).predict_proba(X_ext)
            conformal = fit_conformal(head, X, y, settings.alpha, groups, folds, seed)
            sets = prediction_sets(conformal, X_ext)
            if settings.save or settings.explain:
                model = ConformalHead(final, conformal, settings.alpha)
    return FitPart(backbone, head, part, proba, sets, calibrated, test, model, time.perf_counter() - started)


def _assemble(parts: list[FitPart], n_images: int, n_classes: int) -> list[FittedModel]:
    """Per (backbone, head): the out-of-fold arrays put together from the fold tasks, the final task's
    external predictions and model, and the summed seconds of its tasks."""
    models: dict[tuple[str, str], FittedModel] = {}
    for part in parts:
        model = models.setdefault((part.backbone, part.head), FittedModel(
            part.backbone, part.head, np.zeros((n_images, n_classes)), np.zeros((n_images, n_classes), bool)))
        model.seconds += part.seconds
        if part.part is None:
            model.external_proba, model.external_sets = part.proba, part.sets
            model.external_calibrated, model.model = part.calibrated, part.model
            continue
        model.internal_proba[part.rows] = part.proba
        model.internal_sets[part.rows] = part.sets
        if part.calibrated is not None:
            if model.internal_calibrated is None:
                model.internal_calibrated = np.zeros((n_images, n_classes))
            model.internal_calibrated[part.rows] = part.calibrated
    return list(models.values())


def _inner_splits(y: np.ndarray, groups: np.ndarray | None, folds: int, seed: int) -> list[tuple]:
    return [(s.train_idx, s.test_idx) for s in cv_splits(y, folds, 1, seed, groups)]


def _folds_problem(labels: np.ndarray, groups: np.ndarray | None, folds: int, seed: int,
                   class_names: list[str]) -> tuple[str | None, list[Split]]:
    """(what is missing for ``folds`` outer folds and ``folds`` nested folds inside each outer training part,
    or None; the outer splits when they can be drawn)."""
    try:
        outer = cv_splits(labels, folds, 1, seed, groups, class_names)
    except CxrError as exc:
        return str(exc), []
    for split in outer:
        try:
            check_splittable(labels[split.train_idx], folds, class_names,
                             groups[split.train_idx] if groups is not None else None)
        except CxrError as exc:
            return (f"each outer fold's training part is split again into {folds} folds (conformal scores, "
                    f"and calibrate), and in one of them {exc}"), outer
    return None, outer


def _smallest_fit(labels: np.ndarray, groups: np.ndarray | None, folds: int, seed: int, outer: list[Split],
                  calibrate: str | None) -> tuple[int, str]:
    """(the fewest images any head is fitted on, and which part that is): outer training parts, the conformal
    score folds inside each of them and inside all of TRAIN (``conformal_folds``, as MAPIE splits them)
    and, with ``calibrate``, its inner folds."""
    found = [(len(s.train_idx), "an outer fold's training part") for s in outer]
    parts = [(np.arange(len(labels)), "all of TRAIN")] + [(s.train_idx, "an outer fold's training part")
                                                          for s in outer]
    for rows, name in parts:
        part_groups = groups[rows] if groups is not None else None
        cv = conformal_folds(folds, seed, part_groups is not None)
        found += [(len(inner), f"a conformal score fold inside {name}")
                  for inner, _ in cv.split(np.zeros((len(rows), 1)), labels[rows], part_groups)]
        if calibrate:
            found += [(len(inner), f"a recalibration fold inside {name}")
                      for inner, _ in _inner_splits(labels[rows], part_groups, folds, seed)]
    return min(found)


def _neighbours_problem(labels: np.ndarray, groups: np.ndarray | None, folds: int, seed: int, outer: list[Split],
                        heads: Sequence[str], calibrate: str | None) -> str | None:
    """One sentence when a head that looks at k neighbours (knn) would be fitted on fewer than k images."""
    needs = {head: get_head(head).params.get("n_neighbors") for head in heads}
    needs = {head: k for head, k in needs.items() if k}
    if not needs:
        return None
    smallest, where = _smallest_fit(labels, groups, folds, seed, outer, calibrate)
    for head, k in needs.items():
        if smallest < k:
            return (f"TRAIN is too small for the {head} head: it looks at {k} neighbours, so every part of TRAIN "
                    f"it is fitted on needs at least {k} images, and the smallest ({where}, folds={folds}) has "
                    f"{smallest} images; add images, or leave {head} out of heads")
    return None


def check_sizes(labels: np.ndarray, groups: np.ndarray | None, folds: int, alpha: float, seed: int,
                class_names: list[str], heads: Sequence[str] = (), calibrate: str | None = None) -> None:
    """CxrError (one sentence) unless TRAIN is large enough for what validate fits, decided from its labels
    and groups alone, so before any embedding (and again on the embedded images, before any fitting).

    - outer folds: every class needs ``folds`` images (and patients, when grouped);
    - nested folds (conformal scores, ``calibrate``): the same inside every outer training part;
    - conformal sets: MAPIE needs 1/alpha and 1/(1 - alpha) images in the smallest outer training part;
    - ``heads``: knn needs as many images as neighbours in every part it is fitted on (``calibrate``: its
      inner folds too).

    The message names the class and says the largest folds, or the alpha range, the data allows.
    """
    labels = np.asarray(labels)
    problem, outer = _folds_problem(labels, groups, folds, seed, class_names)
    if problem:
        smallest_class = int(np.bincount(labels).min()) if labels.size else 0
        for k in range(min(folds - 1, smallest_class), 1, -1):
            found, splits = _folds_problem(labels, groups, k, seed, class_names)
            if found is None:
                at_k = conformal_size_problem(min(len(s.train_idx) for s in splits), alpha)
                problem += f"; the largest folds this data allows is {k}" + (
                    f" (but then {at_k})" if at_k else "")
                break
        else:
            problem += "; no number of folds works with this data (add images, or patients, of that class)"
        raise CxrError(f"TRAIN is too small for folds={folds}: {problem}")
    smallest = min(len(s.train_idx) for s in outer)
    problem = conformal_size_problem(smallest, alpha)
    if problem:
        raise CxrError(f"TRAIN is too small for the conformal sets: their scores come from each outer fold's "
                       f"training part, the smallest of which (folds={folds}) has {smallest} images: {problem}")
    problem = _neighbours_problem(labels, groups, folds, seed, outer, heads, calibrate)
    if problem:
        raise CxrError(problem)


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


@dataclass
class ModelResult:
    """The scores of one fitted model; ``as_dict()`` is its entry in results.json's "models"."""

    backbone: str
    head: str
    seconds: float
    internal: dict[str, Any]                  # n, metrics with intervals, their interval rule, calibration
    external: dict[str, Any]                  # the same on EXT
    gap: dict[str, dict[str, float]]          # external - internal, per metric, with its interval
    conformal: dict[str, Any]                 # alpha, and coverage / set size internally and externally
    subgroups: dict[str, list[dict[str, Any]]]   # EXT column -> one row per value (and per value and class)
    calibrated: dict[str, Any] | None = None  # ``calibrate``: ECE, Brier and accuracy after recalibration

    @property
    def name(self) -> str:
        return f"{self.backbone} + {self.head}"

    def as_dict(self) -> dict[str, Any]:
        found = {"backbone": self.backbone, "head": self.head, "seconds": self.seconds, "internal": self.internal,
                 "external": self.external, "gap": self.gap}
        if self.calibrated is not None:
            found["calibrated"] = self.calibrated
        return {**found, "conformal": self.conformal, "subgroups": self.subgroups}


MACRO_METRICS = ("macro_f1", "auc_macro")
"""Averages over classes: over the classes present in a set, so an EXT lacking a class gets no gap for them."""


def _score(fitted: FittedModel, y: np.ndarray, clusters: np.ndarray | None, y_ext: np.ndarray,
           ext_clusters: np.ndarray | None, subgroup_values: dict[str, list[str]], class_names: list[str],
           settings: ValidateSettings) -> ModelResult:
    """Metrics with intervals, calibration, conformal coverage and subgroups for one fitted model."""
    n_boot, seed = settings.n_boot, settings.seed
    internal, reps_int = evaluation_intervals(y, fitted.internal_proba, class_names, clusters, n_boot, seed)
    external, reps_ext = evaluation_intervals(y_ext, fitted.external_proba, class_names, ext_clusters, n_boot,
                                              seed + 1)
    gap = evaluation_gap(internal, reps_int, external, reps_ext)
    if set(np.unique(y_ext)) != set(range(len(class_names))):
        # EXT's macro values cover only its own classes: not comparable with TRAIN's, so no gap for them
        for name in MACRO_METRICS:
            gap[name] = {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    calibrated = None
    if fitted.internal_calibrated is not None:
        calibrated = {
            "method": settings.calibrate,
            "internal": calibration_summary(y, fitted.internal_calibrated),
            "external": calibration_summary(y_ext, fitted.external_calibrated),
            "internal_accuracy": float((fitted.internal_calibrated.argmax(1) == y).mean()),
            "external_accuracy": float((fitted.external_calibrated.argmax(1) == y_ext).mean())}
    conformal = {"alpha": settings.alpha}
    for where, sets, labels in (("internal", fitted.internal_sets, y), ("external", fitted.external_sets, y_ext)):
        conformal[where] = set_summary(sets, labels)
        conformal[where]["per_class"] = {name: set_summary(sets[labels == k], labels[labels == k])
                                         for k, name in enumerate(class_names)}
        covered = conformal[where]["covered"]
        conformal[where]["ci_low"], conformal[where]["ci_high"] = wilson_interval(covered, len(labels))
    subgroups = {column: _subgroup_rows(y_ext, fitted.external_proba, fitted.external_sets, values, column,
                                        class_names)
                 for column, values in subgroup_values.items()}
    return ModelResult(
        fitted.backbone, fitted.head, round(fitted.seconds, 2),
        {"n": len(y), **internal, "calibration": calibration_summary(y, fitted.internal_proba)},
        {"n": len(y_ext), **external, "calibration": calibration_summary(y_ext, fitted.external_proba)},
        gap, conformal, subgroups, calibrated)


def _interval_notes(y: np.ndarray, clusters: np.ndarray | None, y_ext: np.ndarray, ext_clusters: np.ndarray | None,
                    class_names: list[str]) -> list[str]:
    """Notes on the interval rule (``classify.bootstrap``) where it departs from the bootstrap: a TRAIN or EXT
    of fewer than SMALL_SAMPLE patients (or images), and an EXT lacking some of TRAIN's classes."""
    notes = []
    for where, labels, units in (("TRAIN", y, clusters), ("EXT", y_ext, ext_clusters)):
        n = resampling_units(len(labels), units)
        if n < SMALL_SAMPLE:
            what = ("patient" if units is not None else "image") + ("" if n == 1 else "s")
            notes.append(f"{where} has {n} {what} (fewer than {SMALL_SAMPLE}): its accuracy, sensitivity and "
                         f"specificity get Wilson 95% intervals instead of the bootstrap, macro F1 and AUC no "
                         f"interval, and its gaps the MOVER interval of the two sides")
    absent = [name for k, name in enumerate(class_names) if not (np.asarray(y_ext) == k).any()]
    if absent:
        notes.append(f"EXT lacks class {', '.join(repr(a) for a in absent)}: its macro F1 and macro AUC cover "
                     f"only the classes it has, so they get no gap")
    return notes


def _flags(models: list[ModelResult]) -> list[dict[str, Any]]:
    """Subgroup rows whose accuracy interval lies wholly below the model's internal accuracy."""
    flagged = []
    for m in models:
        internal = m.internal["metrics"]["accuracy"]["value"]
        for column, rows in m.subgroups.items():
            for row in rows:
                if row["ci_high"] < internal:
                    flagged.append({"model": f"{m.backbone}+{m.head}", "internal_accuracy": internal, **row})
    return flagged


# ---------------------------------------------------------------------------------------------- run


def patient_groups(full: Dataset, train: Dataset, group_by: str, duplicate_embeddings: np.ndarray | None,
                   merge_duplicates: bool, cache_dir: str | Path) -> tuple[np.ndarray, list[str]]:
    """TRAIN's groups for folds, permutations and bootstrap: its ``group_by`` ids, joined over near-duplicate
    radiographs by the audit rule unless ``merge_duplicates`` is off (``duplicate_embeddings``: the
    ``DUPLICATE_RULE_BACKBONE`` embeddings of ``train``'s samples in order, or None for pHash alone). Returns
    (groups, the joined groups in words)."""
    groups = resolve_groups(train, group_by, merge_duplicates=False)
    if not merge_duplicates:
        return groups, []
    embeddings = (None if duplicate_embeddings is None
                  else {s.sha256: duplicate_embeddings[i] for i, s in enumerate(train.samples)})
    found = duplicate_aware_groups(train, groups, embeddings, hash_cache_path(full, cache_dir))
    return found.groups, found.merged


def json_safe(value: Any) -> Any:
    """``value`` with every nan (an undefined metric) as None, so results.json is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _mapie_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("mapie")
    except metadata.PackageNotFoundError:
        return "?"


def evaluate_validate(settings: ValidateSettings) -> ValidateResult:
    """Fit, evaluate internally and externally (module docstring), in memory: nothing but the embedding and
    hash caches is written (``write_validate_run`` writes the run folder). With ``save`` or ``explain`` the
    heads fitted on all of TRAIN are kept in ``result.fitted``."""

    watch = Stopwatch()
    configs = parse_backbone_list(settings.backbones)
    heads = parse_head_list(settings.heads)
    notes: list[str] = []
    full = load_dataset(settings.data)
    pool = training_pool(full)
    external = load_dataset(settings.external)
    class_names = list(pool.class_names)
    unknown = sorted(set(external.class_names) - set(class_names))
    if unknown:
        raise CxrError(f"{external.root}: classes {', '.join(unknown)} are not among TRAIN's classes "
                       f"({', '.join(class_names)})")
    _refuse_full_overlap(train_overlap(pool, pool.samples, external, external.samples), external)
    columns = external.columns
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
    pool_groups = resolve_groups(pool, group_by, merge_duplicates=False)  # fail before extracting when grouping cannot work
    check_sizes(np.array([class_names.index(s.label) for s in pool.samples]), pool_groups, settings.folds,
                settings.alpha, settings.seed, class_names, heads, settings.calibrate)   # before extracting

    features, ext_features, extraction = {}, {}, {}
    train_failures: list[tuple[str, str]] = []
    ext_failures: list[tuple[str, str]] = []
    for config in configs:
        extract = settings.extract.with_backbone(config.name)
        features[config.name], result = load_features(full, extract)
        # int8: EXT goes through the int8 model quantized on TRAIN, the one its saved heads are predicted with
        ext_features[config.name], ext_result = load_features(
            external, replace(extract, int8_sample_digest=result.int8_sample_digest))
        extraction[config.name] = {"cache": str(result.cache_path), "external_cache": str(ext_result.cache_path),
                                   "weights": result.weights.describe(), "weights_sha256": result.weights.sha256,
                                   "onnx_sha256": result.onnx_sha256, "input_size": features[config.name].attrs.get(
                                       "input_size"), "skipped": result.failures + ext_result.failures,
                                   "precision": result.precision, "int8_sample_digest": result.int8_sample_digest}
        train_failures += result.failures
        ext_failures += ext_result.failures
    watch.lap("read_and_embed")
    samples, arrays = align_feature_sets(features, {s.sha256 for s in pool.samples})
    ext_samples, ext_arrays = align_feature_sets(ext_features)
    skipped = {"TRAIN": _skipped(full, train_failures), "EXT": _skipped(external, ext_failures)}
    vgg_train, vgg_ext = arrays.get(DUPLICATE_RULE_BACKBONE), ext_arrays.get(DUPLICATE_RULE_BACKBONE)
    overlap = train_overlap(pool, samples, external, ext_samples,
                            near_duplicate_pairs(full, samples, external, ext_samples, vgg_train, vgg_ext,
                                                 Path(settings.extract.cache_dir)))
    _refuse_full_overlap(overlap, external)
    excluded = set(overlap["excluded"]["images"])
    keep = [i for i, s in enumerate(ext_samples) if external.relative(s) not in excluded]
    ext_samples, ext_arrays = [ext_samples[i] for i in keep], {k: v[keep] for k, v in ext_arrays.items()}
    warnings = [w for w in [_overlap_warning(overlap)] if w]
    index = {name: i for i, name in enumerate(class_names)}
    y = np.array([index[s.label] for s in samples])
    y_ext = np.array([index[s.label] for s in ext_samples])
    train = Dataset(pool.root, samples, class_names, pool.has_groups)

    clusters = groups = None
    merged: list[str] = []
    if group_by:
        vgg = arrays.get(DUPLICATE_RULE_BACKBONE)
        groups, merged = patient_groups(full, train, group_by, vgg, settings.merge_duplicates,
                                        settings.extract.cache_dir)
        clusters = groups
        if merged:
            notes.append(f"{len(merged)} group(s) joined patients that share a near-duplicate radiograph "
                         f"(audit rule{'' if vgg is not None else ', pHash alone'}): {'; '.join(merged[:5])}"
                         + (" ..." if len(merged) > 5 else ""))
    watch.lap("groups_and_duplicates")
    # again on the images embedded and the groups merged: skipped images or joined patients can shrink them
    check_sizes(y, groups, settings.folds, settings.alpha, settings.seed, class_names, heads, settings.calibrate)
    outer = cv_splits(y, settings.folds, 1, settings.seed, groups, class_names)
    ext_clusters = np.array([s.group for s in ext_samples]) if external.has_groups and all(
        s.group for s in ext_samples) else None
    if external.has_groups and ext_clusters is None:
        lacking = [external.relative(s) for s in ext_samples if not s.group]
        unmatched = external.manifest_unmatched
        notes.append(f"{len(lacking)} EXT image(s) have no patient id (first: {lacking[0]})"
                     + (f"; {len(unmatched)} row(s) of its manifest.csv match no image (first: '{unmatched[0]}')"
                        if unmatched else "") + ": the external bootstrap resamples images, not patients")
    notes += _interval_notes(y, clusters, y_ext, ext_clusters, class_names)
    subgroup_values = {}
    for column in subgroup_columns:
        if column == "label":
            subgroup_values[column] = [s.label for s in ext_samples]
        elif column == "split":
            subgroup_values[column] = [s.split or "-" for s in ext_samples]
        else:
            subgroup_values[column] = [s.column(column) or "(missing)" for s in ext_samples]

    tasks = [(backbone, head, part) for backbone in arrays for head in heads for part in [None, *range(len(outer))]]
    parts = Parallel(n_jobs=settings.n_jobs)(
        delayed(_fit_part)(backbone, head, part, arrays[backbone], y, groups, outer, ext_arrays[backbone], settings,
                           len(class_names))
        for backbone, head, part in tasks)
    fitted = _assemble(parts, len(y), len(class_names))
    watch.lap("fit")
    models = Parallel(n_jobs=settings.n_jobs)(
        delayed(_score)(replace(f, model=None), y, clusters, y_ext, ext_clusters, subgroup_values, class_names,
                        settings)
        for f in fitted)
    watch.lap("bootstrap_and_scores")
    flagged = _flags(models)
    verdict = verdict_lines(models, flagged, settings)
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
                        seconds=watch.elapsed(), external_overlap_excluded=overlap["excluded"]["n"],
                        skipped={k: [list(x) for x in v] for k, v in skipped.items()})
    return ValidateResult(settings, class_names, models, verdict, notes, record, fitted, ext_samples,
                          [external.relative(s) for s in ext_samples], subgroup_values, flagged, warnings, overlap,
                          skipped)


def write_validate_run(result: ValidateResult, out_dir: str | Path, run_name: str | None = None) -> Path:
    """Write the run folder of a validation under ``out_dir`` (named ``run_name``, else
    ``validate-<time>-<random>``): report.md, results.json, results.csv, accuracy.png, reliability.png,
    external_predictions.csv, record.json; with ``save`` (or ``explain``, which reads them) one
    ``<backbone>-<head>.joblib`` per model, and with ``explain`` the heatmaps of the external errors. Sets
    ``result.run_dir``."""
    settings, class_names, record = result.settings, result.class_names, dict(result.record)
    with writing_run_folder(out_dir, "validate", run_name, "validate") as run_dir:
        if settings.save or settings.explain:   # explain needs the heads on disk
            record["saved_models"] = []
            for f in result.fitted:
                path = save_head(run_dir / f"{f.name}.joblib", f.model, class_names,
                                 [{"backbone": f.backbone, **record["extraction"][f.backbone]}],
                                 {"trained_on": record["train_fingerprint"], "n_train": record["n_train"],
                                  "head": f.head, "seed": settings.seed, "dataset": record["train_root"],
                                  "conformal_alpha": settings.alpha})
                record["saved_models"].append(str(path))
        if settings.explain:
            record["explain"] = explain_errors(run_dir, result)
        write_json(run_dir / "record.json", record)
        write_json(run_dir / "results.json", json_safe({
            "kind": "validate", "class_names": class_names, "record": record, "verdict": result.verdict,
            "notes": result.notes, "warnings": result.warnings, "overlap": result.overlap,
            "flagged_subgroups": result.flagged, "models": [m.as_dict() for m in result.models]}))
        write_external_predictions(run_dir / "external_predictions.csv", result.external_names,
                                   [s.label for s in result.external_images], result.subgroup_values,
                                   result.fitted, class_names)
        write_report(run_dir, result.models, result.verdict, result.notes, class_names, record, settings,
                     warnings=result.warnings, overlap=result.overlap, skipped=result.skipped)
        if settings.explain:
            with open(run_dir / "report.md", "a", encoding="utf-8") as handle:
                handle.write("\n" + explain_section(record["explain"]) + "\n")
    result.run_dir = run_dir
    return run_dir


def run_validate(settings: ValidateSettings, out_dir: str | Path, run_name: str | None = None) -> ValidateResult:
    """``evaluate_validate`` then ``write_validate_run``, the folder checked first (``evaluate_then_write``)."""
    return evaluate_then_write(evaluate_validate, write_validate_run, settings, out_dir, run_name)


LINEAR_HEADS = ("logreg", "linsvm")
"""Heads whose heatmaps are exact class activation maps (cheap); others need occlusion (64 passes per image)."""


def explain_errors(run_dir: Path, result: ValidateResult) -> dict[str, Any]:
    """``--explain N``: a sheet of the N most confident external errors of one model, with heatmaps, and the
    mean share of positive evidence in the border region per true class over every external image. Reads the
    heads saved in ``run_dir``.

    The model: the linear head (exact CAM) with the best external accuracy, else the best model (occlusion).
    """
    settings, class_names, ext_samples = result.settings, result.class_names, result.external_images
    y_ext = np.array([class_names.index(s.label) for s in ext_samples])
    accuracy = {(m.backbone, m.head): m.external["metrics"]["accuracy"]["value"] for m in result.models}
    linear = [f for f in result.fitted if f.head in LINEAR_HEADS]
    chosen = max(linear or result.fitted, key=lambda f: accuracy[(f.backbone, f.head)])
    name = f"{chosen.backbone}+{chosen.head}"
    model_path = run_dir / f"{chosen.name}.joblib"
    extract = settings.extract.with_backbone(chosen.backbone)
    proba = chosen.external_proba
    predicted = proba.argmax(axis=1)
    errors = [i for i in np.argsort(-proba.max(axis=1), kind="stable") if predicted[i] != y_ext[i]]
    shown = errors[:settings.explain]
    found: dict[str, Any] = {"model": name, "why": "linear head with the best external accuracy (exact CAM)"
                             if linear else "best external accuracy (no linear head: occlusion)",
                             "n_errors": len(errors), "shown": []}
    if shown:
        sheet, explained = explanation_sheet(
            [ext_samples[i].path for i in shown], model_path, run_dir / "explain-errors.png",
            captions=[f"true {class_names[y_ext[i]]}: {Path(ext_samples[i].path).name[:28]}" for i in shown],
            settings=extract, own_run=True)
        found["sheet"] = sheet.name
        found["shown"] = [{"path": str(ext_samples[i].path), "true": class_names[y_ext[i]],
                           "predicted": e.predicted, "probability": round(e.probability, 4),
                           "border_share": e.shares["border"]} for i, e in zip(shown, explained)]
    explainer = load_explainer(model_path, extract, "auto", own_run=True)   # the heads this run just saved
    external = Dataset(Path(os.path.commonpath([str(Path(s.path).parent) for s in ext_samples])),
                       list(ext_samples), list(class_names))
    skipped: list[tuple[str, str]] = []
    pairs = list(iter_explanations(external, explainer, extract, skipped))
    truth = {s.sha256: class_names[y] for s, y in zip(ext_samples, y_ext)}
    shares = mean_shares([e for e, _ in pairs], [truth[s.sha256] for _, s in pairs])
    found["method"] = explainer.method
    found["border_share_by_true_class"] = {k: {"mean": v[0], "n": v[1]} for k, v in shares.items()}
    return found


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
