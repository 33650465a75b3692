"""Which differences in a report are real: head selection without the test labels, and paired tests.

Evaluations of two models are paired by the test set they were scored on (``test_fingerprint``), so a
difference is only ever computed on identical test images. The test fits the design:

- two or more shared splits (the paper's repeated 80/20 splits, repeated CV): the corrected resampled
  t-test of Nadeau and Bengio (2003) on the per-split accuracies;
- one shared split (holdout, or one seed): the exact McNemar test on per-image correctness.

Holm's correction is applied across the comparisons of one table. A model is marked "n.s." (not
significantly worse than the top one) when its Holm-adjusted p-value is at least ``ALPHA`` or it is not
worse at all.

Selection: the "selected" head of a backbone is chosen on each split by the mean accuracy of a k-fold
cross-validation inside that split's training part (nested); the outer test labels are never read.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from cxr_transfer.classify.results import Evaluation
from cxr_transfer.classify.stats import PairedTest, corrected_resampled_t, holm, mcnemar_exact

ALPHA = 0.05
SELECTED = "selected"
"""Model name of the per-split head chosen by inner cross-validation."""
INNER_SCORE = "inner_cv_accuracy"
CORRECT = "correct"
"""Evaluation.extra key: per-image correctness, '0'/'1' in the order of the test images' sorted sha256."""


def correctness_string(y_true: np.ndarray, y_pred: np.ndarray, test_shas: Sequence[str]) -> str:
    """Per-image correctness as '0'/'1', ordered by sha256 so two runs' strings line up image by image."""
    order = sorted(range(len(test_shas)), key=lambda k: test_shas[k])
    return "".join("1" if y_true[k] == y_pred[k] else "0" for k in order)


def select_heads(evaluations: Sequence[Evaluation]) -> list[Evaluation]:
    """Per (backbone, split): the head with the best inner-CV accuracy, as an Evaluation named ``SELECTED``.

    Only ``extra[INNER_SCORE]`` (computed on the split's training part) decides; ties go to the head listed
    first. The returned evaluation carries the chosen head's outer test metrics, the chosen name and every
    head's inner score. Evaluations without an inner score are ignored.
    """
    groups: dict[tuple, list[Evaluation]] = {}
    for e in evaluations:
        if e.model != SELECTED and e.extra.get(INNER_SCORE) is not None:
            groups.setdefault((e.backbone, e.protocol, e.repeat, e.fold, e.test_fingerprint), []).append(e)
    selected = []
    for candidates in groups.values():
        best = max(candidates, key=lambda e: e.extra[INNER_SCORE])  # max keeps the first of equal scores
        inner = {e.model: round(float(e.extra[INNER_SCORE]), 4) for e in candidates}
        selected.append(replace(best, model=SELECTED,
                                extra={**best.extra, "chosen": best.model, "inner_scores": inner}))
    return selected


def selection_counts(selected: Sequence[Evaluation], backbone: str) -> Counter:
    """How often each head was chosen for a backbone, over the splits."""
    return Counter(e.extra["chosen"] for e in selected if e.backbone == backbone)


def _by_test_set(evaluations: Sequence[Evaluation]) -> dict[str, Evaluation]:
    found: dict[str, Evaluation] = {}
    for e in evaluations:
        found.setdefault(e.test_fingerprint, e)
    return found


def paired_test(a: Sequence[Evaluation], b: Sequence[Evaluation]) -> PairedTest | None:
    """Accuracy of a minus accuracy of b on their shared test sets, with the test that fits the design.

    None when they share no test set, or share one and either lacks per-image correctness.
    """
    left, right = _by_test_set(a), _by_test_set(b)
    shared = sorted(set(left) & set(right))
    if not shared:
        return None
    if len(shared) == 1:
        ea, eb = left[shared[0]], right[shared[0]]
        ca, cb = ea.extra.get(CORRECT), eb.extra.get(CORRECT)
        if not ca or not cb or len(ca) != len(cb):
            return None
        return mcnemar_exact([c == "1" for c in ca], [c == "1" for c in cb])
    n_train = float(np.mean([left[f].n_train for f in shared]))
    n_test = float(np.mean([left[f].n_test for f in shared]))
    return corrected_resampled_t([left[f].metrics["accuracy"] for f in shared],
                                 [right[f].metrics["accuracy"] for f in shared], n_train, n_test)


