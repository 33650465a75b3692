"""Side by side (``cxr.report_runs``): fine-tuned models and scikit-learn heads side by side on the same test images.

Runs are matched by test-set fingerprint (sha256 over the test images' sha256), so a number is only put
beside another when both models were scored on exactly the same images. Per backbone, each fine-tuned
model is shown next to the head compare chose on each split by cross-validation inside that split's
training part (or the head named with ``head``); the test images never choose it. Every model of a
backbone is tested against the top one on the shared test sets (``classify.comparisons``), and each
fine-tuned model against the chosen head.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from cxr_transfer.classify.comparisons import (
    SELECTED,
    Comparison,
    adjust,
    against_top,
    format_test,
    paired_test,
)
from cxr_transfer.classify.heads import get_head
from cxr_transfer.classify.metrics import headline, summarize, summarize_proportion
from cxr_transfer.classify.results import Evaluation, load_results
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.outputs import writable_file
from cxr_transfer.core.paper import paper_accuracy
from cxr_transfer.core.tables import markdown_table, mean_std

HEAD_KIND = "compare"


def _row(label: str, backbone: str, evaluations: list[Evaluation], mark: dict[str, str]) -> dict[str, str]:
    flat = [headline(e.metrics) for e in evaluations]

    def cell(key: str) -> str:
        values = [f[key] for f in flat if f[key] is not None]
        if not values:
            return "-"
        return mean_std(summarize(values))

    accuracy = summarize_proportion([e.metrics["accuracy"] for e in evaluations],
                                    float(np.mean([e.n_test for e in evaluations])),
                                    float(np.mean([e.n_train for e in evaluations])))
    paper = paper_accuracy(backbone)
    return {"backbone": backbone, "model": label, "test sets": str(len(evaluations)),
            "accuracy": mean_std(accuracy), "95% CI": f"[{accuracy['ci_low']:.3f}, {accuracy['ci_high']:.3f}]",
            "vs top": mark.get("vs top", ""), "diff [95% CI]": (f"{mark['difference']} {mark['95% CI']}" if mark.get("difference", "-") != "-" else ""), "p (Holm)": mark.get("p (Holm)", ""),
            "covid sens": cell("covid_sensitivity"), "covid spec": cell("covid_specificity"),
            "macro F1": cell("macro_f1"),
            "train s": f"{np.mean([e.fit_seconds for e in evaluations]):.1f}",
            "infer s": f"{np.mean([e.predict_seconds for e in evaluations]):.2f}",
            "paper acc": f"{paper:.4f}" if paper else "-"}


def unique_runs(run_dirs: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """The run folders in the order given, each once (by resolved path), and a note per repeat left out."""
    seen: dict[Path, Path] = {}
    notes = []
    for run_dir in map(Path, run_dirs):
        key = run_dir.expanduser().resolve()
        if key in seen:
            notes.append(f"{run_dir}: given twice (as {seen[key]}); counted once")
            continue
        seen[key] = run_dir
    return list(seen.values()), notes


def _is_partial(payload: dict) -> bool:
    record = payload.get("record") or {}
    return bool(record.get("partial")) or not payload["evaluations"]


def _chosen_head(backbone: str, by_head: dict[str, list[Evaluation]], head: str | None,
                 fingerprints: set[str]) -> tuple[str, list[Evaluation], str] | None:
    """The head evaluations to set beside a fine-tuned model, its row label and how it was chosen."""
    if head is not None:
        if head not in by_head:
            return None
        return f"head: {head}", by_head[head], f"{head}, named by the user (--head {head})"
    selected = by_head.get(SELECTED)
    if not selected:
        return None
    tally = Counter(e.extra["chosen"] for e in selected)
    words = ", ".join(f"{name} {n}" for name, n in tally.most_common())
    where = f"on each of {len(selected)} splits" if len(selected) > 1 else "on its one split"
    how = f"chosen {where} by CV inside its training part, never by the test images ({words})"
    label = f"chosen head: {tally.most_common(1)[0][0]}" if len(tally) == 1 else f"chosen head per split ({words})"
    return label, selected, how


def side_by_side(run_dirs: Sequence[str | Path], head: str | None = None) -> tuple[list[dict[str, str]], list[str]]:
    """Table rows and notes for the given run folders (compare and finetune runs, in any order).

    Rows per backbone: the fine-tuned models, the chosen head, then every head; "vs top" marks each row
    against the row of highest mean accuracy (paired tests on shared test sets, Holm across the table).
    Notes state how the head was chosen and each fine-tuned model minus the chosen head with its test.
    A folder given twice counts once; a partial (interrupted) finetune run has no test scores, so it is
    left out with a note, and refused with its epoch count when no finished finetune run is left.
    """
    if head is not None:
        head = get_head(head).name
    heads: list[Evaluation] = []
    tuned: list[Evaluation] = []
    runs, notes = unique_runs(run_dirs)
    partial = []
    for run_dir in runs:
        payload = load_results(run_dir)
        if payload["kind"] != HEAD_KIND and _is_partial(payload):
            record = payload.get("record") or {}
            partial.append(f"{run_dir} is a partial finetune run (interrupted after "
                           f"{record.get('epochs_done', 0)} of {record.get('settings', {}).get('epochs', '?')} "
                           f"epochs) with no test scores")
            continue
        (heads if payload["kind"] == HEAD_KIND else tuned).extend(payload["evaluations"])
    notes += [f"left out: {text}" for text in partial]
    if not tuned:
        if partial:
            raise CxrError(f"{partial[0]}; report needs a finished finetune run (rerun it to the end)")
        raise CxrError("report needs at least one finetune run folder beside the compare runs")
    blocks: list[tuple[str, dict[str, list[Evaluation]]]] = []
    versus: list[Comparison] = []
    for backbone in sorted({e.backbone for e in tuned}):
        models: dict[str, list[Evaluation]] = {}
        for model in sorted({e.model for e in tuned if e.backbone == backbone}):
            models[model] = [e for e in tuned if e.backbone == backbone and e.model == model]
        fingerprints = {e.test_fingerprint for group in models.values() for e in group}
        by_head: dict[str, list[Evaluation]] = {}
        for e in heads:
            if e.backbone == backbone and e.test_fingerprint in fingerprints:
                by_head.setdefault(e.model, []).append(e)
        if not by_head:
            notes.append(f"{backbone}: no compare run scored the same test images "
                         f"(run compare with the same data, protocol and seeds)")
            blocks.append((backbone, models))
            continue
        chosen = _chosen_head(backbone, by_head, head, fingerprints)
        if chosen is None:
            notes.append(f"{backbone}: " + (f"head '{head}' was not scored on these test images" if head else
                                            "the compare run recorded no head chosen by inner CV (it predates "
                                            "nested selection, or ran with --head); rerun compare or pass --head"))
        else:
            label, chosen_evaluations, how = chosen
            notes.append(f"{backbone}: head {how}")
            for model in list(models):
                versus.append(Comparison(backbone, model, label, paired_test(models[model], chosen_evaluations)))
            models[label] = chosen_evaluations
        for name, group in sorted(by_head.items()):
            if name != SELECTED:
                models[f"head: {name}"] = group
        blocks.append((backbone, models))
        shared = {e.test_fingerprint for e in chosen[1]} if chosen else set()
        if chosen and len(shared) < len(fingerprints):
            notes.append(f"{backbone}: the chosen head shares {len(shared)} of the {len(fingerprints)} test sets "
                         f"of the fine-tuned runs")

    marks_found: list[Comparison] = []
    tops: dict[str, str] = {}
    for backbone, models in blocks:
        if len(models) > 1:
            tops[backbone], found = against_top(models, backbone)
            marks_found += found
    adjust(marks_found)
    adjust(versus)
    cells = {(c.group, c.model): format_test(c) for c in marks_found}
    rows = []
    for backbone, models in blocks:
        for model, group in models.items():
            mark = {"vs top": "top"} if tops.get(backbone) == model else cells.get((backbone, model), {})
            rows.append(_row(model, backbone, group, mark))
    for c in versus:
        cell = format_test(c)
        notes.append(f"{c.group}: {c.model} minus the {c.reference}: {cell['difference']} points, 95% CI "
                     f"{cell['95% CI']}, p = {cell['p']} (Holm {cell['p (Holm)']}), {cell['test']}"
                     if c.test else f"{c.group}: {c.model} vs the {c.reference}: no shared test set, or one "
                                    f"without per-image predictions for McNemar's test; not tested")
    return rows, notes


def write_side_by_side(run_dirs: Sequence[str | Path], out: str | Path, head: str | None = None) -> Path:
    """Write the side-by-side Markdown report to ``out`` (its folder is checked writable first)."""
    out = writable_file(out, "report")
    rows, notes = side_by_side(run_dirs, head)
    run_dirs, _ = unique_runs(run_dirs)
    lines = ["# Fine-tuning vs heads on the same test images", "",
             "Rows of one backbone are scored on identical test sets (matched by the sha256 of their images). "
             "mean ± std over test sets; 95% CI: Wilson interval of the mean accuracy with the Nadeau-Bengio "
             "effective number of test images. vs top: paired test against the row of highest mean accuracy "
             "(corrected resampled t over splits, exact McNemar on one split), Holm across the table; n.s. = not "
             "significantly worse. diff in accuracy points. The chosen head is chosen without the test images. "
             "train s = training time per model, infer s = inference time per test set. "
             "paper acc = Makris et al. 2020 Table 1 (one split).", "", markdown_table(rows), ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", "Runs: " + ", ".join(f"`{d}`" for d in run_dirs), ""]
    out.write_text("\n".join(lines), encoding="utf-8", errors="backslashreplace")
    return out
