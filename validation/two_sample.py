"""Two-sample tests for dataset shift on embeddings (Rabanser et al. 2019, "Failing loudly"): is TARGET drawn
from TRAIN's distribution?

- ``domain_classifier_test``: a logistic regression told TRAIN (0) from TARGET (1) in patient-grouped
  cross-validation; its out-of-fold ROC AUC is the statistic (0.5: indistinguishable), its p-value the share
  of ``n_permutations`` domain relabellings whose AUC reaches it. The out-of-fold probability of each image is
  also its *atypicality* (how target-like it looks), which ranks the target images.
- ``mmd_test``: the unbiased squared maximum mean discrepancy with an RBF kernel (bandwidth: the median
  pairwise distance), with its permutation p-value; all permutations in one matrix product.

Both permute whole *patients* (``groups``), never single images: images of one patient are not exchangeable,
and permuting them one by one makes a patient with many images look like a shift. Features are standardized
and, above ``MAX_COMPONENTS`` dimensions, reduced by PCA fitted on both samples together (no domain label is
used, so the permutation test stays exact). ``prepare`` does that once; every test reads its output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

MAX_COMPONENTS = 32
"""PCA dimensions kept before the tests: the domain classifier and the kernel see the leading directions of
variation only, which keeps 200 permutations of 1,000 target images within seconds and the logistic
regression well posed with a few hundred training images (VGG16 gives 512 dimensions, Xception 2048)."""
DEFAULT_PERMUTATIONS = 200
DOMAIN_C = 0.1
"""Inverse L2 strength of the domain classifier (standardized components): mild shrinkage, so that a few
hundred images do not let it separate two samples of one distribution by chance directions."""


@dataclass(frozen=True)
class Pooled:
    """TRAIN and TARGET stacked (TRAIN first), standardized and PCA-reduced: what every test works on."""

    features: np.ndarray        # (n_train + n_target, k)
    domain: np.ndarray          # 0 = TRAIN, 1 = TARGET
    groups: np.ndarray          # the unit each row belongs to (patients, or the image itself)

    @property
    def n_train(self) -> int:
        return int((self.domain == 0).sum())


def prepare(train: np.ndarray, target: np.ndarray, train_groups: np.ndarray | None = None,
            target_groups: np.ndarray | None = None, max_components: int = MAX_COMPONENTS,
            seed: int = 0) -> Pooled:
    """Stack, standardize and reduce to at most ``max_components`` dimensions; groups default to one per image
    and are prefixed by their side, so a TRAIN and a TARGET patient never share a group."""
    train, target = np.asarray(train, float), np.asarray(target, float)
    if train.ndim != 2 or target.ndim != 2 or train.shape[1] != target.shape[1]:
        raise ValueError(f"train and target must be 2-D with the same columns, got {train.shape} and "
                         f"{target.shape} instead")
    X = StandardScaler().fit_transform(np.vstack([train, target]))
    k = min(max_components, X.shape[0] - 1, X.shape[1])
    if X.shape[1] > k:
        X = PCA(n_components=k, random_state=seed).fit_transform(X)

    def side(prefix: str, groups: np.ndarray | None, n: int) -> np.ndarray:
        values = np.arange(n).astype(str) if groups is None else np.asarray(groups).astype(str)
        return np.char.add(prefix, values)

    groups = np.concatenate([side("train:", train_groups, len(train)), side("target:", target_groups, len(target))])
    domain = np.r_[np.zeros(len(train), int), np.ones(len(target), int)]
    return Pooled(X, domain, groups)


def group_permutations(domain: np.ndarray, groups: np.ndarray, n_permutations: int, seed: int) -> np.ndarray:
    """(n_permutations, n) domain labels, each drawn by shuffling the groups' domains (whole patients move)."""
    _, first, codes = np.unique(groups, return_index=True, return_inverse=True)
    group_domain = domain[first]
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(group_domain)[codes] for _ in range(n_permutations)])


def permutation_p(observed: float, null: np.ndarray) -> float:
    """(1 + #null >= observed) / (1 + #null): never 0, exact under exchangeability."""
    return float((1 + np.sum(np.asarray(null) >= observed - 1e-12)) / (1 + len(null)))


def _domain_folds(domain: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list[tuple]:
    """Patient-grouped folds stratified by domain: each side's groups shuffled and dealt round-robin into
    ``folds`` folds (fewer when a side has fewer groups). Cheap enough to redraw for every permutation, unlike
    ``StratifiedGroupKFold``, whose search over thousands of groups dominated the test's time."""
    _, first, codes = np.unique(groups, return_index=True, return_inverse=True)
    group_domain = domain[first]
    k = max(2, min(folds, *(int((group_domain == d).sum()) for d in (0, 1))))
    rng = np.random.default_rng(seed)
    fold_of_group = np.empty(len(first), int)
    for d in (0, 1):
        members = rng.permutation(np.flatnonzero(group_domain == d))
        fold_of_group[members] = np.arange(len(members)) % k
    fold = fold_of_group[codes]
    return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(k)]


