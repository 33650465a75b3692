"""Compare (``cxr.compare``): scikit-learn heads on cached embeddings, evaluated on identical splits.

For every backbone the embeddings come from the HDF5 cache (extracted first when missing). The splits are
computed once on the evaluated images, so every backbone and head is scored on exactly the same test sets
with the same metrics (``classify.metrics``). Fits run in parallel processes, one BLAS thread each.

Computing and writing are separate: ``evaluate_compare(settings)`` returns a ``CompareResult`` in memory (only
the embedding cache is written), ``write_compare_run(result, out_dir)`` writes its run folder, and
``run_compare(settings, out_dir)`` does both, checking the folder before any computing.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.utils.parallel import Parallel, delayed  # propagates sklearn config; quiet inner CV
from threadpoolctl import threadpool_limits

from cxr_transfer.classify.comparisons import CORRECT, INNER_SCORE, correctness_string, select_heads
from cxr_transfer.extract.duplicates import hash_cache_path
from cxr_transfer.classify.heads import get_head, make_head, make_tuned_head, parse_head_list
from cxr_transfer.classify.metrics import classification_metrics, headline, summarize, summarize_proportion
from cxr_transfer.classify.protocols import (
    Split,
    check_splittable,
    cv_splits,
    holdout_split,
    paper_splits,
    resolve_groups,
)
from cxr_transfer.classify.report import compare_summary_text, write_compare_report
from cxr_transfer.classify.results import (
    Evaluation,
    evaluate_then_write,
    images_fingerprint,
    save_results,
    writing_run_folder,
)
from cxr_transfer.classify.saved_model import save_head
from cxr_transfer.core.params import COUNT, FOLDS, FRACTION, JOBS, SEED, Options, check_params, names_argument, param
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.record import run_record, write_json
from cxr_transfer.extract.dataset import Dataset, load_dataset
from cxr_transfer.extract.pipeline import ExtractSettings, FeatureSet, align_feature_sets, load_features
from cxr_transfer.extract.registry import parse_backbone_list

log = logging.getLogger(__name__)

PROTOCOLS = ("paper", "cv", "holdout")
CONCAT_NAME = "concat"
SUMMARY_METRICS = ("accuracy", "covid_sensitivity", "covid_specificity", "macro_f1", "roc_auc_macro")
PROPORTIONS = ("accuracy", "covid_sensitivity", "covid_specificity")
"""Summary metrics that are proportions: their intervals are Wilson intervals inside [0, 1]."""


@dataclass
class CompareSettings:
    """Every setting of a comparison; defaults are the paper's protocol with all heads on VGG16."""

    data: Path
    extract: ExtractSettings = field(default_factory=ExtractSettings)
    backbones: str = param("vgg16", help="backbone names, comma list or 'all'", flag="--backbone")
    heads: str = param("all", help="comma list of logreg,linsvm,rbfsvm,knn,rf,hgb,mlp or 'all'")
    protocol: str = param("paper", Options(PROTOCOLS),
                          "paper: seeded stratified 80/20 of train/; cv: repeated stratified k-fold of train/; "
                          "holdout: fit on train/, evaluate on test/")
    seed: int = param(0, SEED, "first seed of the splits and heads")
    seeds: int = param(10, COUNT, "paper protocol: number of seeded splits (seeds seed .. seed+seeds-1)")
    folds: int = param(5, FOLDS, "cv protocol: folds")
    repeats: int = param(1, COUNT, "cv protocol: repeats")
    test_size: float = param(0.2, FRACTION, "paper protocol: test share of each split")
    group_by: str | None = param(None, help="patient_id (manifest/CSV) or dicom:PatientID (salted hash of the DICOM "
                                            "header's id): no patient on both sides of a split")
    concat: bool = param(False, help="also evaluate all backbones' embeddings concatenated")
    tune: bool = param(False, help="tune each head by inner CV on the training fold only")
    save: bool = param(False, help="refit each head on all evaluated images and save it")
    head: str | None = param(None, help="the head the report names as chosen (default: chosen on each split by CV "
                                        "inside its training part)")
    select_folds: int = param(3, FOLDS, "folds of the CV inside each training part that chooses the head")
    n_jobs: int = param(-1, JOBS, "parallel fits (default: all cores)", flag="--jobs")

    def __post_init__(self) -> None:
        self.backbones = names_argument("backbones", self.backbones)
        self.heads = names_argument("heads", self.heads)
        check_params(self)

    def record(self) -> dict[str, object]:
        return {"data": str(self.data), "backbones": self.backbones, "heads": self.heads,
                "protocol": self.protocol, "seed": self.seed, "seeds": self.seeds, "folds": self.folds,
                "repeats": self.repeats, "test_size": self.test_size, "group_by": self.group_by,
                "concat": self.concat, "tune": self.tune, "save": self.save, "head": self.head,
                "select_folds": self.select_folds, "extract": self.extract.record()}


