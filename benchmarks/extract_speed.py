"""Extraction speed: onnxruntime vs Keras predict, end to end from files to cache, and the FLOP ceiling.

    python benchmarks/extract_speed.py [--data ../shared/data/covid19-xray] [--weights-dir ../shared/weights]
                                       [--backbones vgg16,xception] [--images 64] [--batch-size 16]

For each backbone, in one process: the same decoded images, the same batch size, timed through
onnxruntime and through Keras ``model.predict(preprocess_input(x))`` (one warm-up batch each, then the
best of --repeats passes); then the end-to-end rate (read, decode, resize, infer, write a fresh HDF5 cache)
on the whole dataset; then the ceiling = measured float32 matmul FLOP/s / the backbone's FLOPs per image.
Prints a Markdown table and writes it (with the machine) to --out as JSON.

Where OPENBLAS_CORETYPE pins numpy's OpenBLAS to an older kernel, the matmul peak (and so the ceiling)
reads low: run it as ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/extract_speed.py``;
the kernels used are recorded. Neither onnxruntime nor TensorFlow uses OpenBLAS.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np

from cxr_transfer.core.record import library_versions
from cxr_transfer.core.settings import BackboneSettings
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.images import read_rgb
from cxr_transfer.extract.onnx_export import get_onnx_backbone, keras_preprocess_input
from cxr_transfer.extract.pipeline import ExtractSettings, extract_features
from cxr_transfer.extract.registry import get_backbone
from cxr_transfer.extract.runner import OnnxEmbedder, default_threads
from cxr_transfer.extract.weights import build_keras_backbone, resolve_weights


def matmul_flops(n: int = 4096, repeats: int = 5) -> float:
    """Best float32 n x n matrix-multiply rate of numpy's BLAS, in FLOP/s."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def model_flops(model, size: int) -> float:
    """Floating-point operations of one forward pass for one image (TensorFlow's profiler, multiply+add = 2)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2_as_graph,
    )

    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec((1, size, size, 3), tf.float32))
    frozen, _ = convert_variables_to_constants_v2_as_graph(concrete)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return float(tf.compat.v1.profiler.profile(graph=frozen.graph, options=options).total_float_ops)


def rate(fn, batches: list[np.ndarray], repeats: int) -> float:
    fn(batches[0])                                             # warm-up
    best = min(_timed(lambda: [fn(b) for b in batches]) for _ in range(repeats))
    return sum(len(b) for b in batches) / best


def bench_backbone(name: str, data: Path, weights_dir: str, n_images: int, batch_size: int, repeats: int,
                   peak_flops: float, cache_root: Path) -> dict:
    config = get_backbone(name)
    size = config.default_input_size
    source = resolve_weights(config, weights_dir=weights_dir)
    dataset = load_dataset(data)
    images = np.stack([read_rgb(s.path, size) for s in dataset.samples[:n_images]])
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]

    embedder = OnnxEmbedder(get_onnx_backbone(config, size, source, cache_root))
    onnx_rate = rate(embedder.embed, batches, repeats)
    model = build_keras_backbone(config, size, source)
    preprocess = keras_preprocess_input(config)
    keras_rate = rate(lambda b: model.predict(preprocess(b.astype(np.float32)), batch_size=batch_size, verbose=0),
                      batches, repeats)
    flops = model_flops(model, size)

    settings = ExtractSettings(BackboneSettings(backbone=name, weights_dir=weights_dir, cache_dir=cache_root,
                                                progress=False), batch_size=batch_size)
    decode_time = _timed(lambda: [read_rgb(s.path, size) for s in dataset.samples])
    result = extract_features(dataset, settings)
    return {"backbone": name, "input": size, "batch": batch_size, "onnx_img_s": onnx_rate, "keras_img_s": keras_rate,
            "onnx_over_keras": onnx_rate / keras_rate, "end_to_end_img_s": result.rate,
            "end_to_end_over_onnx": result.rate / onnx_rate, "end_to_end_images": result.n_computed,
            "inference_share_of_end_to_end": result.inference_seconds / result.seconds,
            "decode_only_img_s": len(dataset) / decode_time, "gflop_per_img": flops / 1e9,
            "ceiling_img_s": peak_flops / flops, "onnx_over_ceiling": onnx_rate / (peak_flops / flops)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = Path(__file__).resolve().parent.parent
    parser.add_argument("--data", type=Path, default=here.parent / "shared" / "data" / "covid19-xray")
    parser.add_argument("--weights-dir", default=str(here.parent / "shared" / "weights"))
    parser.add_argument("--backbones", default="vgg16,xception")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=here / "docs" / "extract_speed.json")
    args = parser.parse_args()

    peak = matmul_flops()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backbones.split(","):
            rows.append(bench_backbone(name, args.data, args.weights_dir, args.images, args.batch_size,
                                       args.repeats, peak, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    from threadpoolctl import threadpool_info

    blas = [f"{i['internal_api']}:{i.get('architecture')}" for i in threadpool_info() if i["user_api"] == "blas"]
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "numpy_blas_kernels": blas, "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", ""),
               "cpus": default_threads(), "loadavg_at_end": os.getloadavg(), "matmul_gflop_s": peak / 1e9,
               "versions": library_versions()}
    print(f"\nmachine: {machine['cpus']} cores, float32 matmul {peak / 1e9:.0f} GFLOP/s ({', '.join(blas)}), "
          f"load average at end {machine['loadavg_at_end'][0]:.2f}")
    print("| backbone | input | onnxruntime img/s | Keras img/s | ratio | end-to-end img/s | e2e / onnx "
          "| inference share of e2e | decode-only img/s | GFLOP/img | ceiling img/s | onnx / ceiling |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backbone']} | {r['input']} | {r['onnx_img_s']:.1f} | {r['keras_img_s']:.1f} | "
              f"{r['onnx_over_keras']:.2f}x | {r['end_to_end_img_s']:.1f} | {r['end_to_end_over_onnx']:.0%} | "
              f"{r['inference_share_of_end_to_end']:.0%} | "
              f"{r['decode_only_img_s']:.0f} | {r['gflop_per_img']:.1f} | {r['ceiling_img_s']:.1f} | "
              f"{r['onnx_over_ceiling']:.0%} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