def auc_score(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` for ``labels`` == 1 (the Mann-Whitney form, ties counted half)."""
    ranks = rankdata(scores)
    positive = np.asarray(labels) == 1
    n1, n0 = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def out_of_fold_scores(X: np.ndarray, domain: np.ndarray, groups: np.ndarray, folds: int = 5,
                       seed: int = 0) -> np.ndarray:
    """P(TARGET) of every row from a logistic regression fitted on the other folds (patient-grouped)."""
    scores = np.zeros(len(domain))
    for train_idx, test_idx in _domain_folds(domain, groups, folds, seed):
        model = LogisticRegression(C=DOMAIN_C, max_iter=200, class_weight="balanced")
        model.fit(X[train_idx], domain[train_idx])
        scores[test_idx] = model.predict_proba(X[test_idx])[:, 1]
    return scores


@dataclass(frozen=True)
class DomainTest:
    """The domain-classifier test: out-of-fold AUC, its permutation p-value and each row's P(TARGET)."""

    auc: float
    p_value: float
    scores: np.ndarray
    n_permutations: int
    null_auc: np.ndarray


def domain_classifier_test(pooled: Pooled, folds: int = 5, n_permutations: int = DEFAULT_PERMUTATIONS,
                           seed: int = 0) -> DomainTest:
    """TRAIN vs TARGET by a classifier: AUC of its out-of-fold scores, p-value over group permutations (the
    folds are drawn afresh for each relabelling, as they would be for data of that labelling)."""
    X, domain, groups = pooled.features, pooled.domain, pooled.groups
    with threadpool_limits(1):
        scores = out_of_fold_scores(X, domain, groups, folds, seed)
        auc = float(auc_score(domain, scores))
        null = []
        for k, labels in enumerate(group_permutations(domain, groups, n_permutations, seed + 1)):
            null.append(auc_score(labels, out_of_fold_scores(X, labels, groups, folds, seed + 1 + k)))
    null = np.array(null)
    return DomainTest(auc, permutation_p(auc, null), scores, n_permutations, null)


def rbf_kernel(X: np.ndarray, bandwidth: float | None = None) -> tuple[np.ndarray, float]:
    """(exp(-|x - y|^2 / (2 h^2)), h), h the median pairwise distance unless given (the median heuristic)."""
    sq = np.einsum("ij,ij->i", X, X)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * X @ X.T, 0.0)
    if bandwidth is None:
        upper = d2[np.triu_indices(len(X), 1)]
        bandwidth = math.sqrt(float(np.median(upper))) if upper.size else 1.0
        bandwidth = bandwidth or 1.0
    return np.exp(-d2 / (2 * bandwidth ** 2)), bandwidth


def mmd2_unbiased(K: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Unbiased MMD^2 between rows labelled 0 and 1, for one labelling (n,) or many (P, n) at once."""
    A = np.atleast_2d(np.asarray(labels, float))      # (P, n) indicators of side 1
    B = 1.0 - A
    KA, KB = A @ K, B @ K                             # (P, n)
    m, n = A.sum(axis=1), B.sum(axis=1)
    diag = np.diag(K)
    xx = (np.einsum("pi,pi->p", KB, B) - B @ diag) / (n * (n - 1))
    yy = (np.einsum("pi,pi->p", KA, A) - A @ diag) / (m * (m - 1))
    xy = np.einsum("pi,pi->p", KB, A) / (m * n)
    out = xx + yy - 2 * xy
    return out if np.ndim(labels) == 2 else out[:1]


@dataclass(frozen=True)
class MmdTest:
    """MMD^2 (unbiased), its permutation p-value and the kernel bandwidth."""

    mmd2: float
    p_value: float
    bandwidth: float
    n_permutations: int


def mmd_test(pooled: Pooled, n_permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0,
             kernel: tuple[np.ndarray, float] | None = None, rows: np.ndarray | None = None) -> MmdTest:
    """The MMD permutation test of TRAIN vs TARGET; ``rows`` restricts it to some rows (a target subgroup with
    all of TRAIN), ``kernel`` reuses a computed (K, bandwidth)."""
    K, bandwidth = kernel if kernel is not None else rbf_kernel(pooled.features)
    domain, groups = pooled.domain, pooled.groups
    if rows is not None:
        K, domain, groups = K[np.ix_(rows, rows)], domain[rows], groups[rows]
    observed = float(mmd2_unbiased(K, domain)[0])
    null = mmd2_unbiased(K, group_permutations(domain, groups, n_permutations, seed))
    return MmdTest(observed, permutation_p(observed, null), bandwidth, n_permutations)


def nearest_train_distance(pooled: Pooled) -> np.ndarray:
    """Euclidean distance (in the standardized, reduced space) from each TARGET row to its nearest TRAIN row."""
    X = pooled.features
    train, target = X[pooled.domain == 0], X[pooled.domain == 1]
    d2 = (np.einsum("ij,ij->i", target, target)[:, None] + np.einsum("ij,ij->i", train, train)[None, :]
          - 2 * target @ train.T)
    return np.sqrt(np.maximum(d2.min(axis=1), 0.0))
