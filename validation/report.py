"""The run folder of ``validate``: report.md (verdict first), results.csv (long format),
external_predictions.csv, accuracy.png (internal vs external, with intervals) and reliability.png.

Pure formatting of the numbers ``validation.run`` computed; nothing here fits or scores a model.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr_transfer.classify.bootstrap import SMALL_SAMPLE
from cxr_transfer.classify.calibration import BINNING_WORDS, plot_reliability
from cxr_transfer.classify.conformal import format_set
from cxr_transfer.core.io import printable
from cxr_transfer.core.plotting import subplots
from cxr_transfer.core.tables import markdown_table

if TYPE_CHECKING:
    from cxr_transfer.validation.run import FittedModel, ModelResult, ValidateSettings


def _ci(stat: dict[str, float] | None, digits: int = 3) -> str:
    if not stat or stat.get("value") is None or math.isnan(stat["value"]):
        return "-"
    if math.isnan(stat["ci_low"]):
        return f"{stat['value']:.{digits}f} (no interval)"
    return f"{stat['value']:.{digits}f} [{stat['ci_low']:.{digits}f}, {stat['ci_high']:.{digits}f}]"


def _signed_ci(stat: dict[str, float]) -> str:
    if stat.get("value") is None or math.isnan(stat["value"]):
        return "-"
    if math.isnan(stat["ci_low"]):
        return f"{stat['value']:+.3f} (no interval)"
    return f"{stat['value']:+.3f} [{stat['ci_low']:+.3f}, {stat['ci_high']:+.3f}]"


def _interval_words(models: list[ModelResult], where: str, units: str, n_boot: int) -> str:
    """Which interval rule (``classify.bootstrap.evaluation_intervals``) an evaluation got, in words."""
    first = getattr(models[0], where)
    if first.get("interval", "bootstrap") == "bootstrap":
        return f"{where}: 95% percentile bootstrap, {n_boot} replicates resampling {units}"
    return (f"{where}: Wilson 95% on its images for accuracy, sensitivity and specificity, none for macro F1 and "
            f"AUC ({first['units']} {units}, fewer than {SMALL_SAMPLE}: a bootstrap of so few is near-degenerate)")


def verdict_lines(models: list[ModelResult], flagged: list[dict[str, Any]],
                  settings: ValidateSettings) -> list[str]:
    """The verdict: best external model and its gap, models that lose accuracy, flagged subgroups with their
    size, conformal coverage and calibration ranges."""
    lines = []
    best = max(models, key=lambda m: m.external["metrics"]["accuracy"]["value"])
    acc = lambda m, where: getattr(m, where)["metrics"]["accuracy"]  # noqa: E731
    lines.append(f"Best external accuracy: {best.name}, {_ci(acc(best, 'external'))} on "
                 f"{best.external['n']} external images vs {_ci(acc(best, 'internal'))} internally "
                 f"(gap {_signed_ci(best.gap['accuracy'])}).")
    dropped = [m for m in models if m.gap["accuracy"]["ci_high"] < 0]
    lines.append(f"{len(dropped)} of {len(models)} models lose accuracy outside their interval on the external "
                 f"data" + (f": {', '.join(m.name for m in dropped)}." if dropped else "."))
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
    cov = [(m.conformal["internal"]["coverage"], m.conformal["external"]["coverage"]) for m in models]
    lines.append(f"Conformal sets (alpha {settings.alpha:g}, target coverage {target:.2f}): internal coverage "
                 f"{min(c[0] for c in cov):.3f}-{max(c[0] for c in cov):.3f}, external "
                 f"{min(c[1] for c in cov):.3f}-{max(c[1] for c in cov):.3f} across models.")
    ece = [(m.internal["calibration"]["ece"], m.external["calibration"]["ece"]) for m in models]
    lines.append(f"Calibration: ECE internal {min(e[0] for e in ece):.3f}-{max(e[0] for e in ece):.3f}, external "
                 f"{min(e[1] for e in ece):.3f}-{max(e[1] for e in ece):.3f} across models.")
    return lines


def _metric_table(m: ModelResult, class_names: list[str]) -> str:
    labels = {"accuracy": "accuracy", "macro_f1": "macro F1", "auc_macro": "AUC (macro, one-vs-rest)"}
    for name in class_names:
        labels.update({f"sensitivity_{name}": f"sensitivity {name}", f"specificity_{name}": f"specificity {name}",
                       f"auc_{name}": f"AUC {name}"})
    rows = [{"metric": label, f"internal (n={m.internal['n']})": _ci(m.internal["metrics"][key]),
             f"external (n={m.external['n']})": _ci(m.external["metrics"][key]),
             "gap (external - internal)": _signed_ci(m.gap[key])} for key, label in labels.items()]
    return markdown_table(rows)


def _calibration_table(models: list[ModelResult]) -> str:
    rows = []
    for m in models:
        row = {"model": m.name, "ECE internal": f"{m.internal['calibration']['ece']:.3f}",
               "ECE external": f"{m.external['calibration']['ece']:.3f}",
               "Brier internal": f"{m.internal['calibration']['brier']:.3f}",
               "Brier external": f"{m.external['calibration']['brier']:.3f}"}
        if m.calibrated is not None:
            c = m.calibrated
            row.update({f"ECE int. {c['method']}": f"{c['internal']['ece']:.3f}",
                        f"ECE ext. {c['method']}": f"{c['external']['ece']:.3f}",
                        f"Brier int. {c['method']}": f"{c['internal']['brier']:.3f}",
                        f"Brier ext. {c['method']}": f"{c['external']['brier']:.3f}",
                        f"acc. int./ext. {c['method']}":
                            f"{c['internal_accuracy']:.3f} / {c['external_accuracy']:.3f}"})
        rows.append(row)
    return markdown_table(rows)


def _conformal_table(models: list[ModelResult], class_names: list[str]) -> str:
    rows = []
    for m in models:
        for where in ("internal", "external"):
            s = m.conformal[where]
            row = {"model": m.name, "data": where, "n": s["n"],
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


def plot_accuracy_dots(path: Path, models: list[ModelResult]) -> Path:
    """Internal vs external accuracy of every model, dots with their 95% bootstrap intervals."""
    fig, ax = subplots(figsize=(6.5, 0.45 * len(models) + 1.4))
    for row, m in enumerate(models):
        for offset, where, color in ((-0.12, "internal", "tab:blue"), (0.12, "external", "tab:red")):
            s = getattr(m, where)["metrics"]["accuracy"]
            ax.errorbar(s["value"], row + offset, xerr=[[s["value"] - s["ci_low"]], [s["ci_high"] - s["value"]]],
                        fmt="o", color=color, capsize=3, markersize=4, label=where if row == 0 else None)
    ax.set_yticks(range(len(models)), [m.name for m in models], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy (95% patient-bootstrap interval)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def _write_results_csv(path: Path, models: list[ModelResult]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["backbone", "head", "evaluation", "subgroup", "class", "metric", "value", "ci_low",
                         "ci_high", "n"])
        for m in models:
            for where in ("internal", "external", "gap"):
                metrics = m.gap if where == "gap" else getattr(m, where)["metrics"]
                n = "" if where == "gap" else getattr(m, where)["n"]
                for metric, s in metrics.items():
                    writer.writerow([m.backbone, m.head, where, "", "", metric, s["value"], s["ci_low"],
                                     s["ci_high"], n])
            for where in ("internal", "external"):
                cal = getattr(m, where)["calibration"]
                writer.writerow([m.backbone, m.head, where, "", "", "ece", cal["ece"], "", "", getattr(m, where)["n"]])
                writer.writerow([m.backbone, m.head, where, "", "", "brier", cal["brier"], "", "",
                                 getattr(m, where)["n"]])
                if m.calibrated is not None:
                    c = m.calibrated
                    for key in ("ece", "brier"):
                        writer.writerow([m.backbone, m.head, f"{where}-{c['method']}", "", "", key,
                                         c[where][key], "", "", getattr(m, where)["n"]])
                s = m.conformal[where]
                writer.writerow([m.backbone, m.head, where, "", "", "conformal_coverage", s["coverage"],
                                 s["ci_low"], s["ci_high"], s["n"]])
                writer.writerow([m.backbone, m.head, where, "", "", "conformal_set_size", s["mean_size"], "",
                                 "", s["n"]])
            for column, rows in m.subgroups.items():
                for r in rows:
                    writer.writerow([m.backbone, m.head, "external", f"{column}={r['value']}", r["class"],
                                     "accuracy", r["accuracy"], r["ci_low"], r["ci_high"], r["n"]])


def write_external_predictions(path: Path, names: list[str], labels: list[str], subgroup_values: dict[str, list[str]],
                               fitted: list[FittedModel], class_names: list[str]) -> Path:
    """One row per external image: its label and subgroups, then per model the predicted class, its
    probability and the conformal set (classes joined by '|')."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["path", "label", *subgroup_values]
        for f in fitted:
            stem = f.name
            header += [f"{stem}:predicted", f"{stem}:probability", f"{stem}:set"]
        writer.writerow(header)
        for i, (name, label) in enumerate(zip(names, labels)):
            row = [name, label, *(values[i] for values in subgroup_values.values())]
            for f in fitted:
                proba = f.external_proba[i]
                row += [class_names[int(proba.argmax())], f"{proba.max():.4f}",
                        format_set(f.external_sets[i], class_names)]
            writer.writerow(row)
    return path


