"""Per-image time of an exported single-file model against the two-stage path it replaces, in one run.

    python benchmarks/export_speed.py --head RUN/vgg16-logreg.joblib --exported export/vgg16-logreg.onnx \\
        --images ../shared/data/covid19-xray --weights-dir ../shared/weights --cache-dir features [--rounds 3]

Both paths get the same decoded images (cxr-transfer's reader, the model's input size, decoded once, not timed)
and the same onnxruntime threads; sessions are opened once and warmed. Two-stage: the backbone's ONNX session
(float32 input), then the scikit-learn head's ``predict_proba``. Single file: one session of the exported model
(uint8 input). The paths alternate batch by batch within each round (ABAB, then BABA), so load from other
processes falls on both; the median over rounds of seconds per image is reported, with the largest probability
difference between the two. Writes the figures as JSON with ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import onnxruntime

from cxr_transfer.classify.saved_model import load_saved_model
from cxr_transfer.core.settings import BackboneSettings
from cxr_transfer.deploy.export_model import exported_estimator, head_backbone, read_exported
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.images import read_rgb
from cxr_transfer.extract.pipeline import ExtractSettings
from cxr_transfer.extract.runtime import OnnxEmbedder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--head", type=Path, required=True, help="the saved head (.joblib) that was exported")
    parser.add_argument("--exported", type=Path, required=True, help="the file export-model wrote from it")
    parser.add_argument("--images", type=Path, required=True, help="dataset folder whose images are timed")
    parser.add_argument("--weights-dir", default=None)
    parser.add_argument("--cache-dir", type=Path, default=Path("features"))
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="time only the first N images")
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args()

    saved = load_saved_model(args.head)
    settings = ExtractSettings(BackboneSettings(weights_dir=args.weights_dir, cache_dir=args.cache_dir,
                                                threads=args.threads, progress=False))
    part_settings, _, onnx_backbone = head_backbone(saved.info["backbones"][0], settings)
    embedder = OnnxEmbedder(onnx_backbone, args.threads)
    estimator = exported_estimator(saved.model)
    session, metadata = read_exported(args.exported, args.threads)
    size = int(json.loads(metadata["input"])["size"])

    paths = [s.path for s in load_dataset(args.images).samples][: args.limit]
    images = np.stack([read_rgb(p, size) for p in paths])
    batches = [images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size)]

    def two_stage(batch: np.ndarray) -> np.ndarray:
        return estimator.predict_proba(embedder.embed(batch))

    def single_file(batch: np.ndarray) -> np.ndarray:
        return session.run(["probabilities"], {"image": batch})[0]

    paths_timed = {"two_stage": two_stage, "single_file": single_file}
    for run in paths_timed.values():   # warm-up: first-run allocations are not timed
        run(batches[0])
    seconds = {name: [] for name in paths_timed}
    difference, same_labels = 0.0, True
    for round_index in range(args.rounds):
        order = list(paths_timed) if round_index % 2 == 0 else list(paths_timed)[::-1]
        total = dict.fromkeys(paths_timed, 0.0)
        for batch in batches:
            outputs = {}
            for name in order:
                tick = time.perf_counter()
                outputs[name] = paths_timed[name](batch)
                total[name] += time.perf_counter() - tick
            difference = max(difference, float(np.max(np.abs(outputs["two_stage"] - outputs["single_file"]))))
            same_labels &= bool(np.array_equal(outputs["two_stage"].argmax(1), outputs["single_file"].argmax(1)))
        for name in paths_timed:
            seconds[name].append(total[name] / len(images))
        print(f"round {round_index + 1}: " + ", ".join(f"{name} {total[name] / len(images) * 1000:.1f} ms/image"
                                                      for name in order))
    median = {name: float(np.median(values)) for name, values in seconds.items()}
    figures = {"images": len(images), "input_size": size, "backbone": part_settings.config.name,
               "precision": part_settings.precision, "head": metadata["head"], "batch_size": args.batch_size,
               "threads": args.threads, "rounds": args.rounds, "seconds_per_image": seconds,
               "median_ms_per_image": {k: v * 1000 for k, v in median.items()},
               "single_file_over_two_stage": median["single_file"] / median["two_stage"],
               "max_probability_difference": difference, "same_labels": same_labels,
               "cores": os.cpu_count(), "load_average": os.getloadavg()[0], "onnxruntime": onnxruntime.__version__,
               "python": platform.python_version()}
    print(f"{len(images)} images at {size} px, {part_settings.config.name} {part_settings.precision} + "
          f"{metadata['head']}: two-stage {median['two_stage'] * 1000:.1f} ms/image, single file "
          f"{median['single_file'] * 1000:.1f} ms/image (ratio {figures['single_file_over_two_stage']:.3f}); "
          f"max probability difference {difference:.2e}, same labels: {same_labels}; "
          f"load average {figures['load_average']:.2f} on {os.cpu_count()} cores")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