@dataclass
class FittedHead:
    """A head refitted on every evaluated image (``save``), written as ``<backbone>-<head>.joblib``."""

    backbone: str                # a backbone name, or CONCAT_NAME
    head: str
    model: Any


@dataclass
class CompareResult:
    """A finished comparison, in memory: what ``write_compare_run`` writes and ``summary_lines`` prints."""

    settings: CompareSettings
    class_names: list[str]
    evaluations: list[Evaluation]
    summary: list[dict]
    record: dict[str, Any]                                          # record.json (without saved_models)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # dataset entries left out (path, reason)
    heads: list[FittedHead] = field(default_factory=list)          # settings.save: the heads to save
    run_dir: Path | None = None                                     # set once the run folder is written
    tracking: list[str] = field(default_factory=list)              # what MLflow logging did (tracking/)

    def summary_lines(self) -> list[str]:
        """What the compare command prints: the summary table with marks, the chosen heads and the paired tests,
        the dataset entries left out and, once written, the run folder and what MLflow logging did."""
        lines = compare_summary_text(self.evaluations, self.summary, self.settings.record()).split("\n")
        if self.skipped:
            lines += ["", f"{len(self.skipped)} file(s) or folder(s) of the dataset left out:"]
            lines += [f"  left out {path}: {reason}" for path, reason in self.skipped]
        if self.run_dir is not None:
            lines += ["", f"run folder: {self.run_dir} (report.md, results.json, results.csv, plots, record.json)"]
        return lines + self.tracking


def evaluation_pool(dataset: Dataset, protocol: str) -> Dataset:
    """The images a protocol evaluates: train/ for paper and cv when split folders exist, else all."""
    if protocol not in PROTOCOLS:
        raise CxrError(f"unknown protocol '{protocol}'; choose from: {', '.join(PROTOCOLS)}")
    if protocol in ("paper", "cv") and "train" in dataset.splits:
        return dataset.subset("train")
    return dataset


def make_splits(settings: CompareSettings, labels: np.ndarray, splits: np.ndarray,
                groups: np.ndarray | None, class_names: list[str]) -> list[Split]:
    """The protocol's splits over the evaluated images (same seed -> same splits)."""
    if settings.protocol == "paper":
        return paper_splits(labels, [settings.seed + i for i in range(settings.seeds)], settings.test_size, groups,
                            class_names)
    if settings.protocol == "cv":
        check_splittable(labels, settings.folds, class_names, groups)
        return cv_splits(labels, settings.folds, settings.repeats, settings.seed, groups, class_names)
    found = holdout_split(splits)
    unseen = sorted(set(labels[found[0].test_idx].tolist()) - set(labels[found[0].train_idx].tolist()))
    if unseen:
        names = ", ".join(f"'{class_names[i]}'" for i in unseen)
        raise CxrError(f"holdout: class {names} has images in test/ but none in train/; a head cannot predict a "
                       f"class it never saw (add training images of it, or remove it from test/)")
    if groups is None:
        return found
    # A fixed split cannot be re-drawn: drop from the test side the images of patients seen in training.
    split = found[0]
    seen = set(groups[split.train_idx])
    kept = np.array([i for i in split.test_idx if groups[i] not in seen], dtype=int)
    log.warning("holdout grouped by patient: %d of %d test images belong to patients in train/ and are left out",
                len(split.test_idx) - len(kept), len(split.test_idx))
    if len(np.unique(labels[kept])) < 2:
        raise CxrError("holdout grouped by patient: fewer than two classes left in test/ after removing "
                       "patients that are also in train/")
    return [Split(split.protocol, split.repeat, split.fold, split.train_idx, kept)]