def overlap_section(overlap: dict[str, Any]) -> list[str]:
    """The report's "Overlap with TRAIN" lines: counts, then every overlapping EXT image and its TRAIN match."""
    shared = overlap["shared_patients"]
    lines = ["## Overlap with TRAIN", "",
             f"{overlap['excluded']['n']} of {overlap['n_external']} external images overlap TRAIN and are left out "
             f"of the external metrics, which cover the other {overlap['n_external_evaluated']} (a copy of a "
             f"training image, or an image of a training patient, is not external evidence):", "",
             f"- byte-identical (same sha256): {overlap['identical']['n']}",
             f"- near-duplicate (the audit's rule: pHash of trimmed crops, confirmed by the VGG16 cosine when "
             f"vgg16 is among the backbones): {overlap['near_duplicate']['n']}",
             f"- of a TRAIN patient (same patient id): {shared['n_external_images']} image(s) of {shared['n']} "
             f"patient(s), who have {shared['n_train_images']} TRAIN image(s)"
             + (f": {', '.join(shared['patient_ids'])}" if shared["patient_ids"] else ""), ""]
    rows = [{"external image": p["external"], "overlap": "byte-identical", "TRAIN image": p["train"]}
            for p in overlap["identical"]["pairs"]]
    rows += [{"external image": p["external"], "overlap": f"near-duplicate (pHash {p['phash_distance']}"
              + (f", cosine {p['cosine']:.3f}" if p["cosine"] is not None else "") + ")", "TRAIN image": p["train"]}
             for p in overlap["near_duplicate"]["pairs"]]
    listed = {r["external image"] for r in rows}
    rows += [{"external image": p["external"], "overlap": f"patient {p['patient_id']}",
              "TRAIN image": f"({p['train_images']} image(s) of that patient)"}
             for p in shared["images"] if p["external"] not in listed]
    return lines + [markdown_table(rows), ""] if rows else lines


