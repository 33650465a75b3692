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

A run folder like compare's: report.md (verdict first), results.json, results.csv, accuracy.png,
reliability.png, external_predictions.csv, record.json, and with ``save`` one ``<backbone>-<head>.joblib``
per model that ``predict`` loads (``--conformal ALPHA`` adds the prediction set).
"""
from __future__ import annotations

import csv
import datetime as _dt
import math
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
    BINNING_WORDS,
    CALIBRATION_METHODS,
    calibrated_head,
    calibration_summary,
    plot_reliability,
)
from cxr_transfer.classify.conformal import ConformalHead, fit_conformal, nested_sets, prediction_sets, set_summary
from cxr_transfer.classify.duplicate_groups import duplicate_aware_groups
from cxr_transfer.classify.heads import make_head, parse_head_list
from cxr_transfer.classify.protocols import Split, cv_splits, resolve_groups
from cxr_transfer.classify.results import test_fingerprint
from cxr_transfer.core.cache_keys import dataset_cache_id
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.plotting import subplots
from cxr_transfer.core.record import run_record, write_json
from cxr_transfer.core.tables import markdown_table
from cxr_transfer.extract.dataset import MANIFEST_NAME, Dataset, load_dataset
from cxr_transfer.extract.pipeline import ExtractSettings, FeatureSet, load_features

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
                "save": self.save}


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


def _aligned(features: dict[str, FeatureSet], keep: set[str] | None = None) -> tuple[list, dict[str, np.ndarray]]:
    """The samples every backbone could read (restricted to ``keep`` sha256), same order, and their rows."""
    common = set.intersection(*(set(f.sha256) for f in features.values()))
    if keep is not None:
        common &= keep
    reference = next(iter(features.values()))
    samples = [s for s in reference.samples if s.sha256 in common]
    arrays = {}
    for name, feature_set in features.items():
        row = {sha: i for i, sha in enumerate(feature_set.sha256)}
        arrays[name] = feature_set.embeddings[[row[s.sha256] for s in samples]]
    return samples, arrays


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
            if settings.save:
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


# ---------------------------------------------------------------------------------------------- report


def _ci(stat: dict[str, float] | None, digits: int = 3) -> str:
    if not stat or stat.get("value") is None or math.isnan(stat["value"]):
        return "-"
    if math.isnan(stat["ci_low"]):
        return f"{stat['value']:.{digits}f}"
    return f"{stat['value']:.{digits}f} [{stat['ci_low']:.{digits}f}, {stat['ci_high']:.{digits}f}]"


def _signed_ci(stat: dict[str, float]) -> str:
    if math.isnan(stat["value"]):
        return "-"
    return f"{stat['value']:+.3f} [{stat['ci_low']:+.3f}, {stat['ci_high']:+.3f}]"


def _name(m: dict[str, Any]) -> str:
    return f"{m['backbone']} + {m['head']}"


def _verdict(models: list[dict[str, Any]], flagged: list[dict[str, Any]], settings: ValidateSettings) -> list[str]:
    lines = []
    best = max(models, key=lambda m: m["external"]["metrics"]["accuracy"]["value"])
    acc = lambda m, where: m[where]["metrics"]["accuracy"]  # noqa: E731
    lines.append(f"Best external accuracy: {_name(best)}, {_ci(acc(best, 'external'))} on "
                 f"{best['external']['n']} external images vs {_ci(acc(best, 'internal'))} internally "
                 f"(gap {_signed_ci(best['gap']['accuracy'])}).")
    dropped = [m for m in models if m["gap"]["accuracy"]["ci_high"] < 0]
    lines.append(f"{len(dropped)} of {len(models)} models lose accuracy outside their interval on the external "
                 f"data" + (f": {', '.join(_name(m) for m in dropped)}." if dropped else "."))
    by_group: dict[tuple, list[dict]] = {}
    for row in flagged:
        by_group.setdefault((row["column"], row["value"], row["class"], row["n"]), []).append(row)
    if by_group:
        parts = []
        for (column, value, cls, n), rows in sorted(by_group.items(), key=lambda kv: -len(kv[1])):
            worst = min(rows, key=lambda r: r["accuracy"])
            within = "" if cls == "all" else f", class {cls}"
            parts.append(f"{column}={value}{within} (n={n}): below the internal accuracy for {len(rows)} of "
                         f"{len(models)} models, worst {worst['model']} {worst['accuracy']:.3f} "
                         f"[{worst['ci_low']:.3f}, {worst['ci_high']:.3f}]")
        lines.append("Subgroups whose accuracy interval lies wholly below the internal accuracy: " +
                     "; ".join(parts) + ".")
    else:
        lines.append("No subgroup's accuracy interval lies wholly below the internal accuracy.")
    target = 1 - settings.alpha
    cov = [(m["conformal"]["internal"]["coverage"], m["conformal"]["external"]["coverage"]) for m in models]
    lines.append(f"Conformal sets (alpha {settings.alpha:g}, target coverage {target:.2f}): internal coverage "
                 f"{min(c[0] for c in cov):.3f}-{max(c[0] for c in cov):.3f}, external "
                 f"{min(c[1] for c in cov):.3f}-{max(c[1] for c in cov):.3f} across models.")
    ece = [(m["internal"]["calibration"]["ece"], m["external"]["calibration"]["ece"]) for m in models]
    lines.append(f"Calibration: ECE internal {min(e[0] for e in ece):.3f}-{max(e[0] for e in ece):.3f}, external "
                 f"{min(e[1] for e in ece):.3f}-{max(e[1] for e in ece):.3f} across models.")
    return lines


def _metric_table(m: dict[str, Any], class_names: list[str]) -> str:
    labels = {"accuracy": "accuracy", "macro_f1": "macro F1", "auc_macro": "AUC (macro, one-vs-rest)"}
    for name in class_names:
        labels.update({f"sensitivity_{name}": f"sensitivity {name}", f"specificity_{name}": f"specificity {name}",
                       f"auc_{name}": f"AUC {name}"})
    rows = [{"metric": label, f"internal (n={m['internal']['n']})": _ci(m["internal"]["metrics"][key]),
             f"external (n={m['external']['n']})": _ci(m["external"]["metrics"][key]),
             "gap (external - internal)": _signed_ci(m["gap"][key])} for key, label in labels.items()]
    return markdown_table(rows)


def _calibration_table(models: list[dict[str, Any]]) -> str:
    rows = []
    for m in models:
        row = {"model": _name(m), "ECE internal": f"{m['internal']['calibration']['ece']:.3f}",
               "ECE external": f"{m['external']['calibration']['ece']:.3f}",
               "Brier internal": f"{m['internal']['calibration']['brier']:.3f}",
               "Brier external": f"{m['external']['calibration']['brier']:.3f}"}
        if "calibrated" in m:
            c = m["calibrated"]
            row.update({f"ECE int. {c['method']}": f"{c['internal']['ece']:.3f}",
                        f"ECE ext. {c['method']}": f"{c['external']['ece']:.3f}",
                        f"Brier int. {c['method']}": f"{c['internal']['brier']:.3f}",
                        f"Brier ext. {c['method']}": f"{c['external']['brier']:.3f}",
                        f"acc. int./ext. {c['method']}":
                            f"{c['internal_accuracy']:.3f} / {c['external_accuracy']:.3f}"})
        rows.append(row)
    return markdown_table(rows)


def _conformal_table(models: list[dict[str, Any]], class_names: list[str]) -> str:
    rows = []
    for m in models:
        for where in ("internal", "external"):
            s = m["conformal"][where]
            row = {"model": _name(m), "data": where, "n": s["n"],
                   "coverage [Wilson 95%]": f"{s['coverage']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]",
                   "mean set size": f"{s['mean_size']:.2f}", "empty sets": f"{s['empty']:.1%}"}
            for name in class_names:
                c = s["per_class"][name]
                row[f"{name}: coverage / size"] = "-" if not c["n"] else f"{c['coverage']:.2f} / {c['mean_size']:.2f}"
            rows.append(row)
    return markdown_table(rows)


def _subgroup_table(rows: list[dict[str, Any]], class_names: list[str], internal: float) -> str:
    out = []
    for r in rows:
        row = {"value": r["value"], "class": r["class"], "n": r["n"],
               "accuracy [Wilson 95%]": f"{r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
                                        + (" **below**" if r["ci_high"] < internal else "")}
        for name in class_names:
            value = r[f"sensitivity_{name}"]
            row[f"sens. {name}"] = "-" if value is None else f"{value:.2f} ({r[f'n_{name}']})"
        row["set coverage / size"] = f"{r['coverage']:.2f} / {r['mean_set_size']:.2f}"
        out.append(row)
    return markdown_table(out)


def plot_accuracy_dots(path: Path, models: list[dict[str, Any]]) -> Path:
    """Internal vs external accuracy of every model, dots with their 95% bootstrap intervals."""
    fig, ax = subplots(figsize=(6.5, 0.45 * len(models) + 1.4))
    for row, m in enumerate(models):
        for offset, where, color in ((-0.12, "internal", "tab:blue"), (0.12, "external", "tab:red")):
            s = m[where]["metrics"]["accuracy"]
            ax.errorbar(s["value"], row + offset, xerr=[[s["value"] - s["ci_low"]], [s["ci_high"] - s["value"]]],
                        fmt="o", color=color, capsize=3, markersize=4, label=where if row == 0 else None)
    ax.set_yticks(range(len(models)), [_name(m) for m in models], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy (95% patient-bootstrap interval)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def _write_results_csv(path: Path, models: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["backbone", "head", "evaluation", "subgroup", "class", "metric", "value", "ci_low",
                         "ci_high", "n"])
        for m in models:
            for where in ("internal", "external", "gap"):
                metrics = m["gap"] if where == "gap" else m[where]["metrics"]
                n = "" if where == "gap" else m[where]["n"]
                for metric, s in metrics.items():
                    writer.writerow([m["backbone"], m["head"], where, "", "", metric, s["value"], s["ci_low"],
                                     s["ci_high"], n])
            for where in ("internal", "external"):
                cal = m[where]["calibration"]
                writer.writerow([m["backbone"], m["head"], where, "", "", "ece", cal["ece"], "", "", m[where]["n"]])
                writer.writerow([m["backbone"], m["head"], where, "", "", "brier", cal["brier"], "", "",
                                 m[where]["n"]])
                if "calibrated" in m:
                    c = m["calibrated"]
                    for key in ("ece", "brier"):
                        writer.writerow([m["backbone"], m["head"], f"{where}-{c['method']}", "", "", key,
                                         c[where][key], "", "", m[where]["n"]])
                s = m["conformal"][where]
                writer.writerow([m["backbone"], m["head"], where, "", "", "conformal_coverage", s["coverage"],
                                 s["ci_low"], s["ci_high"], s["n"]])
                writer.writerow([m["backbone"], m["head"], where, "", "", "conformal_set_size", s["mean_size"], "",
                                 "", s["n"]])
            for column, rows in m["subgroups"].items():
                for r in rows:
                    writer.writerow([m["backbone"], m["head"], "external", f"{column}={r['value']}", r["class"],
                                     "accuracy", r["accuracy"], r["ci_low"], r["ci_high"], r["n"]])


def write_external_predictions(path: Path, names: list[str], labels: list[str], subgroup_values: dict[str, list[str]],
                               fitted: list[dict[str, Any]], class_names: list[str]) -> Path:
    """One row per external image: its label and subgroups, then per model the predicted class, its
    probability and the conformal set (classes joined by '|')."""
    from cxr_transfer.classify.conformal import format_set

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["path", "label", *subgroup_values]
        for f in fitted:
            stem = f"{f['backbone']}-{f['head']}"
            header += [f"{stem}:predicted", f"{stem}:probability", f"{stem}:set"]
        writer.writerow(header)
        for i, (name, label) in enumerate(zip(names, labels)):
            row = [name, label, *(values[i] for values in subgroup_values.values())]
            for f in fitted:
                proba = f["external_proba"][i]
                row += [class_names[int(proba.argmax())], f"{proba.max():.4f}",
                        format_set(f["external_sets"][i], class_names)]
            writer.writerow(row)
    return path


def write_report(run_dir: Path, models: list[dict[str, Any]], verdict: list[str], notes: list[str],
                 class_names: list[str], record: dict[str, Any], settings: ValidateSettings) -> Path:
    """report.md (verdict first), results.csv, accuracy.png and reliability.png in ``run_dir``."""
    _write_results_csv(run_dir / "results.csv", models)
    plot_accuracy_dots(run_dir / "accuracy.png", models)
    panels = {}
    for m in models:
        curves = {"internal": m["internal"]["calibration"]["bins"], "external": m["external"]["calibration"]["bins"]}
        if "calibrated" in m:
            c = m["calibrated"]
            curves[f"internal, {c['method']}"] = c["internal"]["bins"]
            curves[f"external, {c['method']}"] = c["external"]["bins"]
        panels[_name(m)] = curves
    plot_reliability(run_dir / "reliability.png", panels)
    grouping = record["grouping"]
    lines = [f"# cxr-transfer validate: {Path(settings.data).name} -> {Path(settings.external).name}", "",
             "## Verdict", "", *[f"- {line}" for line in verdict], "",
             f"- TRAIN: `{record['train_root']}` ({record['n_train']} images{record['train_note']}); "
             f"EXT: `{record['external_root']}` ({record['n_external']} images)",
             f"- internal: out-of-fold predictions of {settings.folds}-fold StratifiedGroupKFold of TRAIN by "
             f"{grouping}; external: each head fitted on all of TRAIN",
             f"- intervals: 95% percentile bootstrap, {settings.n_boot} replicates resampling "
             f"{record['internal_clusters']} (internal) and {record['external_clusters']} (external); the gap's "
             f"interval is that of the replicate differences; subgroup accuracies: Wilson 95% interval",
             f"- calibration: {BINNING_WORDS}",
             f"- conformal: MAPIE {record['mapie']} CrossConformalClassifier (LAC score, mean aggregation), "
             f"alpha {settings.alpha:g}, calibrated on TRAIN only with {settings.folds} folds grouped like the "
             f"internal CV; internal coverage nested (each outer fold's sets come from a conformal model fitted "
             f"without it)",
             f"- seed {settings.seed}; created {record['created']}; {record['seconds']:.0f} s", ""]
    lines += [f"- note: {note}" for note in notes]
    lines += ["", "![internal vs external accuracy](accuracy.png)", "", "## Internal vs external", ""]
    for m in models:
        lines += [f"### {_name(m)}", "", _metric_table(m, class_names), ""]
    lines += ["## Calibration", "", _calibration_table(models), "", "![reliability diagrams](reliability.png)", "",
              f"## Conformal prediction sets (alpha {settings.alpha:g}, target coverage {1 - settings.alpha:.2f})",
              "", "LAC sets can be empty: no class is plausible enough at this alpha (an empty set never covers).", "",
              _conformal_table(models, class_names), ""]
    if any(m["subgroups"] for m in models):
        lines += ["## Subgroups of the external data", "",
                  "Rows marked **below**: the accuracy interval lies wholly below the model's internal accuracy. "
                  "Sensitivity columns: value (images of that class).", ""]
        for m in models:
            internal = m["internal"]["metrics"]["accuracy"]["value"]
            for column, rows in m["subgroups"].items():
                lines += [f"### {_name(m)}: by {column} (internal accuracy {internal:.3f})", "",
                          _subgroup_table(rows, class_names, internal), ""]
    lines += ["Files: results.json (everything above), results.csv (long format), external_predictions.csv (every "
              "external image: label, subgroups, each model's prediction, probability and set), record.json.", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


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

    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        return now

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
    tick = lap("read_and_embed", started)
    samples, arrays = _aligned(features, {s.sha256 for s in pool.samples})
    ext_samples, ext_arrays = _aligned(ext_features)
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
    tick = lap("groups_and_duplicates", tick)
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
    tick = lap("fit", tick)
    models = Parallel(n_jobs=settings.n_jobs)(
        delayed(_score)({k: v for k, v in f.items() if k != "saved_model"}, y, clusters, y_ext, ext_clusters,
                        subgroup_values, class_names, settings)
        for f in fitted)
    tick = lap("bootstrap_and_scores", tick)
    flagged = _flags(models)
    verdict = _verdict(models, flagged, settings)

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(settings.out_dir) / (settings.run_name or f"validate-{stamp}")
    run_dir.mkdir(parents=True, exist_ok=True)
    record = run_record("validate", settings.record(), seed=settings.seed, train_root=str(pool.root),
                        train_note=", train/ split" if pool is not full else "", n_train=len(samples),
                        train_fingerprint=test_fingerprint([s.sha256 for s in samples]),
                        external_root=str(external.root), n_external=len(ext_samples),
                        external_fingerprint=test_fingerprint([s.sha256 for s in ext_samples]),
                        grouping=(f"{group_by}" + (" merged over near-duplicate clusters"
                                                   if settings.merge_duplicates else "")) if group_by else "image",
                        internal_clusters="patients" if clusters is not None else "images",
                        external_clusters="patients" if ext_clusters is not None else "images",
                        merged_groups=merged, mapie=_mapie_version(), extraction=extraction, timings=timings,
                        seconds=round(time.perf_counter() - started, 2))
    if settings.save:
        record["saved_models"] = []
        for f in fitted:
            path = save_head(run_dir / f"{f['backbone']}-{f['head']}.joblib", f["saved_model"], class_names,
                             [{"backbone": f["backbone"], **extraction[f["backbone"]]}],
                             {"trained_on": record["train_fingerprint"], "n_train": len(y), "head": f["head"],
                              "seed": settings.seed, "dataset": str(pool.root), "conformal_alpha": settings.alpha})
            record["saved_models"].append(str(path))
    write_json(run_dir / "record.json", record)
    write_json(run_dir / "results.json", _json_safe({"kind": "validate", "class_names": class_names,
                                                     "record": record, "verdict": verdict, "notes": notes,
                                                     "flagged_subgroups": flagged, "models": models}))
    write_external_predictions(run_dir / "external_predictions.csv", [external.relative(s) for s in ext_samples],
                               [s.label for s in ext_samples], subgroup_values, fitted, class_names)
    write_report(run_dir, models, verdict, notes, class_names, record, settings)
    return ValidateRun(run_dir, class_names, models, verdict, notes)


def _hash_cache_name() -> str:
    from cxr_transfer.audit.duplicates import HASH_CACHE_NAME

    return HASH_CACHE_NAME
