"""Registry of scikit-learn classification heads fitted on frozen CNN embeddings.

Every head is a Pipeline ending in a step named "clf" and exposes ``predict_proba``.
Defaults suit the paper's regime: a few hundred images with 512..2048+ dimensional
embeddings, so that 7 heads x 2 backbones x 5 folds on 336 images run in under a minute.

Fit heads under ``threadpoolctl.threadpool_limits(1)``: on matrices this small BLAS/OpenMP
threads only add overhead, and on a busy 2-core machine they made 7-head 5-fold 17 s -> 75 s.
(The random forest still uses all cores through joblib, n_jobs=-1.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from cxr_transfer.core.errors import CxrError

HGB_PCA_COMPONENTS = 64
"""Dimensions kept before gradient boosting; HGB on raw 2048-dim features is far too slow."""

SVM_CALIBRATION_FOLDS = 3
"""Inner folds the SVM heads use to fit their probability temperature."""


class CappedPCA(TransformerMixin, BaseEstimator):
    """PCA that keeps at most ``n_components``, fewer when the training fold is smaller.

    Plain PCA fails when a (nested) training fold has fewer rows or columns than
    ``n_components``; capping keeps small folds and small test data working.
    """

    def __init__(self, n_components: int = HGB_PCA_COMPONENTS, random_state: int | None = None):
        self.n_components = n_components
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> "CappedPCA":
        """Fit a PCA with min(n_components, n_samples, n_features) components."""
        n_samples, n_features = np.shape(X)
        kept = max(1, min(self.n_components, n_samples, n_features))
        self.pca_ = PCA(n_components=kept, random_state=self.random_state).fit(X)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Project onto the fitted principal components."""
        return self.pca_.transform(X)


def _calibrated_svm(kernel: str, C: float = 1.0) -> CalibratedClassifierCV:
    """An SVC whose probabilities come from temperature scaling.

    ``SVC(probability=True)`` is deprecated in scikit-learn 1.9. Temperature scaling with
    ``ensemble=False`` refits one SVC on all the data it is given and only rescales its
    decision function, so predictions are exactly the plain SVC's (sigmoid/Platt
    calibration can change the argmax and did so badly on n < p embeddings).
    The calibration folds are unshuffled StratifiedKFold, hence deterministic.
    """
    return CalibratedClassifierCV(
        SVC(kernel=kernel, C=C),
        method="temperature",
        cv=SVM_CALIBRATION_FOLDS,
        ensemble=False,
    )


def _scaled(step: Any) -> list[tuple[str, Any]]:
    return [("scale", StandardScaler()), ("clf", step)]


@dataclass(frozen=True)
class HeadSpec:
    """One registered head: how to build it, what its defaults are and what ``--tune`` searches.

    ``build(seed, **params)`` returns the Pipeline steps; ``params`` are the default keyword arguments and
    ``grid`` the tuning grid, keyed by Pipeline parameter names (2-8 points each, so nested 5 x 3-fold
    tuning on ~336 images stays practical).
    """

    name: str
    description: str
    build: Callable[..., list[tuple[str, Any]]]
    params: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)