def inner_cv_accuracy(head: str, X_train: np.ndarray, y_train: np.ndarray, folds: int, seed: int,
                      tune: bool = False) -> float:
    """Mean accuracy of a head over a stratified ``folds``-fold CV of one split's training part only.

    This is what chooses the "selected" head (``comparisons.select_heads``): it never sees the split's test
    images. Call under ``threadpool_limits(1)``.
    """
    model = make_tuned_head(head, seed) if tune else make_head(head, seed)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(model, X_train, y_train, cv=cv, scoring="accuracy")))


def score_split(backbone: str, head: str, X: np.ndarray, y: np.ndarray, split: Split, shas: list[str],
                class_names: list[str], seed: int, tune: bool, select_folds: int = 0) -> Evaluation:
    """Fit a head on the split's training part and score it on its test part.

    With ``select_folds`` >= 2 the evaluation also carries the head's inner-CV accuracy on the training part
    (``extra[INNER_SCORE]``); per-image correctness is kept in ``extra[CORRECT]`` for McNemar's test.
    """
    extra: dict = {}
    with threadpool_limits(1):
        if select_folds >= 2:
            extra[INNER_SCORE] = inner_cv_accuracy(head, X[split.train_idx], y[split.train_idx], select_folds,
                                                   seed, tune)
        model = make_tuned_head(head, seed) if tune else make_head(head, seed)
        start = time.perf_counter()
        model.fit(X[split.train_idx], y[split.train_idx])
        fitted = time.perf_counter()
        proba = model.predict_proba(X[split.test_idx])
        predicted = np.asarray(model.classes_)[proba.argmax(1)]
        done = time.perf_counter()
    metrics = classification_metrics(y[split.test_idx], predicted, class_names, proba)
    if tune:
        extra["best_params"] = {k: repr(v) for k, v in model.best_params_.items()}
    extra[CORRECT] = correctness_string(y[split.test_idx], predicted, [shas[i] for i in split.test_idx])
    return Evaluation(backbone, head, split.protocol, split.repeat, split.fold, len(split.train_idx),
                      len(split.test_idx), images_fingerprint(shas[i] for i in split.test_idx), metrics,
                      fitted - start, done - fitted, extra)


def _proportion_sizes(evaluation: Evaluation, metric: str, positive_class: str) -> float:
    """How many test images a proportion metric of one evaluation counts (its denominator)."""
    if metric == "accuracy":
        return evaluation.n_test
    support = evaluation.metrics["per_class"].get(positive_class, {}).get("support", 0)
    return support if metric.endswith("sensitivity") else evaluation.n_test - support


