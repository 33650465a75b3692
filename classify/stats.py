"""Statistical tests for comparing models scored on the same test images, and intervals of proportions.

- ``mcnemar_exact``: one split, two models, the same test images: the exact (binomial) McNemar test on the
  discordant pairs, with Newcombe's score interval for the difference of the paired accuracies.
- ``corrected_resampled_t``: repeated random train/test splits or repeated k-fold CV of one data set. The
  training sets overlap, so the per-split scores are correlated and a plain paired t-test is far too
  optimistic; Nadeau and Bengio (2003) multiply the variance by ``1/J + n_test/n_train`` (J = number of
  splits). The same correction is the corrected repeated k-fold CV test of Bouckaert and Frank (2004).
- ``holm``: Holm's step-down adjustment of the p-values of one family (one table) of comparisons.
- ``wilson_interval`` / ``proportion_interval``: intervals of a proportion that stay inside [0, 1].

scipy supplies the distributions, the binomial test and the Wilson interval; neither scipy nor scikit-learn
has the corrected resampled t-test or Newcombe's paired interval, so those few lines are written here.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedTest:
    """The difference between two models' scores (a - b) on the same test images, and its test."""

    mean: float            # mean difference a - b (accuracy points as a fraction)
    ci_low: float
    ci_high: float
    p_value: float
    test: str              # "corrected resampled t" | "exact McNemar"
    n: int                 # splits (t-test) or test images (McNemar)
    statistic: float | None = None   # t, or the smaller discordant count for McNemar

    def as_dict(self) -> dict:
        return asdict(self)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1; got {confidence} instead")


def wilson_interval(successes: float, n: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``; always inside [0, 1].

    ``successes`` and ``n`` may be fractional (an effective sample size, see ``proportion_interval``).
    """
    _check_confidence(confidence)
    if n <= 0:
        raise ValueError(f"n must be positive; got {n} instead")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}]; got {successes} instead")
    z = float(stats.norm.ppf((1.0 + confidence) / 2.0))
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)      # exact bounds at 0 and n (no round-off)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def effective_test_size(n_test: float, n_train: float, n_splits: int) -> float:
    """Images a mean over ``n_splits`` overlapping splits is worth (Nadeau-Bengio): n_test / (1/J + n_test/n_train).

    One split (J = 1) is worth its ``n_test`` images.
    """
    if n_test <= 0 or n_train <= 0 or n_splits < 1:
        raise ValueError(f"need n_test > 0, n_train > 0, n_splits >= 1; got {n_test}, {n_train}, {n_splits} instead")
    if n_splits == 1:
        return float(n_test)
    return float(n_test) / (1.0 / n_splits + float(n_test) / float(n_train))


def proportion_interval(mean: float, n_test: float, n_train: float, n_splits: int,
                        confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Interval of a proportion (accuracy, sensitivity, ...) averaged over ``n_splits`` splits, inside [0, 1].

    The Wilson score interval at the mean, with the Nadeau-Bengio effective number of test images, so that
    averaging over splits that share their training images is not counted as new evidence (a Student-t over
    a handful of splits gave accuracy intervals such as [-0.71, 2.46]).
    """
    n = effective_test_size(n_test, n_train, n_splits)
    return wilson_interval(min(max(mean, 0.0), 1.0) * n, n, confidence)


def corrected_resampled_t(a: Sequence[float], b: Sequence[float], n_train: float, n_test: float,
                          confidence: float = CONFIDENCE) -> PairedTest:
    """Nadeau-Bengio corrected resampled t-test of paired per-split scores (a[j] and b[j] on split j).

    d_j = a_j - b_j; t = mean(d) / sqrt((1/J + n_test/n_train) * var(d, ddof=1)), J - 1 degrees of freedom.
    When every d_j is equal the variance is 0: p = 1 for a zero difference, else 0.
    """
    _check_confidence(confidence)
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"the corrected t-test needs at least 2 paired splits; got {d.size} instead")
    if n_train <= 0 or n_test <= 0:
        raise ValueError(f"n_train and n_test must be positive; got {n_train} and {n_test} instead")
    J = len(d)
    mean = float(d.mean())
    se = math.sqrt((1.0 / J + n_test / n_train) * float(d.var(ddof=1)))
    if se == 0.0:
        return PairedTest(mean, mean, mean, 1.0 if mean == 0.0 else 0.0, "corrected resampled t", J, None)
    t = mean / se
    p = float(2.0 * stats.t.sf(abs(t), J - 1))
    half = float(stats.t.ppf((1.0 + confidence) / 2.0, J - 1)) * se
    # a difference of two proportions lies in [-1, 1]
    return PairedTest(mean, max(-1.0, mean - half), min(1.0, mean + half), p, "corrected resampled t", J, t)


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool], confidence: float = CONFIDENCE) -> PairedTest:
    """Exact McNemar test of two models' per-image correctness on one test set (same images, same order).

    p = two-sided binomial test of b = #(a right, b wrong) among the b + c discordant images at 1/2
    (scipy.stats.binomtest). The interval of the accuracy difference is Newcombe's (1998, method 10) score
    interval for paired proportions, which stays inside [-1, 1].
    """
    ra = np.asarray(correct_a, dtype=bool)
    rb = np.asarray(correct_b, dtype=bool)
    if ra.shape != rb.shape or ra.ndim != 1 or ra.size == 0:
        raise ValueError(f"need two equal, non-empty 1-D correctness vectors; got shapes {ra.shape} and "
                         f"{rb.shape} instead")
    both = int(np.sum(ra & rb))
    only_a = int(np.sum(ra & ~rb))
    only_b = int(np.sum(~ra & rb))
    neither = int(np.sum(~ra & ~rb))
    return mcnemar_from_table([[both, only_a], [only_b, neither]], confidence)


def mcnemar_from_table(table: Sequence[Sequence[int]], confidence: float = CONFIDENCE) -> PairedTest:
    """``mcnemar_exact`` from the 2x2 table [[both right, only a right], [only b right, both wrong]]."""
    _check_confidence(confidence)
    (e, f), (g, h) = np.asarray(table, dtype=int)
    n = e + f + g + h
    if n <= 0 or min(e, f, g, h) < 0:
        raise ValueError(f"a 2x2 table of non-negative counts with a positive total is needed; got {table} instead")
    discordant = f + g
    p = 1.0 if discordant == 0 else float(stats.binomtest(int(f), int(discordant), 0.5).pvalue)
    p1, p2 = (e + f) / n, (e + g) / n
    l1, u1 = wilson_interval(e + f, n, confidence)
    l2, u2 = wilson_interval(e + g, n, confidence)
    denominator = (e + f) * (g + h) * (e + g) * (f + h)
    phi = (e * h - f * g) / math.sqrt(denominator) if denominator else 0.0
    diff = p1 - p2
    low = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = diff + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return PairedTest(float(diff), max(-1.0, low), min(1.0, high), min(1.0, p), "exact McNemar", int(n),
                      float(min(f, g)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given); reject where adjusted p < alpha.

    Sorted ascending, p_(i) is multiplied by (m - i) (i from 0), made non-decreasing, capped at 1.
    """
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"p_values must be 1-D; got shape {p.shape} instead")
    if np.any((p < 0) | (p > 1) | np.isnan(p)):
        raise ValueError("p-values must lie in [0, 1]")
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()
