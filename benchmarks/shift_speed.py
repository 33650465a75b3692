"""Wall time of the shift check for 1,000 target images on cached embeddings (issue 25: under a minute, 2 cores).

    python benchmarks/shift_speed.py --model runs/RUN/vgg16-logreg.joblib [--data ../shared/data/covid19-xray]
        [--n 1000] [--target-dir /tmp/shift-bench-target] [--cache-dir features]

Writes N target images made from the dataset's own images (random crop of 85-100 %, brightness and contrast
jitter, half of them mirrored; class folders kept), embeds them once into the cache (not timed), then times
``evaluate_shift`` end to end (loading both caches, groups, both permutation tests, the head's out-of-fold
refit, ATC/DoC with their bootstrap; no run folder) and prints the total and each stage's seconds.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from cxr_transfer.core.settings import BackboneSettings
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.pipeline import ExtractSettings
from cxr_transfer.validation.shift import ShiftSettings, evaluate_shift


def write_target(data: Path, out: Path, n: int, seed: int = 0) -> Path:
    """N jittered copies of the dataset's images under out/<class>/ (kept when already complete)."""
    if out.is_dir() and sum(1 for _ in out.rglob("*.png")) == n:
        return out
    rng = np.random.default_rng(seed)
    samples = load_dataset(data).samples
    for k in range(n):
        sample = samples[rng.integers(len(samples))]
        with Image.open(sample.path) as image:
            image = image.convert("L")
            w, h = image.size
            f = rng.uniform(0.85, 1.0)
            x, y = rng.integers(0, int(w * (1 - f)) + 1), rng.integers(0, int(h * (1 - f)) + 1)
            image = image.crop((x, y, x + int(w * f), y + int(h * f))).resize((256, 256))
            image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
            image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.2))
            if k % 2:
                image = ImageOps.mirror(image)
            (out / sample.label).mkdir(parents=True, exist_ok=True)
            image.save(out / sample.label / f"t{k:05d}.png")
    return out


def main() -> None:
    here = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=here.parent / "shared" / "data" / "covid19-xray")
    parser.add_argument("--weights-dir", default=str(here.parent / "shared" / "weights"))
    parser.add_argument("--model", type=Path, default=None, help="a saved head (adds the accuracy estimates)")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--target-dir", type=Path, default=Path("/tmp/shift-bench-target"))
    parser.add_argument("--cache-dir", type=Path, default=here / "features")
    args = parser.parse_args()
    target = write_target(args.data, args.target_dir, args.n)
    extract = ExtractSettings(BackboneSettings(weights_dir=args.weights_dir, cache_dir=args.cache_dir, progress=False))
    settings = ShiftSettings(data=args.data, target=target, extract=extract, model=args.model,
                             subgroups="label")
    evaluate_shift(settings)                         # fills the cache (not timed)
    start = time.perf_counter()
    result = evaluate_shift(settings)
    wall = time.perf_counter() - start
    r = result.results
    print(f"shift check, {r['n_target']} target vs {r['n_train']} TRAIN images, {r['permutations']} permutations per "
          f"test{', with ' + str(args.model) if args.model else ''}: {wall:.1f} s wall, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}")
    for stage, seconds in result.record["timings"].items():
        print(f"  {stage:20s} {seconds:6.2f} s")
    print(f"domain AUC {r['domain_auc']:.3f} (p {r['domain_p']:.3f}), MMD p {r['mmd_p']:.3f}, "
          f"shift detected: {r['shift_detected']}")


if __name__ == "__main__":
    main()