def summarize_evaluations(evaluations: list[Evaluation], positive_class: str = "covid") -> list[dict]:
    """Mean, std and 95% interval of the headline metrics per (backbone, model, protocol).

    Proportions (accuracy, sensitivity, specificity) get Wilson intervals inside [0, 1]
    (``metrics.summarize_proportion``); macro F1 and AUC get mean, std and a Student-t interval.
    """
    keys: dict[tuple[str, str, str], list[Evaluation]] = {}
    for evaluation in evaluations:
        keys.setdefault((evaluation.backbone, evaluation.model, evaluation.protocol), []).append(evaluation)
    rows = []
    for (backbone, model, protocol), group in keys.items():
        flat = [headline(e.metrics, positive_class) for e in group]
        row = {"backbone": backbone, "model": model, "protocol": protocol, "n_evaluations": len(group),
               "fit_seconds": float(np.mean([e.fit_seconds for e in group])),
               "predict_seconds": float(np.mean([e.predict_seconds for e in group])),
               "confusion_matrix": np.sum([e.metrics["confusion_matrix"] for e in group], axis=0).tolist()}
        for metric in SUMMARY_METRICS:
            key = metric.replace("covid", positive_class)
            kept = [(f[key], e) for f, e in zip(flat, group) if f[key] is not None]
            if not kept:
                row[metric] = None
            elif metric in PROPORTIONS:
                sizes = [_proportion_sizes(e, key, positive_class) for _, e in kept]
                row[metric] = (summarize_proportion([v for v, _ in kept], float(np.mean(sizes)),
                                                    float(np.mean([e.n_train for _, e in kept])))
                               if min(sizes) > 0 else None)
            else:
                row[metric] = summarize([v for v, _ in kept])
        rows.append(row)
    return rows


def _check_selectable(y: np.ndarray, splits: list[Split], folds: int, class_names: list[str]) -> None:
    """Fail before fitting when a training part is too small for the inner CV that chooses the head."""
    for split in splits:
        try:
            check_splittable(y[split.train_idx], folds, class_names)
        except CxrError as exc:
            raise CxrError(f"choosing a head by {folds}-fold CV inside each training part: {exc}; "
                           f"name the head with `head` or use fewer `select_folds`") from None




def run_dir_prefix(settings: CompareSettings, prefix: str = "compare") -> str:
    """``compare-<protocol>[-grouped]``: the default run folder name before its timestamp and random suffix."""
    return f"{prefix}-{settings.protocol}{'-grouped' if settings.group_by else ''}"