HEADS: dict[str, HeadSpec] = {spec.name: spec for spec in (
    HeadSpec(name="logreg", description="standardize + LogisticRegression(C=1, max_iter=5000)",
             build=lambda seed, C, max_iter: _scaled(LogisticRegression(C=C, max_iter=max_iter, random_state=seed)),
             params={"C": 1.0, "max_iter": 5000},
             grid={"clf__C": [0.01, 0.1, 1.0, 10.0]}),
    HeadSpec(name="linsvm", description="standardize + linear SVC, temperature-scaled probabilities",
             build=lambda seed, C: _scaled(_calibrated_svm("linear", C)),
             params={"C": 1.0},
             grid={"clf__estimator__C": [0.001, 0.01, 0.1, 1.0]}),
    HeadSpec(name="rbfsvm", description="standardize + RBF SVC, temperature-scaled probabilities",
             build=lambda seed, C: _scaled(_calibrated_svm("rbf", C)),
             params={"C": 1.0},
             grid={"clf__estimator__C": [0.1, 1.0, 10.0, 100.0]}),
    HeadSpec(name="knn", description="standardize + k nearest neighbours (k=5)",
             build=lambda seed, n_neighbors: _scaled(KNeighborsClassifier(n_neighbors=n_neighbors)),
             params={"n_neighbors": 5},
             grid={"clf__n_neighbors": [3, 5, 9, 15], "clf__weights": ["uniform", "distance"]}),
    HeadSpec(name="rf", description="random forest of 300 trees on raw features (trees need no scaling), all cores",
             build=lambda seed, n_estimators: [("clf", RandomForestClassifier(n_estimators=n_estimators, n_jobs=-1,
                                                                              random_state=seed))],
             params={"n_estimators": 300},
             grid={"clf__max_features": ["sqrt", "log2"], "clf__min_samples_leaf": [1, 3]}),
    HeadSpec(name="hgb", description="standardize + PCA to 64 dims + HistGradientBoosting (raw 2048 dims is "
                                     "far too slow)",
             build=lambda seed, n_components: [("scale", StandardScaler()),
                                               ("reduce", CappedPCA(n_components=n_components, random_state=seed)),
                                               ("clf", HistGradientBoostingClassifier(random_state=seed))],
             params={"n_components": HGB_PCA_COMPONENTS},
             grid={"clf__learning_rate": [0.05, 0.1], "clf__max_leaf_nodes": [15, 31]}),
    # alpha >= 0.1 needs 200-300 adam epochs on 2048 dims (30 s+ per fit); the grid's values converge in ~20
    HeadSpec(name="mlp", description="standardize + one hidden layer of 256 units (adam, up to 500 epochs)",
             build=lambda seed, hidden, max_iter: _scaled(MLPClassifier(hidden_layer_sizes=(hidden,),
                                                                        early_stopping=False, max_iter=max_iter,
                                                                        random_state=seed)),
             params={"hidden": 256, "max_iter": 500},
             grid={"clf__alpha": [1e-4, 1e-3, 1e-2]}),
)}

HEAD_NAMES: tuple[str, ...] = tuple(HEADS)
"""All heads, in the stable order reports list them."""


def get_head(name: str) -> HeadSpec:
    """The registry entry of a head; unknown names list the valid ones."""
    if name not in HEADS:
        raise CxrError(f"unknown head '{name}'; valid heads: {', '.join(HEAD_NAMES)}")
    return HEADS[name]


def make_head(name: str, seed: int = 0, **params: Any) -> Pipeline:
    """Build an unfitted head by name (see ``HEADS``); every randomized step gets ``seed``; ``params``
    override the entry's defaults."""
    spec = get_head(name)
    unknown = set(params) - set(spec.params)
    if unknown:
        raise TypeError(f"head '{name}' takes the parameters {sorted(spec.params)}; got {sorted(unknown)} instead")
    return Pipeline(spec.build(seed, **{**spec.params, **params}))


def param_grid(name: str) -> dict:
    """The head's hyper-parameter grid for ``--tune``, keyed by Pipeline parameter names."""
    return dict(get_head(name).grid)


def make_tuned_head(name: str, seed: int = 0, inner_folds: int = 3) -> GridSearchCV:
    """Wrap a head in a grid search over ``param_grid(name)`` (nested CV when used per outer fold).

    The inner StratifiedKFold is shuffled with ``seed``; selection is by accuracy and the best
    setting is refit. It only ever sees the data handed to ``fit`` (the outer training fold),
    so the outer test fold never influences the choice.
    """
    if inner_folds < 2:
        raise CxrError(f"inner_folds must be at least 2, got {inner_folds}")
    return GridSearchCV(
        make_head(name, seed),
        param_grid(name),
        scoring="accuracy",
        cv=StratifiedKFold(n_splits=inner_folds, shuffle=True, random_state=seed),
        refit=True,
    )


def parse_head_list(spec: str) -> list[str]:
    """Turn "all" or a comma list such as "logreg,rbfsvm" into head names (order kept, no repeats)."""
    words = [word.strip().lower() for word in spec.split(",") if word.strip()]
    if not words:
        raise CxrError(f"no heads given; use 'all' or a comma list of: {', '.join(HEAD_NAMES)}")
    if words == ["all"]:
        return list(HEAD_NAMES)
    unknown = [word for word in words if word not in HEAD_NAMES]
    if unknown:
        raise CxrError(f"unknown head(s) {', '.join(unknown)}; valid heads: all, {', '.join(HEAD_NAMES)}")
    return list(dict.fromkeys(words))
