"""onnxruntime float32 vs Keras predict with alternating passes, for rows of extract_speed.py that look close.

    python benchmarks/onnx_vs_keras.py vgg19 224 [--rounds 5] [--cache-dir DIR]

extract_speed.py times each runtime in its own block of passes; on a shared host whose speed drifts by 10-20%
within minutes, two blocks a minute apart can swap order. Here the two runtimes take turns (ORT pass, Keras
pass, five rounds, 32 random images, batch 16, random weights), so drift hits both alike; the median of the
per-round ratios is printed.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np

from cxr_transfer.extract.onnx_export import get_onnx_backbone, keras_preprocess_input
from cxr_transfer.extract.registry import get_backbone
from cxr_transfer.extract.runtime import OnnxEmbedder
from cxr_transfer.extract.weights import build_keras_backbone, resolve_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone")
    parser.add_argument("size", type=int)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cache-dir", type=Path, help="where the ONNX export is kept (default: a temporary folder)")
    args = parser.parse_args()

    config = get_backbone(args.backbone)
    source = resolve_weights(config, random_weights=True)
    images = np.random.default_rng(0).uniform(0, 255, (32, args.size, args.size, 3)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        onnx = OnnxEmbedder(get_onnx_backbone(config, args.size, source, args.cache_dir or Path(tmp)))
        model = build_keras_backbone(config, args.size, source)
        preprocess = keras_preprocess_input(config)
        runtimes = {"onnxruntime": onnx.embed,
                    "keras": lambda batch: model.predict(preprocess(batch.copy()), batch_size=16, verbose=0)}
        for run in runtimes.values():
            run(images[:16])                                    # warm-up
        rates: dict[str, list[float]] = {name: [] for name in runtimes}
        for _ in range(args.rounds):
            for name, run in runtimes.items():
                start = time.perf_counter()
                run(images[:16])
                run(images[16:])
                rates[name].append(len(images) / (time.perf_counter() - start))
    ratio = float(np.median(np.array(rates["onnxruntime"]) / np.array(rates["keras"])))
    print(f"{args.backbone} {args.size}: " + ", ".join(f"{name} {' '.join(f'{r:.1f}' for r in values)} img/s"
                                                     for name, values in rates.items())
          + f"; median onnxruntime / keras {ratio:.2f}")


if __name__ == "__main__":
    main()
