"""``cli.py report``: fine-tuned models and scikit-learn heads side by side on the same test images.

Runs are matched by test-set fingerprint (sha256 over the test images' sha256), so a number is only put
beside another when both models were scored on exactly the same images. Per backbone, each fine-tuned
model is shown next to the best head (highest mean accuracy on the shared test sets).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from cxr_transfer.classify.metrics import headline, summarize
from cxr_transfer.classify.report import markdown_table
from cxr_transfer.classify.results import Evaluation, load_results
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.outputs import writable_file
from cxr_transfer.core.paper import paper_accuracy
from cxr_transfer.core.tables import mean_std

HEAD_KIND = "compare"


def _row(label: str, backbone: str, evaluations: list[Evaluation]) -> dict[str, str]:
    flat = [headline(e.metrics) for e in evaluations]

    def cell(key: str) -> str:
        values = [f[key] for f in flat if f[key] is not None]
        if not values:
            return "-"
        return mean_std(summarize(values))

    paper = paper_accuracy(backbone)
    return {"backbone": backbone, "model": label, "test sets": str(len(evaluations)), "accuracy": cell("accuracy"),
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


def side_by_side(run_dirs: Sequence[str | Path]) -> tuple[list[dict[str, str]], list[str]]:
    """Table rows and notes for the given run folders (compare and finetune runs, in any order).

    A folder given twice counts once; a partial (interrupted) finetune run has no test scores, so it is
    left out with a note, and refused with its epoch count when no finished finetune run is left.
    """
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
    rows = []
    for backbone in sorted({e.backbone for e in tuned}):
        for model in sorted({e.model for e in tuned if e.backbone == backbone}):
            mine = [e for e in tuned if e.backbone == backbone and e.model == model]
            fingerprints = {e.test_fingerprint for e in mine}
            rows.append(_row(model, backbone, mine))
            candidates = [e for e in heads if e.backbone == backbone and e.test_fingerprint in fingerprints]
            if not candidates:
                notes.append(f"{backbone}/{model}: no compare run scored the same test images "
                             f"(run compare with the same data, protocol and seeds)")
                continue
            by_head: dict[str, list[Evaluation]] = {}
            for e in candidates:
                by_head.setdefault(e.model, []).append(e)
            best = max(by_head, key=lambda h: np.mean([e.metrics["accuracy"] for e in by_head[h]]))
            shared = by_head[best]
            rows.append(_row(f"best head: {best}", backbone, shared))
            if len({e.test_fingerprint for e in shared}) < len(fingerprints):
                notes.append(f"{backbone}: the heads share {len({e.test_fingerprint for e in shared})} of the "
                             f"{len(fingerprints)} test sets of {model}")
    return rows, notes


def write_side_by_side(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Write the side-by-side Markdown report to ``out`` (its folder is checked writable first)."""
    out = writable_file(out, "report")
    rows, notes = side_by_side(run_dirs)
    run_dirs, _ = unique_runs(run_dirs)
    lines = ["# Fine-tuning vs heads on the same test images", "",
             "Rows of one backbone are scored on identical test sets (matched by the sha256 of their images). "
             "mean ± std over test sets; train s = training time per model, infer s = inference time per test set. "
             "paper acc = Makris et al. 2020 Table 1 (one split).", "", markdown_table(rows), ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", "Runs: " + ", ".join(f"`{d}`" for d in run_dirs), ""]
    out.write_text("\n".join(lines), encoding="utf-8", errors="backslashreplace")
    return out
