"""A fine-tuning run's human-readable outputs: history.csv, curves.png (paper fig. 2), confusion.png
(fig. 4) and report.md (Table 1 style, next to the paper's row for the backbone)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

from cxr_transfer.classify.report import plot_confusion as plot_matrix
from cxr_transfer.core.paper import PAPER_TABLE1
from cxr_transfer.core.plotting import subplots

HISTORY_CSV = "history.csv"
CURVES_PNG = "curves.png"
CONFUSION_PNG = "confusion.png"
REPORT_MD = "report.md"
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "epoch_seconds")


def write_history(run_dir: Path, history: Sequence[dict[str, float]]) -> Path:
    """One row per finished epoch (1-based): training and held-out loss/accuracy, seconds."""
    path = run_dir / HISTORY_CSV
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row.get(k), float) else row.get(k, ""))
                             for k in HISTORY_COLUMNS})
    return path


def plot_curves(run_dir: Path, history: Sequence[dict[str, float]], title: str) -> Path:
    """Training and validation (= held-out test, as in the paper) loss and accuracy per epoch."""
    epochs = [row["epoch"] for row in history]
    fig, axes = subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
        ax.plot(epochs, [row[key] for row in history], marker=".", label=f"train {label}")
        ax.plot(epochs, [row[f"val_{key}"] for row in history], marker=".", label=f"validation {label}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[1].set_ylim(0, 1.02)
    fig.suptitle(f"{title}\n(validation = the held-out 20 % test images, evaluated after each epoch, as in the paper)",
                 fontsize=9)
    fig.tight_layout()
    path = run_dir / CURVES_PNG
    fig.savefig(path, dpi=110)
    return path


def plot_confusion(run_dir: Path, matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str) -> Path:
    """Confusion matrix, rows = true class, columns = predicted (paper fig. 4)."""

    path = run_dir / CONFUSION_PNG
    plot_matrix(path, matrix, list(class_names), title)
    return path


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _timings_table(timings: dict[str, float]) -> list[str]:
    """Wall and CPU seconds side by side (CPU = this process's CPU time, all threads)."""
    names = [k[:-len("_seconds")] for k in timings if k.endswith("_seconds") and not k.endswith("_cpu_seconds")]
    lines = ["## Time (seconds)", "", "Wall clock, and this process's CPU time over all threads (less sensitive to "
             "other jobs on the machine).", "", "| step | wall | CPU |", "|---|---|---|"]
    for name in names:
        cpu = timings.get(f"{name}_cpu_seconds")
        lines.append(f"| {name} | {timings[f'{name}_seconds']:.1f} | {'-' if cpu is None else f'{cpu:.1f}'} |")
    return lines + [""]


def write_report(run_dir: Path, info: dict[str, Any], metrics: dict[str, Any] | None,
                 history: Sequence[dict[str, float]], partial: bool,
                 timings: dict[str, float] | None = None) -> Path:
    """report.md: settings, Table 1 style metrics next to the paper's row, timings, files."""
    backbone = info["backbone"]
    lines = [f"# Fine-tuning {backbone} ({info['model']}), seed {info['seed']}", ""]
    if partial:
        lines += [f"**partial: true** - interrupted after {len(history)} of {info['epochs']} epochs; "
                  "no final test metrics. The curves and history hold the finished epochs.", ""]
    lines += ["| setting | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in info.items() if v is not None and not isinstance(v, (dict, list))]
    lines += ["", "Validation curves are the held-out 20 % test images evaluated after each epoch: the paper "
              "kept no separate validation set (its figure 2).", ""]
    if metrics is not None:
        paper = PAPER_TABLE1.get(backbone)
        lines += ["## Test metrics (Table 1 style; per class one-vs-rest)", "",
                  "| class | precision | recall | F1 | specificity | support | paper P / R / F1 / Sp |",
                  "|---|---|---|---|---|---|---|"]
        for name, values in metrics["per_class"].items():
            ref = " / ".join(f"{v:.2f}" for v in paper[name]) if paper and name in paper else "-"
            lines.append(f"| {name} | {values['precision']:.2f} | {values['recall']:.2f} | {values['f1']:.2f} | "
                         f"{values['specificity']:.2f} | {values['support']} | {ref} |")
        macro = metrics["macro"]
        lines.append(f"| macro | {macro['precision']:.2f} | {macro['recall']:.2f} | {macro['f1']:.2f} | "
                     f"{macro['specificity']:.2f} | | |")
        paper_acc = f"{paper['accuracy']:.4f}" if paper else "-"
        lines += ["", f"**Accuracy {metrics['accuracy']:.4f}** (paper: {paper_acc}; the paper's single split "
                  "had no seed, so its test images differ from these).", "",
                  "Confusion matrix (rows true, columns predicted): see confusion.png.", ""]
    if timings:
        lines += _timings_table(timings)
    lines += ["## Files", "", "history.csv, curves.png" + (", confusion.png, model.keras, model.onnx, model.json"
                                                              if not partial else "") + ", results.json, run.json", ""]
    path = run_dir / REPORT_MD
    path.write_text("\n".join(lines), encoding="utf-8", errors="backslashreplace")
    return path
