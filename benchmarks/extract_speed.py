"""Extraction speed: Keras predict, onnxruntime float32 and int8, end to end from files to cache, FLOP ceilings.

    python benchmarks/extract_speed.py [--data ../shared/data/covid19-xray] [--weights-dir ../shared/weights]
                                       [--backbones vgg16,xception] [--sizes 224,native] [--images 64]
                                       [--random-weights]   # the other seven: random weights give the speed

For each backbone and size, in one process: the same decoded images, the same batch size, timed through
onnxruntime float32, onnxruntime int8 (static QDQ, an int8 sample of 64 dataset images, as extract.quantize) and
Keras ``model.predict(preprocess_input(x))`` (one warm-up batch each, then the best of --repeats passes);
then the end-to-end rates (read, decode, resize, infer, write a fresh HDF5 cache) on the whole dataset at
both precisions; then the ceilings = measured float32 matmul FLOP/s / the backbone's FLOPs per image, and
four times that for int8 (VNNI does four int8 multiply-adds per float32 FMA).
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
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np

from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.record import library_versions
from cxr_transfer.core.settings import BackboneSettings
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.images import read_rgb
from cxr_transfer.extract.onnx_export import get_onnx_backbone, keras_preprocess_input
from cxr_transfer.extract.pipeline import ExtractSettings, cache_file, extract_features
from cxr_transfer.extract.registry import get_backbone
from cxr_transfer.extract.runtime import OnnxEmbedder, default_threads
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
                   peak_flops: float, cache_root: Path, size: int | None = None, random_weights: bool = False,
                   end_to_end: bool = True, end_to_end_repeats: int = 3) -> dict:
    """Keras, onnxruntime float32 and onnxruntime int8 on the same decoded images, in this one process."""
    from cxr_transfer.extract.quantize import (
        FIDELITY_MIN_COSINE,
        _quantize,
        choose_int8_sample,
        cosine_rows,
        get_int8_backbone,
    )

    config = get_backbone(name)
    size = size or config.default_input_size
    source = resolve_weights(config, weights_dir=None if random_weights else weights_dir,
                             random_weights=random_weights)
    dataset = load_dataset(data)
    images = np.stack([read_rgb(s.path, size) for s in dataset.samples[:n_images]])
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]

    float_backbone = get_onnx_backbone(config, size, source, cache_root)
    embedder = OnnxEmbedder(float_backbone)
    onnx_rate = rate(embedder.embed, batches, repeats)
    sample = choose_int8_sample(dataset.samples, 64)
    sample_images = np.stack([read_rgb(s.path, size) for s in sample.images]).astype(np.float32)
    int8_path = cache_root / f"{name}-{size}-bench-int8.onnx"
    _quantize(float_backbone.path, sample_images, int8_path, config.int8_statistics, config.int8_float_convs,
              config.int8_bias_correction)
    int8 = OnnxEmbedder(replace(float_backbone, path=int8_path))
    int8_rate = rate(int8.embed, batches, repeats)
    cosine = cosine_rows(embedder.embed(images[:16]), int8.embed(images[:16]))
    held = np.stack([read_rgb(s.path, size) for s in sample.held_back])
    gate = cosine_rows(embedder.embed(held), int8.embed(held))    # the fidelity gate's own images and rule
    model = build_keras_backbone(config, size, source)
    preprocess = keras_preprocess_input(config)
    keras_rate = rate(lambda b: model.predict(preprocess(b.astype(np.float32)), batch_size=batch_size, verbose=0),
                      batches, repeats)
    flops = model_flops(model, size)
    row = {"backbone": name, "input": size, "batch": batch_size, "weights": source.kind,
           "onnx_img_s": onnx_rate, "int8_img_s": int8_rate, "keras_img_s": keras_rate,
           "onnx_over_keras": onnx_rate / keras_rate, "int8_over_onnx": int8_rate / onnx_rate,
           "int8_min_cosine": float(cosine.min()), "int8_gate_min_cosine": float(gate.min()),
           "int8_gate": "passed" if gate.min() >= FIDELITY_MIN_COSINE else
           f"refused (min cosine {gate.min():.4f} < {FIDELITY_MIN_COSINE} on {len(held)} held-back images; "
           f"timed anyway)",
           "gflop_per_img": flops / 1e9,
           "ceiling_img_s": peak_flops / flops, "int8_ceiling_img_s": 4 * peak_flops / flops,
           "onnx_over_ceiling": onnx_rate / (peak_flops / flops),
           "int8_over_ceiling": int8_rate / (4 * peak_flops / flops)}
    if end_to_end:
        try:   # the int8 model in the cache before timing: end to end = read, decode, infer, write
            get_int8_backbone(float_backbone, sample, cache_root)
        except CxrError:
            pass                        # refused by the fidelity gate: recorded below
        for precision, runner in (("float32", embedder), ("int8", int8)):
            settings = ExtractSettings(BackboneSettings(backbone=name, weights_dir=weights_dir,
                                                        random_weights=random_weights, input_size=size,
                                                        cache_dir=cache_root, progress=False,
                                                        precision=precision), batch_size=batch_size)
            # This machine's speed drifts by 10-20% within minutes (shared host): each end-to-end run is set
            # against inference-only timed right before and right after it, and the run is repeated; the
            # median ratio is reported, every run is kept in the JSON.
            runs = []
            for _ in range(end_to_end_repeats):
                cache_file(dataset, settings, source.sha256,
                           sample.digest if precision == "int8" else None).unlink(missing_ok=True)
                before = rate(runner.embed, batches, 1)
                try:
                    result = extract_features(dataset, settings)
                except CxrError as exc:          # the int8 fidelity gate refused this backbone
                    row[f"{precision}_end_to_end"] = f"refused: {exc}"
                    break
                inference_only = (before + rate(runner.embed, batches, 1)) / 2
                runs.append({"end_to_end_img_s": result.rate, "inference_around_img_s": inference_only,
                             "ratio": result.rate / inference_only,
                             "network_busy": result.inference_seconds / result.seconds})
            if runs:
                row[f"{precision}_end_to_end_runs"] = runs
                row[f"{precision}_end_to_end_img_s"] = float(np.median([r["end_to_end_img_s"] for r in runs]))
                row[f"{precision}_end_to_end_over_inference"] = float(np.median([r["ratio"] for r in runs]))
    return row


def markdown_table(rows: list[dict]) -> str:
    """The rows as the Markdown table of docs/benchmarks.md."""
    header = ("| backbone | input | GFLOP/img | Keras img/s | ORT float32 img/s | ORT int8 img/s | ORT / Keras "
              "| int8 / float32 | float32 ceiling | int8 ceiling | float32 / ceiling | int8 / ceiling | int8 gate "
              "| e2e float32 / inference | e2e int8 / inference |")
    lines = [header, "|" + "---|" * 15]
    for r in rows:
        e2e = [f"{r[k]:.0%}" if k in r else "-" for k in ("float32_end_to_end_over_inference",
                                                          "int8_end_to_end_over_inference")]
        gate = r.get("int8_gate", "-")
        gate = f"refused ({r['int8_gate_min_cosine']:.3f})" if gate.startswith("refused") else gate
        lines.append(f"| {r['backbone']} | {r['input']} | {r['gflop_per_img']:.1f} | {r['keras_img_s']:.1f} | "
                     f"{r['onnx_img_s']:.1f} | {r['int8_img_s']:.1f} | {r['onnx_over_keras']:.2f}x | "
                     f"{r['int8_over_onnx']:.2f}x | {r['ceiling_img_s']:.1f} | {r['int8_ceiling_img_s']:.1f} | "
                     f"{r['onnx_over_ceiling']:.0%} | {r['int8_over_ceiling']:.0%} | {gate} | "
                     f"{e2e[0]} | {e2e[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = Path(__file__).resolve().parent.parent
    parser.add_argument("--data", type=Path, default=here.parent / "shared" / "data" / "covid19-xray")
    parser.add_argument("--weights-dir", default=str(here.parent / "shared" / "weights"))
    parser.add_argument("--backbones", default="vgg16,xception")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="native", help="comma list of input sizes; 'native' = the backbone's own")
    parser.add_argument("--random-weights", action="store_true", help="random weights (speed only)")
    parser.add_argument("--no-end-to-end", action="store_true", help="skip the file-to-cache runs")
    parser.add_argument("--end-to-end-repeats", type=int, default=3,
                        help="end-to-end runs per precision (the median ratio to inference-only is reported)")
    parser.add_argument("--out", type=Path, default=here / "docs" / "extract_speed.json")
    parser.add_argument("--cache-dir", type=Path, help="keep the exports here (default: a temporary folder); "
                        "end-to-end runs still start from an empty embeddings cache")
    args = parser.parse_args()

    peak = matmul_flops()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache_root = args.cache_dir or Path(tmp)
        for name in args.backbones.split(","):
            native = get_backbone(name).default_input_size
            sizes = dict.fromkeys(native if size == "native" else int(size) for size in args.sizes.split(","))
            for size in sizes:        # "224,native" is one size for the 224 px backbones
                rows.append(bench_backbone(name, args.data, args.weights_dir, args.images, args.batch_size,
                                           args.repeats, peak, cache_root, size, args.random_weights,
                                           not args.no_end_to_end, args.end_to_end_repeats))
                print(json.dumps(rows[-1]), flush=True)
    from threadpoolctl import threadpool_info

    blas = [f"{i['internal_api']}:{i.get('architecture')}" for i in threadpool_info() if i["user_api"] == "blas"]
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "numpy_blas_kernels": blas, "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", ""),
               "cpus": default_threads(), "loadavg_at_end": os.getloadavg(), "matmul_gflop_s": peak / 1e9,
               "versions": library_versions()}
    print(f"\nmachine: {machine['cpus']} cores, float32 matmul {peak / 1e9:.0f} GFLOP/s ({', '.join(blas)}), "
          f"load average at end {machine['loadavg_at_end'][0]:.2f}")
    print(markdown_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
