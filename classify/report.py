"""Human-readable outputs of a run: terminal table, results.csv, report.md, confusion matrices, bar chart."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cxr_transfer.classify.comparisons import (
    ALPHA,
    SELECTED,
    Comparison,
    backbone_vs_backbone,
    format_test,
    head_vs_top,
    selection_counts,
)
from cxr_transfer.classify.metrics import headline, metrics_from_confusion
from cxr_transfer.classify.results import Evaluation
from cxr_transfer.core.paper import paper_accuracy
from cxr_transfer.core.plotting import subplots
from cxr_transfer.core.tables import markdown_table, mean_std, text_table


@dataclass
class Analysis:
    """What a compare run's report says about its differences (see ``classify.comparisons``)."""

    tops: dict[str, str]               # backbone -> head with the highest mean accuracy (reference of marks)
    heads: list[Comparison]            # each head against its backbone's top head, Holm across the table
    backbones: list[Comparison]        # each backbone against the best one for the same head
    chosen: dict[str, str]             # backbone -> the head the report names, and ...
    how: dict[str, str]                # ... how it was chosen

    def marks(self) -> dict[tuple[str, str], str]:
        """(backbone, model) -> 'top' | 'n.s.' | 'worse' | '?' for the summary table and the chart."""
        found = {(b, m): "top" for b, m in self.tops.items()}
        found.update({(c.group, c.model): c.mark for c in self.heads})
        return found

    def as_dict(self) -> dict:
        return {"alpha": ALPHA, "tops": self.tops, "chosen": self.chosen, "how_chosen": self.how,
                "head_vs_top": [c.as_dict() for c in self.heads],
                "backbone_vs_backbone": [c.as_dict() for c in self.backbones]}


def analyse(evaluations: Sequence[Evaluation], settings: dict[str, Any]) -> Analysis:
    """Paired tests of a compare run's evaluations, and the head it names for each backbone and why."""
    tops, heads = head_vs_top(evaluations)
    chosen, how = {}, {}
    selected = [e for e in evaluations if e.model == SELECTED]
    for backbone in sorted({e.backbone for e in evaluations}):
        if settings.get("head"):
            chosen[backbone], how[backbone] = settings["head"], f"named by the user (--head {settings['head']})"
            continue
        counts = selection_counts(selected, backbone)
        if not counts:
            only = sorted({e.model for e in evaluations if e.backbone == backbone})
            chosen[backbone], how[backbone] = only[0], "the only head compared"
            continue
        chosen[backbone] = counts.most_common(1)[0][0]
        tally = ", ".join(f"{head} {n}" for head, n in counts.most_common())
        splits = sum(counts.values())
        where = f"on each of {splits} splits" if splits > 1 else "on its one split"
        how[backbone] = (f"chosen {where} by {settings.get('select_folds', 3)}-fold "
                         f"CV inside its training part, never by its test images ({tally}); the row "
                         f"'{SELECTED}' scores that choice on the test images")
    return Analysis(tops, heads, backbone_vs_backbone(evaluations), chosen, how)


def comparison_rows(comparisons: Sequence[Comparison], group: str, model: str) -> list[dict[str, str]]:
    """Table rows of paired comparisons (difference in accuracy points, model minus reference)."""
    return [{group: c.group, model: c.model, "against": c.reference, **format_test(c)} for c in comparisons]


