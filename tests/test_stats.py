"""Paired tests, Holm, intervals of proportions and head selection, against worked examples."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from cxr_transfer.classify.compare import score_split, summarize_evaluations
from cxr_transfer.classify.comparisons import (
    CORRECT,
    INNER_SCORE,
    SELECTED,
    head_vs_top,
    paired_test,
    select_heads,
)
from cxr_transfer.classify.metrics import classification_metrics, summarize, summarize_proportion
from cxr_transfer.classify.protocols import Split
from cxr_transfer.classify.report import accuracy_axis_limits
from cxr_transfer.classify.results import Evaluation, save_results
from cxr_transfer.classify.side_by_side import side_by_side
from cxr_transfer.classify.stats import (
    corrected_resampled_t,
    holm,
    mcnemar_exact,
    mcnemar_from_table,
    proportion_interval,
    wilson_interval,
)

CLASSES = ["covid", "normal", "pneumonia"]


def _vectors(both: int, only_a: int, only_b: int, neither: int) -> tuple[list[bool], list[bool]]:
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return a, b


def test_mcnemar_exact_p_value_by_hand():
    # 10 images only a gets right, 2 only b: p = 2 * P(X <= 2 | 12, 1/2) = 2 * (1 + 12 + 66) / 2**12
    result = mcnemar_exact(*_vectors(50, 10, 2, 6))
    assert result.p_value == pytest.approx(2 * 79 / 4096, rel=1e-12)
    assert result.mean == pytest.approx(8 / 68)
    assert result.test == "exact McNemar" and result.n == 68 and result.statistic == 2
    assert -1 <= result.ci_low < result.mean < result.ci_high <= 1
    assert result.ci_low > 0  # p < 0.05 and the interval excludes 0 agree here
    # no discordant images: nothing to tell apart
    same = mcnemar_from_table([[60, 0], [0, 8]])
    assert same.p_value == 1.0 and same.mean == 0.0
    # symmetric discordance: p = 1 (2 * P(X <= 3 | 6) > 1, capped)
    assert mcnemar_from_table([[60, 3], [3, 2]]).p_value == 1.0
    # one disagreeing image of 68 is no evidence at all
    assert mcnemar_from_table([[67, 1], [0, 0]]).p_value == 1.0


def test_mcnemar_interval_stays_inside_minus_one_one():
    for table in ([[0, 68], [0, 0]], [[0, 0], [68, 0]], [[0, 34], [34, 0]], [[68, 0], [0, 0]]):
        result = mcnemar_from_table(table)
        assert -1.0 <= result.ci_low <= result.mean <= result.ci_high <= 1.0
    with pytest.raises(ValueError):
        mcnemar_exact([True, False], [True])


def test_corrected_resampled_t_statistic_by_hand():
    a = [0.90, 0.80, 0.85, 0.95]
    b = [0.85, 0.80, 0.80, 0.90]
    # d = [.05, 0, .05, .05]: mean .0375, var(ddof=1) = .001875 / 3 = .000625
    # corrected variance (1/4 + 17/68) * .000625 = .0003125 -> t = .0375 / sqrt(.0003125) = 2.1213203...
    result = corrected_resampled_t(a, b, n_train=68, n_test=17)
    assert result.statistic == pytest.approx(0.0375 / math.sqrt(0.0003125), rel=1e-9)
    assert result.statistic == pytest.approx(2.1213203, rel=1e-6)
    assert result.p_value == pytest.approx(2 * scipy_stats.t.sf(2.1213203, 3), rel=1e-5)
    half = scipy_stats.t.ppf(0.975, 3) * math.sqrt(0.0003125)
    assert (result.ci_low, result.ci_high) == pytest.approx((0.0375 - half, 0.0375 + half))
    # the uncorrected paired t would be 0.0375 / sqrt(.000625 / 4) = 3.0: the correction is what makes it honest
    assert scipy_stats.ttest_rel(a, b).statistic == pytest.approx(3.0)
    assert result.p_value > scipy_stats.ttest_rel(a, b).pvalue
    assert corrected_resampled_t([0.9, 0.9], [0.9, 0.9], 10, 2).p_value == 1.0
    with pytest.raises(ValueError):
        corrected_resampled_t([0.9], [0.8], 10, 2)


def test_holm_by_hand():
    # sorted: .005*4 = .02, .01*3 = .03, .03*2 = .06, .04*1 = .04 -> .06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []
    with pytest.raises(ValueError):
        holm([1.5])


def test_intervals_of_a_proportion_stay_inside_zero_one():
    assert wilson_interval(9, 10) == pytest.approx((0.5958, 0.9821), abs=1e-4)   # textbook Wilson interval
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    # one split: the plain Wilson interval of its test images
    assert proportion_interval(0.9, 10, 40, 1) == pytest.approx(wilson_interval(9, 10))
    # 10 overlapping 80/20 splits of 68 test images are worth 68 / (1/10 + 68/268) = 192 images, not 680
    low, high = proportion_interval(0.97, 68, 268, 10)
    assert wilson_interval(0.97 * 680, 680)[0] > low and 0 <= low < 0.97 < high <= 1
    # two splits scored 1.0 and 0.5: the Student-t interval leaves [0, 1] far behind; this one does not
    values = [1.0, 0.5]
    t_interval = summarize(values)
    assert t_interval["ci_low"] < 0 and t_interval["ci_high"] > 1
    interval = summarize_proportion(values, n_test=4, n_train=16)
    assert 0.0 <= interval["ci_low"] < 0.75 < interval["ci_high"] <= 1.0
    for mean in (0.0, 1.0):
        found = summarize_proportion([mean] * 3, n_test=68, n_train=268)
        assert 0.0 <= found["ci_low"] <= found["ci_high"] <= 1.0


def _evaluation(model: str, accuracy: float, fingerprint: str, inner: float | None = None, backbone: str = "vgg16",
                correct: str | None = None, n_test: int = 20, repeat: int = 0) -> Evaluation:
    right = round(accuracy * n_test)
    y_true = np.array([i % 3 for i in range(n_test)])
    y_pred = y_true.copy()
    y_pred[right:] = (y_pred[right:] + 1) % 3
    extra = {INNER_SCORE: inner} if inner is not None else {}
    if correct is not None:
        extra[CORRECT] = correct
    return Evaluation(backbone, model, "paper", repeat, 0, 80, n_test, fingerprint,
                      classification_metrics(y_true, y_pred, CLASSES), 0.1, 0.01, extra)


def test_selection_never_uses_test_scores():
    # on every split, "lucky" wins on the test images but loses inside the training part: it is never chosen
    evaluations = []
    for split in range(4):
        evaluations += [_evaluation("lucky", 1.0, f"f{split}", inner=0.70, repeat=split),
                        _evaluation("steady", 0.85, f"f{split}", inner=0.90, repeat=split)]
    selected = select_heads(evaluations)
    assert len(selected) == 4 and {e.model for e in selected} == {SELECTED}
    assert {e.extra["chosen"] for e in selected} == {"steady"}
    assert all(e.metrics["accuracy"] == pytest.approx(0.85) for e in selected)
    assert selected[0].extra["inner_scores"] == {"lucky": 0.7, "steady": 0.9}


def test_inner_cv_score_is_blind_to_the_test_labels():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    X = rng.normal(size=(60, 8)) + y[:, None] * 0.6
    split = Split("paper", 0, 0, np.arange(0, 60, 1)[np.arange(60) % 5 != 0], np.arange(0, 60, 5))
    shas = [f"{i:04d}" for i in range(60)]
    scrambled = y.copy()
    scrambled[split.test_idx] = (scrambled[split.test_idx] + 1) % 3   # every test label wrong
    runs = {}
    for name, labels in (("true", y), ("scrambled", scrambled)):
        runs[name] = [score_split("b", head, X, labels, split, shas, CLASSES, 0, False, select_folds=3)
                      for head in ("logreg", "knn")]
    inner = {name: [e.extra[INNER_SCORE] for e in found] for name, found in runs.items()}
    assert inner["true"] == inner["scrambled"]
    assert [e.metrics["accuracy"] for e in runs["true"]] != [e.metrics["accuracy"] for e in runs["scrambled"]]
    assert ([e.extra["chosen"] for e in select_heads(runs["true"])]
            == [e.extra["chosen"] for e in select_heads(runs["scrambled"])])
    assert len(runs["true"][0].extra[CORRECT]) == len(split.test_idx)


def test_paired_test_fits_the_design_and_marks_heads():
    many = {m: [_evaluation(m, acc + 0.05 * (k % 2), f"f{k}", repeat=k) for k in range(10)]
            for m, acc in (("a", 0.9), ("b", 0.6))}
    many["c"] = [_evaluation("c", 0.9 + 0.05 * (k % 3 == 0), f"f{k}", repeat=k) for k in range(10)]  # mean 0.92
    assert paired_test(many["a"], many["b"]).test == "corrected resampled t"
    one_a = [_evaluation("a", 0.9, "g", correct="1" * 18 + "00")]
    one_b = [_evaluation("b", 0.5, "g", correct="1" * 10 + "0" * 10)]
    assert paired_test(one_a, one_b).test == "exact McNemar"
    assert paired_test(one_a, [_evaluation("b", 0.5, "g")]) is None     # no per-image predictions
    assert paired_test(one_a, many["b"]) is None                        # no shared test set
    tops, rows = head_vs_top([e for group in many.values() for e in group])
    marks = {c.model: c.mark for c in rows}
    assert tops == {"vgg16": "a"} and marks == {"b": "worse", "c": "n.s."}
    assert all(c.p_holm >= c.test.p_value for c in rows)


def test_summary_intervals_inside_zero_one():
    evaluations = [_evaluation("h", acc, f"f{k}", repeat=k) for k, acc in enumerate([1.0, 0.55])]
    row = summarize_evaluations(evaluations)[0]
    for metric in ("accuracy", "covid_sensitivity", "covid_specificity"):
        assert 0.0 <= row[metric]["ci_low"] <= row[metric]["mean"] <= row[metric]["ci_high"] <= 1.0


def test_report_sets_the_inner_cv_choice_beside_finetuning(tmp_path: Path):
    heads = []   # knn wins on the test images, logreg inside the training parts
    for k in range(3):
        heads += [_evaluation("knn", 1.0, f"f{k}", inner=0.7, repeat=k),
                  _evaluation("logreg", 0.9, f"f{k}", inner=0.9, repeat=k)]
    heads += select_heads(heads)
    save_results(tmp_path / "cmp", "compare", CLASSES, {}, heads, [])
    for k in range(3):
        save_results(tmp_path / f"ft{k}", "finetune", CLASSES, {}, [_evaluation("finetune", 0.95, f"f{k}")], [])
    runs = [tmp_path / "cmp", tmp_path / "ft0", tmp_path / "ft1", tmp_path / "ft2", tmp_path / "ft2"]
    rows, notes = side_by_side(runs)
    models = [r["model"] for r in rows]
    assert "chosen head: logreg" in models and not any("best" in m for m in models)
    assert any("never by the test images" in n for n in notes)
    assert any("given twice" in n and "counted once" in n for n in notes)
    assert next(r for r in rows if r["model"] == "finetune")["test sets"] == "3"
    assert any(n.startswith("vgg16: finetune minus the chosen head: logreg") and "corrected resampled t" in n
               for n in notes)
    assert next(r for r in rows if r["model"] == "head: knn")["vs top"] == "top"
    named, _ = side_by_side(runs[:4], head="knn")
    assert "head: knn" in [r["model"] for r in named]


def test_report_cli_prints_the_choice_and_refuses_unknown_heads(tmp_path: Path, run_cli):
    heads = []
    for k in range(3):
        heads += [_evaluation("knn", 1.0, f"f{k}", inner=0.7, repeat=k),
                  _evaluation("logreg", 0.9, f"f{k}", inner=0.9, repeat=k)]
    save_results(tmp_path / "cmp", "compare", CLASSES, {}, heads + select_heads(heads), [])
    for k in range(3):
        save_results(tmp_path / f"ft{k}", "finetune", CLASSES, {}, [_evaluation("finetune", 0.95, f"f{k}")], [])
    runs = [tmp_path / name for name in ("cmp", "ft0", "ft1", "ft2")]
    done = run_cli("report", *runs, "--out", tmp_path / "side.md")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "chosen head: logreg" in done.stdout and "never by the test images" in done.stdout
    assert "finetune minus the chosen head: logreg" in done.stdout and "p (Holm)" in done.stdout
    assert "vs top" in (tmp_path / "side.md").read_text()
    refused = run_cli("report", *runs, "--head", "unicorn", "--out", tmp_path / "x.md")
    assert refused.returncode == 2 and "unknown head 'unicorn'" in refused.error_line()


def test_accuracy_axis_is_zoomed_and_inside_zero_one():
    summary = [{"accuracy": {"mean": 0.97, "ci_low": 0.93, "ci_high": 0.99}},
               {"accuracy": {"mean": 0.95, "ci_low": 0.90, "ci_high": 0.98}}]
    assert accuracy_axis_limits(summary) == pytest.approx((0.88, 1.0))
    assert accuracy_axis_limits([{"accuracy": {"mean": 0.01, "ci_low": 0.0, "ci_high": 0.05}}])[0] == 0.0
