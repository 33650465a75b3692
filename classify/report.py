"""Human-readable outputs of a run: terminal table, results.csv, report.md, confusion matrices, bar chart."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cxr_transfer.classify.metrics import headline, metrics_from_confusion
from cxr_transfer.classify.results import Evaluation
from cxr_transfer.core.paper import paper_accuracy
from cxr_transfer.core.plotting import subplots
from cxr_transfer.core.tables import markdown_table, mean_std, text_table  # noqa: F401 (re-exported)


def summary_rows(summary: list[dict]) -> list[dict[str, str]]:
    """Rows for the terminal and Markdown tables, sorted by backbone then accuracy."""
    ordered = sorted(summary, key=lambda r: (r["backbone"], -(r["accuracy"] or {"mean": 0})["mean"]))
    rows = []
    for r in ordered:
        acc = r["accuracy"]
        interval = f"[{acc['ci_low']:.3f}, {acc['ci_high']:.3f}]" if acc and acc["n"] > 1 else "-"
        rows.append({"backbone": r["backbone"], "model": r["model"], "accuracy": mean_std(acc), "95% CI": interval,
                     "covid sens": mean_std(r["covid_sensitivity"]), "covid spec": mean_std(r["covid_specificity"]),
                     "macro F1": mean_std(r["macro_f1"]), "AUC": mean_std(r["roc_auc_macro"]),
                     "fit s": f"{r['fit_seconds']:.2f}", "n": str(r["n_evaluations"])})
    return rows


def per_class_table(confusion: Sequence[Sequence[int]], class_names: list[str]) -> str:
    """Table 1 style: per class precision / recall / F1 / specificity, from a (pooled) confusion matrix."""
    metrics = metrics_from_confusion(np.asarray(confusion), class_names)
    lines = ["| class | precision | recall (sensitivity) | F1 | specificity | support |", "|---|---|---|---|---|---|"]
    for name in class_names:
        m = metrics["per_class"][name]
        lines.append(f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | "
                     f"{m['specificity']:.3f} | {m['support']} |")
    lines.append(f"| **accuracy** | | | | | {metrics['accuracy']:.4f} |")
    return "\n".join(lines)


def write_results_csv(path: Path, evaluations: list[Evaluation]) -> None:
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = None
        for e in evaluations:
            row = {"backbone": e.backbone, "model": e.model, "protocol": e.protocol, "repeat": e.repeat,
                   "fold": e.fold, "n_train": e.n_train, "n_test": e.n_test, **headline(e.metrics),
                   "fit_seconds": round(e.fit_seconds, 4), "predict_seconds": round(e.predict_seconds, 4),
                   "test_fingerprint": e.test_fingerprint}
            if writer is None:
                writer = csv.DictWriter(handle, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)


def plot_confusion(path: Path, confusion: Sequence[Sequence[int]], class_names: list[str], title: str) -> None:
    matrix = np.asarray(confusion)
    fig, ax = subplots(figsize=(4.2, 3.8))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_accuracy_bars(path: Path, summary: list[dict]) -> None:
    """Accuracy by backbone and model, error bars = std over splits."""
    backbones = sorted({r["backbone"] for r in summary})
    models = sorted({r["model"] for r in summary})
    width = 0.8 / max(len(backbones), 1)
    fig, ax = subplots(figsize=(max(6, 1.1 * len(models) + 2), 4))
    for k, backbone in enumerate(backbones):
        rows = {r["model"]: r for r in summary if r["backbone"] == backbone}
        means = [rows[m]["accuracy"]["mean"] if m in rows else np.nan for m in models]
        stds = [rows[m]["accuracy"]["std"] if m in rows else 0 for m in models]
        ax.bar(np.arange(len(models)) + k * width, means, width, yerr=stds, capsize=3, label=backbone)
    ax.set_xticks(np.arange(len(models)) + width * (len(backbones) - 1) / 2, models, rotation=20)
    ax.set_ylabel("accuracy (mean ± std over splits)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_compare_report(run_dir: Path, class_names: list[str], evaluations: list[Evaluation],
                         summary: list[dict], record: dict[str, Any]) -> Path:
    """results.csv, accuracy.png, confusion-*.png and report.md in run_dir."""
    run_dir = Path(run_dir)
    write_results_csv(run_dir / "results.csv", evaluations)
    plot_accuracy_bars(run_dir / "accuracy.png", summary)
    settings = record["settings"]
    lines = [f"# cxr-transfer compare: {settings['protocol']} protocol", "",
             f"- data: `{record['dataset_root']}` (fingerprint `{record['dataset_fingerprint'][:16]}`), "
             f"{record['evaluated_images']} images evaluated",
             f"- splits: {record['n_splits']} ({_protocol_words(settings)})",
             f"- seed {record['seed']}; heads tuned by inner CV: {settings['tune']}; created {record['created']}",
             "- mean ± std over splits; 95% CI is the Student-t interval of the mean over splits", "",
             markdown_table(summary_rows(summary)), ""]
    for r in sorted(summary, key=lambda r: (r["backbone"], r["model"])):
        name = f"confusion-{r['backbone']}-{r['model']}.png"
        plot_confusion(run_dir / name, r["confusion_matrix"], class_names,
                       f"{r['backbone']} + {r['model']} (summed over {r['n_evaluations']} splits)")
    best = {}
    for r in summary:
        if r["backbone"] not in best or r["accuracy"]["mean"] > best[r["backbone"]]["accuracy"]["mean"]:
            best[r["backbone"]] = r
    lines += ["## Per class, best head of each backbone (confusion matrix summed over splits)", ""]
    for backbone, r in sorted(best.items()):
        paper = paper_accuracy(backbone)
        paper_text = f"; the paper's fine-tuned {backbone}: {paper:.4f} on one split" if paper else ""
        lines += [f"### {backbone} + {r['model']}{paper_text}", "", per_class_table(r["confusion_matrix"], class_names),
                  "", f"![confusion](confusion-{backbone}-{r['model']}.png)", ""]
    lines += ["![accuracy by backbone and head](accuracy.png)", "",
              "Files: results.json (every evaluation), results.csv, record.json (versions, hashes, settings).", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8", errors="backslashreplace")
    return path


def _protocol_words(settings: dict) -> str:
    grouped = f", grouped by {settings['group_by']}" if settings.get("group_by") else ""
    if settings["protocol"] == "paper":
        return f"stratified {1 - settings['test_size']:.0%}/{settings['test_size']:.0%} of train/, " \
               f"{settings['seeds']} seeds{grouped}"
    if settings["protocol"] == "cv":
        return f"{settings['repeats']} x {settings['folds']}-fold stratified CV{grouped}"
    return "fit on train/, evaluate on test/" + grouped
