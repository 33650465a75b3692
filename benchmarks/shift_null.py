"""The shift check where there is no shift, on real embeddings: TRAIN's patients split at random into a
pseudo-TRAIN and a pseudo-TARGET, many times.

    python benchmarks/shift_null.py [--data ../shared/data/covid19-xray] [--draws 20] [--target-share 0.3]

Per draw: both two-sample tests (200 permutations, as the command runs them), and a logreg head fitted on the
pseudo-TRAIN whose ATC / DoC estimates (calibrated on its out-of-fold predictions in patient-grouped folds, the
pseudo-TARGET scored by the same fold models, as the command does) are compared with its true accuracy on the
pseudo-TARGET; also with the pseudo-TARGET scored by the final head, for comparison. Prints the rejection
rate at the command's rule (either p <= alpha/2, alpha 0.05) and the mean absolute estimate error.
Embeddings come from the cache (computed first if missing).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
from threadpoolctl import threadpool_limits

from cxr_transfer.classify.heads import make_head
from cxr_transfer.core.settings import BackboneSettings
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.pipeline import ExtractSettings, load_features
from cxr_transfer.validation.accuracy_estimates import estimate_accuracy
from cxr_transfer.validation.shift import out_of_fold_with_target
from cxr_transfer.validation.two_sample import domain_classifier_test, mmd_test, prepare


def main() -> None:
    here = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=here.parent / "shared" / "data" / "covid19-xray")
    parser.add_argument("--weights-dir", default=str(here.parent / "shared" / "weights"))
    parser.add_argument("--cache-dir", type=Path, default=here / "features")
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--target-share", type=float, default=0.3)
    parser.add_argument("--alpha", type=float, default=0.05)
    args = parser.parse_args()
    extract = ExtractSettings(BackboneSettings(backbone=args.backbone, weights_dir=args.weights_dir,
                                               cache_dir=args.cache_dir, progress=False))
    features, _ = load_features(load_dataset(args.data), extract)   # the whole dataset: the cache keeps every row
    train = features.splits == "train" if (features.splits == "train").any() else np.ones(len(features.samples), bool)
    X, y, groups = features.embeddings[train], features.labels[train], features.groups[train]
    patients = np.unique(groups)
    started = time.perf_counter()
    rejected, errors, errors_final, pairs = 0, [], [], []
    for draw in range(args.draws):
        rng = np.random.default_rng(10_000 + draw)   # not the tests' own seeds
        chosen = rng.permutation(patients)[:int(round(args.target_share * len(patients)))]
        target = np.isin(groups, chosen)
        source = ~target
        pooled = prepare(X[source], X[target], groups[source], groups[target], seed=draw)
        domain = domain_classifier_test(pooled, seed=draw)
        mmd = mmd_test(pooled, seed=draw)
        rejected += min(domain.p_value, mmd.p_value) <= args.alpha / 2
        with threadpool_limits(1):
            Xs, ys, gs = X[source], y[source], groups[source]
            oof, folds = out_of_fold_with_target(make_head("logreg", draw), Xs, ys, gs, 5, draw,
                                                 features.class_names, X[target])
            proba = make_head("logreg", draw).fit(Xs, ys).predict_proba(X[target])
        truth = float(np.mean(proba.argmax(axis=1) == y[target]))
        # TARGET scored by the fold models (the command's way) and, for comparison, by the final head
        found = estimate_accuracy(oof, ys, folds.reshape(-1, folds.shape[-1]), gs,
                                  np.tile(groups[target], len(folds)), n_boot=200, seed=draw).estimates
        final = estimate_accuracy(oof, ys, proba, gs, groups[target], n_boot=200, seed=draw).estimates
        errors.append([found[m]["value"] - truth for m in ("atc_ne", "atc_mc", "doc")])
        errors_final.append([final[m]["value"] - truth for m in ("atc_ne", "atc_mc", "doc")])
        pairs.append((domain.p_value, mmd.p_value))
        print(f"draw {draw:2d}: {int(source.sum())} vs {int(target.sum())} images, domain AUC {domain.auc:.3f} "
              f"p {domain.p_value:.3f}, MMD p {mmd.p_value:.3f}; true accuracy {truth:.3f}, estimates "
              + ", ".join(f"{m} {found[m]['value']:.3f}" for m in ("atc_ne", "atc_mc", "doc")), flush=True)
    errors = np.array(errors)
    p = np.array(pairs)
    print(f"{args.draws} draws in {time.perf_counter() - started:.0f} s: shift detected in {rejected} "
          f"(rule: either p <= {args.alpha / 2:g}); domain p <= {args.alpha:g} in "
          f"{int((p[:, 0] <= args.alpha).sum())}, "
          f"MMD p <= {args.alpha:g} in {int((p[:, 1] <= args.alpha).sum())}; mean p {p[:, 0].mean():.2f} / "
          f"{p[:, 1].mean():.2f}")
    errors_final = np.array(errors_final)
    for k, method in enumerate(("atc_ne", "atc_mc", "doc")):
        print(f"  {method}: mean error {errors[:, k].mean():+.3f}, "
              f"mean absolute error {np.abs(errors[:, k]).mean():.3f}"
              f" (TARGET scored by the final head instead of the fold models: {errors_final[:, k].mean():+.3f}, "
              f"{np.abs(errors_final[:, k]).mean():.3f})")


if __name__ == "__main__":
    main()
