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


def side_by_side(run_dirs: Sequence[str | Path]) -> tuple[list[dict[str, str]], list[str]]:
    """Table rows and notes for the given run folders (compare and finetune runs, in any order)."""
    heads: list[Evaluation] = []
    tuned: list[Evaluation] = []
    for run_dir in run_dirs:
        payload = load_results(run_dir)
        (heads if payload["kind"] == HEAD_KIND else tuned).extend(payload["evaluations"])
    if not tuned:
        raise CxrError("report needs at least one finetune run folder beside the compare runs")
    rows, notes = [], []
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
    rows, notes = side_by_side(run_dirs)
    lines = ["# Fine-tuning vs heads on the same test images", "",
             "Rows of one backbone are scored on identical test sets (matched by the sha256 of their images). "
             "mean ± std over test sets; train s = training time per model, infer s = inference time per test set. "
             "paper acc = Makris et al. 2020 Table 1 (one split).", "", markdown_table(rows), ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", "Runs: " + ", ".join(f"`{d}`" for d in run_dirs), ""]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out