@dataclass
class Comparison:
    """One row of a comparison table: ``model`` against ``reference`` (difference = model - reference)."""

    group: str                 # backbone (head vs top) or head (backbone vs backbone)
    model: str
    reference: str
    test: PairedTest | None
    p_holm: float | None = None

    @property
    def mark(self) -> str:
        """'n.s.' when not significantly worse than the reference, 'worse' when it is, '?' when untested."""
        if self.test is None:
            return "?"
        if self.test.mean >= 0 or (self.p_holm is not None and self.p_holm >= ALPHA):
            return "n.s."
        return "worse"

    def as_dict(self) -> dict:
        return {"group": self.group, "model": self.model, "reference": self.reference,
                "test": self.test.as_dict() if self.test else None, "p_holm": self.p_holm, "mark": self.mark}


def adjust(comparisons: list[Comparison]) -> list[Comparison]:
    """Holm-adjust the p-values of one table in place (untested rows stay None); returns the list."""
    tested = [c for c in comparisons if c.test is not None]
    for comparison, p in zip(tested, holm([c.test.p_value for c in tested])):
        comparison.p_holm = p
    return comparisons


def mean_accuracy(evaluations: Sequence[Evaluation]) -> float:
    return float(np.mean([e.metrics["accuracy"] for e in evaluations]))


def against_top(models: dict[str, list[Evaluation]], group: str) -> tuple[str, list[Comparison]]:
    """Every model of a group against the one with the highest mean accuracy (unadjusted; see ``adjust``).

    The top model is only the reference of the marks: it is not a selection (see ``select_heads``).
    """
    top = max(models, key=lambda m: mean_accuracy(models[m]))
    return top, [Comparison(group, m, top, paired_test(models[m], models[top])) for m in models if m != top]


def head_vs_top(evaluations: Sequence[Evaluation]) -> tuple[dict[str, str], list[Comparison]]:
    """Per backbone, each head against its top head; Holm across the whole table. Returns ({backbone: top}, rows).

    The head chosen by inner CV (``SELECTED``) is never the top one, but is tested against it: the gap is
    what choosing without the test images costs against the head that looks best on them.
    """
    tops, rows = {}, []
    for backbone in sorted({e.backbone for e in evaluations}):
        models: dict[str, list[Evaluation]] = {}
        for e in evaluations:
            if e.backbone == backbone:
                models.setdefault(e.model, []).append(e)
        selected = models.pop(SELECTED, None)
        tops[backbone], found = against_top(models, backbone)
        if selected:
            found.append(Comparison(backbone, SELECTED, tops[backbone], paired_test(selected, models[tops[backbone]])))
        rows += found
    return tops, adjust(rows)


def backbone_vs_backbone(evaluations: Sequence[Evaluation]) -> list[Comparison]:
    """For each head (and the selected head), every backbone against the best backbone for that head."""
    rows = []
    for model in sorted({e.model for e in evaluations}):
        backbones: dict[str, list[Evaluation]] = {}
        for e in evaluations:
            if e.model == model:
                backbones.setdefault(e.backbone, []).append(e)
        if len(backbones) > 1:
            rows += against_top(backbones, model)[1]
    return adjust(rows)


def format_test(comparison: Comparison) -> dict[str, str]:
    """Table cells: difference in points, its 95% interval, p, Holm-adjusted p, test, mark."""
    t = comparison.test
    if t is None:
        return {"difference": "-", "95% CI": "-", "p": "-", "p (Holm)": "-", "test": "no shared test set",
                "vs top": "?"}
    return {"difference": f"{100 * t.mean:+.1f}", "95% CI": f"[{100 * t.ci_low:+.1f}, {100 * t.ci_high:+.1f}]",
            "p": f"{t.p_value:.3f}", "p (Holm)": f"{comparison.p_holm:.3f}" if comparison.p_holm is not None else "-",
            "test": f"{t.test} (n={t.n})", "vs top": comparison.mark}
