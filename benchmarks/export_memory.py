"""Export memory and time: the peak RSS of each backbone's ONNX export, its wall time, and the exported model's
onnxruntime speed.

    python benchmarks/export_memory.py [--backbones all] [--sizes native] [--images 8] [--repeats 3]
                                       [--out docs/export_memory.json]

Each backbone is exported with random weights into an empty cache by ``get_onnx_backbone``, in a fresh
process of this script (``--one``). Peak: the ``export_peak_rss_mb`` its sidecar records (the export's own
process, extract/onnx_export.py); code that exports in-process records none, and then the peak is this fresh
process's VmHWM, which is the export's. Export seconds: the ``get_onnx_backbone`` call, process start-up
excluded. Inference: ``OnnxEmbedder`` on --images random images (batch of all of them), one warm-up, best of
--repeats, in ms per image. Also the exported graph's node count and operators, to compare exports.
Prints a Markdown table; --out writes the rows as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _vm_hwm_mb() -> int:
    """This process's peak RSS in MB (read here, not imported: the code measured may predate it)."""
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmHWM:"))


def one(name: str, size_spec: str, images: int, repeats: int) -> dict:
    """Export ``name`` in this (fresh) process's care and time the export and the ONNX model; one JSON row."""
    import numpy as np
    import onnx

    from cxr_transfer.extract.onnx_export import get_onnx_backbone
    from cxr_transfer.extract.registry import get_backbone
    from cxr_transfer.extract.runtime import OnnxEmbedder
    from cxr_transfer.extract.weights import resolve_weights

    config = get_backbone(name)
    size = config.default_input_size if size_spec == "native" else int(size_spec)
    with tempfile.TemporaryDirectory(prefix="export-memory-") as cache:
        started = time.perf_counter()
        exported = get_onnx_backbone(config, size, resolve_weights(config, random_weights=True), Path(cache))
        seconds = time.perf_counter() - started
        own_peak = _vm_hwm_mb()
        recorded = json.loads(exported.path.with_suffix(".json").read_text()).get("export_peak_rss_mb")
        model = onnx.load(str(exported.path))
        operators = Counter(node.op_type for node in model.graph.node)
        del model
        batch = np.random.default_rng(0).uniform(0, 255, size=(images, size, size, 3)).astype(np.float32)
        embedder = OnnxEmbedder(exported)
        embedder.embed(batch)
        best = float("inf")
        for _ in range(repeats):
            tick = time.perf_counter()
            embedder.embed(batch)
            best = min(best, time.perf_counter() - tick)
        return {"backbone": name, "input_size": size,
                "export_peak_rss_mb": recorded if recorded is not None else own_peak,
                "peak_from": "export process (sidecar)" if recorded is not None else "in-process export (VmHWM)",
                "export_seconds": round(seconds, 1), "onnx_mb": round(exported.path.stat().st_size / 2**20, 1),
                "max_relative_error": exported.max_relative_error, "nodes": sum(operators.values()),
                "operators": dict(operators.most_common()), "inference_ms_per_image": round(1000 * best / images, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="all")
    parser.add_argument("--sizes", default="native", help="comma list of input sizes or 'native'")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one", nargs=2, metavar=("BACKBONE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.images, args.repeats)))
        return
    from cxr_transfer.extract.registry import parse_backbone_list

    rows = []
    print("| backbone | input | export peak RSS MB | export s | ONNX MB | nodes | inference ms/img |")
    print("|---|---|---|---|---|---|---|")
    for config in parse_backbone_list(args.backbones):
        for size in args.sizes.split(","):
            done = subprocess.run([sys.executable, __file__, "--one", config.name, size, "--images", str(args.images),
                                   "--repeats", str(args.repeats)], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"| {config.name} | {size} | failed: {done.stderr.strip().splitlines()[-1:]} |", flush=True)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"| {row['backbone']} | {row['input_size']} | {row['export_peak_rss_mb']} | {row['export_seconds']} "
                  f"| {row['onnx_mb']} | {row['nodes']} | {row['inference_ms_per_image']} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