def skipped_section(skipped: dict[str, list[tuple[str, str]]]) -> list[str]:
    """The report's "Skipped images" lines: every file of TRAIN and EXT left out, with its reason."""
    lines = ["## Skipped images", ""]
    for where, entries in skipped.items():
        lines.append(f"{where}: {len(entries)} file(s) skipped or left out" + (":" if entries else "."))
        lines += [f"- `{path}`: {reason}" for path, reason in entries]
        lines.append("")
    return lines


def _skipped_words(skipped: dict[str, list[tuple[str, str]]] | None, where: str) -> str:
    count = len((skipped or {}).get(where, []))
    return f", {count} file(s) skipped: see 'Skipped images'" if count else ""


def _excluded_words(overlap: dict[str, Any] | None) -> str:
    if not overlap or not overlap["excluded"]["n"]:
        return ""
    return f" evaluated, {overlap['excluded']['n']} more left out: see 'Overlap with TRAIN'"


def write_report(run_dir: Path, models: list[ModelResult], verdict: list[str], notes: list[str],
                 class_names: list[str], record: dict[str, Any], settings: ValidateSettings,
                 warnings: list[str] | None = None, overlap: dict[str, Any] | None = None,
                 skipped: dict[str, list[tuple[str, str]]] | None = None) -> Path:
    """report.md (verdict first), results.csv, accuracy.png and reliability.png in ``run_dir``."""
    _write_results_csv(run_dir / "results.csv", models)
    plot_accuracy_dots(run_dir / "accuracy.png", models)
    panels = {}
    for m in models:
        curves = {"internal": m.internal["calibration"]["bins"], "external": m.external["calibration"]["bins"]}
        if m.calibrated is not None:
            c = m.calibrated
            curves[f"internal, {c['method']}"] = c["internal"]["bins"]
            curves[f"external, {c['method']}"] = c["external"]["bins"]
        panels[m.name] = curves
    plot_reliability(run_dir / "reliability.png", panels)
    grouping = record["grouping"]
    lines = [f"# cxr-transfer validate: {Path(settings.data).name} -> {Path(settings.external).name}", "",
             "## Verdict", "", *[f"- **warning**: {line}" for line in warnings or []], *[f"- {line}" for line in verdict],
             "", f"- TRAIN: `{record['train_root']}` ({record['n_train']} images{record['train_note']}"
             f"{_skipped_words(skipped, 'TRAIN')}); EXT: `{record['external_root']}` ({record['n_external']} images"
             f"{_skipped_words(skipped, 'EXT')}{_excluded_words(overlap)})",
             f"- internal: out-of-fold predictions of {settings.folds}-fold StratifiedGroupKFold of TRAIN by "
             f"{grouping}; external: each head fitted on all of TRAIN",
             f"- intervals: {_interval_words(models, 'internal', record['internal_clusters'], settings.n_boot)}; "
             f"{_interval_words(models, 'external', record['external_clusters'], settings.n_boot)}; the gap's "
             f"interval is that of the replicate differences when both sides are bootstrapped, else the MOVER "
             f"(Newcombe) interval from the two sides' intervals; subgroup accuracies: Wilson 95% interval",
             f"- calibration: {BINNING_WORDS}",
             f"- conformal: MAPIE {record['mapie']} CrossConformalClassifier (LAC score, mean aggregation), "
             f"alpha {settings.alpha:g}, conformal scores from TRAIN only with {settings.folds} folds grouped like the "
             f"internal CV; internal coverage nested (each outer fold's sets come from a conformal model fitted "
             f"without it)",
             f"- seed {settings.seed}; created {record['created']}; {record['seconds']:.0f} s", ""]
    lines += [f"- note: {note}" for note in notes]
    lines += [""] + (overlap_section(overlap) if overlap and overlap["excluded"]["n"] else [])
    lines += ["![internal vs external accuracy](accuracy.png)", "", "## Internal vs external", ""]
    for m in models:
        lines += [f"### {m.name}", "", _metric_table(m, class_names), ""]
    lines += ["## Calibration", "", _calibration_table(models), "", "![reliability diagrams](reliability.png)", "",
              f"## Conformal prediction sets (alpha {settings.alpha:g}, target coverage {1 - settings.alpha:.2f})",
              "", "LAC sets can be empty: no class is plausible enough at this alpha (an empty set never covers).", "",
              _conformal_table(models, class_names), ""]
    if any(m.subgroups for m in models):
        lines += ["## Subgroups of the external data", "",
                  "Rows marked **below**: the accuracy interval lies wholly below the model's internal accuracy. "
                  "Sensitivity columns: value (images of that class).", ""]
        for m in models:
            internal = m.internal["metrics"]["accuracy"]["value"]
            for column, rows in m.subgroups.items():
                lines += [f"### {m.name}: by {column} (internal accuracy {internal:.3f})", "",
                          _subgroup_table(rows, class_names, internal), ""]
    if skipped and any(skipped.values()):
        lines += skipped_section(skipped)
    lines += ["Files: results.json (everything above), results.csv (long format), external_predictions.csv (every "
              "external image: label, subgroups, each model's prediction, probability and set), record.json.", ""]
    path = run_dir / "report.md"
    path.write_text(printable("\n".join(lines)), encoding="utf-8")   # a folder name that is not UTF-8 as \xNN
    return path