def summary_rows(summary: list[dict], marks: dict[tuple[str, str], str] | None = None) -> list[dict[str, str]]:
    """Rows for the terminal and Markdown tables, sorted by backbone then accuracy.

    The 95% interval of a proportion is a Wilson interval (inside [0, 1]); ``marks`` adds the column
    "vs top": top, n.s. (not significantly worse than the top head) or worse.
    """
    ordered = sorted(summary, key=lambda r: (r["backbone"], -(r["accuracy"] or {"mean": 0})["mean"]))
    rows = []
    for r in ordered:
        acc = r["accuracy"]
        interval = f"[{acc['ci_low']:.3f}, {acc['ci_high']:.3f}]" if acc else "-"
        mark = {"vs top": (marks or {}).get((r["backbone"], r["model"]), "")} if marks is not None else {}
        rows.append({"backbone": r["backbone"], "model": r["model"], "accuracy": mean_std(acc), "95% CI": interval,
                     **mark,
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


def accuracy_axis_limits(summary: list[dict], margin: float = 0.02) -> tuple[float, float]:
    """A zoomed accuracy axis: from just below the lowest interval to just above the highest (within [0, 1])."""
    lows = [r["accuracy"]["ci_low"] for r in summary if r["accuracy"]]
    highs = [r["accuracy"]["ci_high"] for r in summary if r["accuracy"]]
    if not lows:
        return 0.0, 1.0
    return max(0.0, min(lows) - margin), min(1.0, max(highs) + margin / 2)


def plot_accuracy_dots(path: Path, summary: list[dict], marks: dict[tuple[str, str], str] | None = None) -> None:
    """Dot plot: mean accuracy with its 95% interval per backbone and model, on a zoomed axis.

    Filled dots: the top head of the backbone and those not significantly worse; hollow: significantly worse.
    Dashed lines: the paper's fine-tuned accuracy of each backbone (one split), or a note when it is off-axis.
    """
    backbones = sorted({r["backbone"] for r in summary})
    models = sorted({r["model"] for r in summary}, key=lambda m: (m == SELECTED, m))
    width = 0.6 / max(len(backbones), 1)
    low, high = accuracy_axis_limits(summary)
    fig, ax = subplots(figsize=(max(6.5, 0.9 * len(models) + 2.5), 4.2))
    colors = [f"C{k}" for k in range(len(backbones))]
    off_axis = []
    for k, backbone in enumerate(backbones):
        rows = {r["model"]: r for r in summary if r["backbone"] == backbone and r["accuracy"]}
        for j, model in enumerate(models):
            if model not in rows:
                continue
            acc = rows[model]["accuracy"]
            x = j + (k - (len(backbones) - 1) / 2) * width
            worse = (marks or {}).get((backbone, model)) == "worse"
            ax.errorbar(x, acc["mean"], yerr=[[acc["mean"] - acc["ci_low"]], [acc["ci_high"] - acc["mean"]]],
                        fmt="o", color=colors[k], mfc="white" if worse else colors[k], capsize=3,
                        label=backbone if j == min(models.index(m) for m in rows) else None)
        paper = paper_accuracy(backbone)
        if paper is not None and low <= paper <= high:
            ax.axhline(paper, color=colors[k], linestyle="--", linewidth=1,
                       label=f"paper: fine-tuned {backbone}, one split ({paper:.3f})")
        elif paper is not None:
            off_axis.append(f"paper {backbone}: {paper:.3f} (below axis)" if paper < low else
                            f"paper {backbone}: {paper:.3f} (above axis)")
    ax.set_xticks(range(len(models)), models, rotation=20)
    ax.set_ylim(low, high)
    ax.set_ylabel("accuracy, mean over splits (95% interval)")
    ax.set_title("hollow: significantly worse than the top head of its backbone (Holm)", fontsize=8)
    if off_axis:
        ax.text(0.01, 0.02, "; ".join(off_axis), transform=ax.transAxes, fontsize=7, va="bottom")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def findings_lines(analysis: Analysis, summary: list[dict], markdown: bool = True) -> list[str]:
    """The chosen head per backbone and the paired-test tables, for report.md and the terminal."""
    table = markdown_table if markdown else text_table
    head = "## " if markdown else ""
    lines = [f"{head}Chosen head of each backbone", ""]
    for backbone in sorted(analysis.chosen):
        lines.append(f"- {backbone}: **{analysis.chosen[backbone]}**, {analysis.how[backbone]}" if markdown else
                     f"- {backbone}: {analysis.chosen[backbone]}, {analysis.how[backbone]}")
    tests = ("Differences are accuracy points (model minus reference) on the same test images; tests: corrected "
             "resampled t (Nadeau & Bengio 2003) over repeated splits, exact McNemar on one split; p (Holm) is "
             f"adjusted across the rows of the table; n.s. = not significantly worse at {ALPHA}.")
    lines += ["", f"{head}Each head against the top head of its backbone", "",
              "The top head (highest mean test accuracy) is only the reference of these marks, not a selection.",
              tests, "", table(comparison_rows(analysis.heads, "backbone", "head")), ""]
    if analysis.backbones:
        lines += [f"{head}Backbone against backbone, same head", "",
                  table(comparison_rows(analysis.backbones, "head", "backbone")), ""]
    return lines


def write_compare_report(run_dir: Path, class_names: list[str], evaluations: list[Evaluation],
                         summary: list[dict], record: dict[str, Any]) -> Path:
    """results.csv, comparisons.json, accuracy.png, confusion-*.png and report.md in run_dir."""
    run_dir = Path(run_dir)
    settings = record["settings"]
    analysis = analyse(evaluations, settings)
    marks = analysis.marks()
    write_results_csv(run_dir / "results.csv", evaluations)
    (run_dir / "comparisons.json").write_text(json.dumps(analysis.as_dict(), indent=1))
    plot_accuracy_dots(run_dir / "accuracy.png", summary, marks)
    lines = [f"# cxr-transfer compare: {settings['protocol']} protocol", "",
             f"- data: `{record['dataset_root']}` (fingerprint `{record['dataset_fingerprint'][:16]}`), "
             f"{record['evaluated_images']} images evaluated",
             f"- splits: {record['n_splits']} ({_protocol_words(settings)})",
             f"- seed {record['seed']}; heads tuned by inner CV: {settings['tune']}; created {record['created']}",
             "- mean ± std over splits; 95% CI of a proportion: Wilson score interval at the mean with the "
             "Nadeau-Bengio effective number of test images (splits share training images), inside [0, 1]",
             "- vs top: top = highest mean accuracy of the backbone; n.s. = not significantly worse (paired test, "
             "Holm); worse = significantly worse", "",
             markdown_table(summary_rows(summary, marks)), ""]
    lines += findings_lines(analysis, summary)
    for r in sorted(summary, key=lambda r: (r["backbone"], r["model"])):
        name = f"confusion-{r['backbone']}-{r['model']}.png"
        plot_confusion(run_dir / name, r["confusion_matrix"], class_names,
                       f"{r['backbone']} + {r['model']} (summed over {r['n_evaluations']} splits)")
    rows = {(r["backbone"], r["model"]): r for r in summary}
    lines += ["## Per class, chosen head of each backbone (confusion matrix summed over splits)", ""]
    for backbone, chosen in sorted(analysis.chosen.items()):
        model = SELECTED if (backbone, SELECTED) in rows and not settings.get("head") else chosen
        r = rows[(backbone, model)]
        paper = paper_accuracy(backbone)
        paper_text = f"; the paper's fine-tuned {backbone}: {paper:.4f} on one split" if paper else ""
        what = f"{SELECTED} (the head chosen by inner CV on each split)" if model == SELECTED else model
        lines += [f"### {backbone} + {what}{paper_text}", "", per_class_table(r["confusion_matrix"], class_names),
                  "", f"![confusion](confusion-{backbone}-{model}.png)", ""]
    lines += ["![accuracy by backbone and head: dots with 95% intervals, zoomed axis](accuracy.png)", "",
              "Files: results.json (every evaluation), results.csv, comparisons.json (every paired test), "
              "record.json (versions, hashes, settings).", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8", errors="backslashreplace")
    return path


def compare_summary_text(evaluations: Sequence[Evaluation], summary: list[dict], settings: dict[str, Any]) -> str:
    """What the compare command prints: the summary table with marks, the chosen heads and the paired tests."""
    analysis = analyse(evaluations, settings)
    return "\n".join([text_table(summary_rows(summary, analysis.marks())), ""]
                     + findings_lines(analysis, summary, markdown=False))


def _protocol_words(settings: dict) -> str:
    grouped = f", grouped by {settings['group_by']}" if settings.get("group_by") else ""
    if settings["protocol"] == "paper":
        return f"stratified {1 - settings['test_size']:.0%}/{settings['test_size']:.0%} of train/, " \
               f"{settings['seeds']} seeds{grouped}"
    if settings["protocol"] == "cv":
        return f"{settings['repeats']} x {settings['folds']}-fold stratified CV{grouped}"
    return "fit on train/, evaluate on test/" + grouped
