"""Wall time of the compare target: 7 heads x 2 backbones x 5-fold CV on the 336 train images, cached features.

    python benchmarks/compare_speed.py [--data ../shared/data/covid19-xray] [--backbones vgg16,xception]

Extracts first if the cache is cold (not timed), then times evaluate_compare end to end (loading the cache,
splitting, fitting, scoring; no run folder is written) and prints the total and the summed fit time per head.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from cxr_transfer.classify.compare import CompareSettings, evaluate_compare
from cxr_transfer.core.settings import BackboneSettings
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.pipeline import ExtractSettings, extract_features


def main() -> None:
    here = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=here.parent / "shared" / "data" / "covid19-xray")
    parser.add_argument("--weights-dir", default=str(here.parent / "shared" / "weights"))
    parser.add_argument("--backbones", default="vgg16,xception")
    parser.add_argument("--cache-dir", type=Path, default=here / "features")
    args = parser.parse_args()
    extract = ExtractSettings(BackboneSettings(weights_dir=args.weights_dir, cache_dir=args.cache_dir, progress=False))
    dataset = load_dataset(args.data)
    for name in args.backbones.split(","):
        extract_features(dataset, replace(extract, backbone=name))
    settings = CompareSettings(data=args.data, extract=extract, backbones=args.backbones, heads="all",
                               protocol="cv", folds=5, repeats=1)
    start = time.perf_counter()
    run = evaluate_compare(settings)
    wall = time.perf_counter() - start
    per_head: dict[str, float] = {}
    for e in run.evaluations:
        per_head[e.model] = per_head.get(e.model, 0.0) + e.fit_seconds + e.predict_seconds
    print(f"{len(run.evaluations)} fits (7 heads x {len(args.backbones.split(','))} backbones x 5 folds) "
          f"on {run.evaluations[0].n_train + run.evaluations[0].n_test} images: {wall:.1f} s wall, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    for head, seconds in sorted(per_head.items(), key=lambda kv: -kv[1]):
        print(f"  {head:7s} {seconds:6.1f} s fit+predict (summed over folds and backbones)")


if __name__ == "__main__":
    main()