def evaluate_compare(settings: CompareSettings) -> CompareResult:
    """Extract (when needed), split, fit every head on every backbone and score it, in memory: nothing but the
    embedding cache is written (``write_compare_run`` writes the run folder). With ``settings.save`` each head
    is also refitted on every evaluated image and kept in ``result.heads``."""
    started = time.perf_counter()
    configs = parse_backbone_list(settings.backbones)
    heads = parse_head_list(settings.heads)
    if settings.head is not None and get_head(settings.head).name not in heads:
        raise CxrError(f"`head` {settings.head} is not among the compared heads ({', '.join(heads)})")
    if settings.head is None and len(heads) > 1 and settings.select_folds < 2:
        raise CxrError(f"`select_folds` must be at least 2 to choose a head by inner CV; got "
                       f"{settings.select_folds} instead")
    select_folds = settings.select_folds if settings.head is None and len(heads) > 1 else 0
    dataset = load_dataset(settings.data)
    pool = evaluation_pool(dataset, settings.protocol)
    resolve_groups(pool, settings.group_by, merge_duplicates=False)  # fail before extracting when grouping cannot work

    features: dict[str, FeatureSet] = {}
    extraction: dict[str, dict] = {}
    for config in configs:
        feature_set, result = load_features(dataset, settings.extract.with_backbone(config.name))
        features[config.name] = feature_set
        extraction[config.name] = {"cache": str(result.cache_path), "weights": result.weights.describe(),
                                   "weights_sha256": result.weights.sha256, "onnx_sha256": result.onnx_sha256,
                                   "computed": result.n_computed, "skipped": result.failures,
                                   "input_size": feature_set.attrs.get("input_size"),
                                   "precision": result.precision, "int8_sample_digest": result.int8_sample_digest}
    pool_shas = {s.sha256 for s in pool.samples}
    samples, arrays = align_feature_sets({k: FeatureSet(v.embeddings, v.samples, v.class_names)
                                for k, v in features.items()})
    keep = [i for i, s in enumerate(samples) if s.sha256 in pool_shas]
    samples = [samples[i] for i in keep]
    arrays = {k: v[keep] for k, v in arrays.items()}
    if settings.concat and len(arrays) > 1:
        arrays[CONCAT_NAME] = np.hstack(list(arrays.values()))
    class_names = list(dataset.class_names)
    index = {name: i for i, name in enumerate(class_names)}
    y = np.array([index[s.label] for s in samples])
    evaluated = Dataset(dataset.root, samples, class_names, dataset.has_groups)
    groups = resolve_groups(evaluated, settings.group_by,
                            hash_cache=hash_cache_path(dataset, settings.extract.cache_dir))
    splits = make_splits(settings, y, np.array([s.split for s in samples]), groups, class_names)
    shas = [s.sha256 for s in samples]
    if select_folds:
        _check_selectable(y, splits, select_folds, class_names)

    tasks = [(backbone, head, split) for split in splits for backbone in arrays for head in heads]
    evaluations = Parallel(n_jobs=settings.n_jobs)(
        delayed(score_split)(backbone, head, arrays[backbone], y, split, shas, class_names, settings.seed,
                             settings.tune, select_folds)
        for backbone, head, split in tasks)
    evaluations = list(evaluations) + select_heads(evaluations)
    summary = summarize_evaluations(evaluations)

    record = run_record("compare", settings.record(), seed=settings.seed, dataset_root=str(dataset.root),
                        dataset_fingerprint=dataset.fingerprint, dataset_skipped=dataset.skipped,
                        evaluated_images=len(samples), evaluated_fingerprint=images_fingerprint(shas),
                        extraction=extraction, n_splits=len(splits),
                        seconds=round(time.perf_counter() - started, 2))
    fitted = []
    if settings.save:
        for backbone, X in arrays.items():
            for head in heads:
                with threadpool_limits(1):
                    model = (make_tuned_head(head, settings.seed) if settings.tune
                             else make_head(head, settings.seed)).fit(X, y)
                fitted.append(FittedHead(backbone, head, model))
    return CompareResult(settings, class_names, evaluations, summary, record, list(dataset.skipped), fitted)


def write_compare_run(result: CompareResult, out_dir: str | Path, run_name: str | None = None) -> Path:
    """Write the run folder of a comparison under ``out_dir`` (named ``run_name``, else
    ``compare-<protocol>-<time>-<random>``): report.md, results.json, results.csv, comparisons.json, plots,
    record.json and, with ``save``, one ``<backbone>-<head>.joblib`` per head. Sets ``result.run_dir``."""
    settings, record = result.settings, dict(result.record)
    with writing_run_folder(out_dir, run_dir_prefix(settings), run_name, "compare") as run_dir:
        if settings.save:
            record["saved_models"] = []
            for fitted in result.heads:
                parts = list(record["extraction"]) if fitted.backbone == CONCAT_NAME else [fitted.backbone]
                path = save_head(run_dir / f"{fitted.backbone}-{fitted.head}.joblib", fitted.model,
                                 result.class_names, [{"backbone": p, **record["extraction"][p]} for p in parts],
                                 {"trained_on": record["evaluated_fingerprint"],
                                  "n_train": record["evaluated_images"], "head": fitted.head,
                                  "seed": settings.seed, "tune": settings.tune, "dataset": record["dataset_root"]})
                record["saved_models"].append(str(path))
        write_json(run_dir / "record.json", record)
        save_results(run_dir, "compare", result.class_names, record, result.evaluations, result.summary)
        write_compare_report(run_dir, result.class_names, result.evaluations, result.summary, record)
    result.run_dir = run_dir
    return run_dir


def run_compare(settings: CompareSettings, out_dir: str | Path, run_name: str | None = None) -> CompareResult:
    """``evaluate_compare`` then ``write_compare_run``, the folder checked first (``evaluate_then_write``)."""
    return evaluate_then_write(evaluate_compare, write_compare_run, settings, out_dir, run_name)
