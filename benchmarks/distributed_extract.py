"""Extraction on Ray vs the local engine: img/s, the driver's peak memory, Ray's start-up overhead.

    python benchmarks/distributed_extract.py [--data ../shared/data/covid19-xray] [--images 2000]
        [--backbone vgg16] [--input-size 64] [--weights-dir ../shared/weights | --random-weights]
        [--workers 1,2] [--threads-per-worker 1] [--out docs/distributed_extract.json]

The dataset is the shared set repeated to ``--images`` files in a temporary folder; each copy is made unique by
a few bytes appended after the image's end (decoders ignore them, the sha256 differs), so a copy costs what its
original costs to read and decode. Every run is a fresh process, as a user's command is, from an empty feature
cache with the ONNX export made beforehand and copied in: the local engine, then ``--engine ray`` on a new local
Ray instance with each ``--workers`` count. Reported per run: img/s over the whole extraction (Ray's start-up
included, as the command's summary line counts it), the driver process's peak RSS (VmHWM of that process alone:
Ray's own processes and the workers are not in it; ``ru_maxrss`` would not do, Linux carries it over from the
parent process), the seconds to connect (start the local instance) and to the first finished shard. Ray's
start-up overhead is measured on its own: the wall time of the whole command on a 2-image folder, ray minus
local.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from cxr_transfer.core.record import library_versions

_RUN = """
import json, sys
from pathlib import Path
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.engine import EngineSettings
from cxr_transfer.extract.pipeline import ExtractSettings, extract_features
options = json.loads(sys.argv[1])
engine = EngineSettings(**options.pop("engine"))
settings = ExtractSettings.from_options(engine=engine, progress=False, **options.pop("extract"))
result = extract_features(load_dataset(options["data"]), settings)
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
print(json.dumps({"seconds": result.seconds, "computed": result.n_computed, "skipped": len(result.failures),
                  "note": result.engine_note, "cache": str(result.cache_path),
                  "driver_peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024}))
"""


def repeat_dataset(source: Path, dest: Path, n_images: int) -> Path:
    """``n_images`` files: the source's images cycled, copy k of a file with b"cxr-copy-k" after its end."""
    originals = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for k in range(n_images):
        original = originals[k % len(originals)]
        label = original.parent.name
        target = dest / label / f"{k:06d}-{original.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(original.read_bytes() + f"cxr-copy-{k}".encode())
    return dest


def run(data: Path, cache: Path, extract: dict, engine: dict) -> dict:
    """One extraction in a fresh process; adds the whole command's wall time."""
    options = json.dumps({"data": str(data), "extract": {**extract, "cache_dir": str(cache)}, "engine": engine})
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _RUN, options], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"run failed ({engine}):\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall": wall}


def fresh_cache(models: Path, folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(models / "onnx", folder / "onnx")
    return folder


def _ray_version() -> str:
    import ray

    return ray.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/covid19-xray"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--weights-dir", default="../shared/weights")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("docs/distributed_extract.json"))
    args = parser.parse_args()

    extract = {"backbone": args.backbone, "input_size": args.input_size, "batch_size": 16}
    extract.update({"random_weights": True} if args.random_weights else {"weights_dir": args.weights_dir})
    with tempfile.TemporaryDirectory(prefix="cxr-dist-bench-") as tmp:
        tmp = Path(tmp)
        data = repeat_dataset(args.data, tmp / "data", args.images)
        tiny = repeat_dataset(args.data, tmp / "tiny", 2)
        models = tmp / "models"        # the ONNX export, made once, outside every timing
        run(tiny, models, extract, {})
        load_before = os.getloadavg()
        ray = {"name": "ray", "threads_per_worker": args.threads_per_worker, "shard_size": args.shard_size}
        runs = {"local": run(data, fresh_cache(models, tmp / "c-local"), extract, {})}
        for workers in [int(w) for w in args.workers.split(",")]:
            runs[f"ray x{workers}"] = run(data, fresh_cache(models, tmp / f"c-ray{workers}"), extract,
                                          {**ray, "workers": workers})
        tiny_local = run(tiny, fresh_cache(models, tmp / "t-local"), extract, {})
        tiny_ray = run(tiny, fresh_cache(models, tmp / "t-ray"), extract, {**ray, "workers": 1})
        load_after = os.getloadavg()

    rows = []
    for name, r in runs.items():
        rows.append({"engine": name, "images": r["computed"], "seconds": round(r["seconds"], 1),
                     "img_per_s": round(r["computed"] / r["seconds"], 1), "wall": round(r["wall"], 1),
                     "driver_peak_rss_mb": round(r["driver_peak_rss_mb"]), "note": r["note"]})
    overhead = {"local_wall_2_images": round(tiny_local["wall"], 1), "ray_wall_2_images": round(tiny_ray["wall"], 1),
                "ray_startup_overhead_s": round(tiny_ray["wall"] - tiny_local["wall"], 1), "ray_note": tiny_ray["note"]}
    print("| engine | images | img/s (whole extraction) | extraction s | command wall s | driver peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['engine']} | {row['images']} | {row['img_per_s']} | {row['seconds']} | {row['wall']} | "
              f"{row['driver_peak_rss_mb']} |")
    print(f"\nRay start-up overhead (2 images, whole command, ray - local): {overhead['ray_startup_overhead_s']} s "
          f"({overhead['ray_wall_2_images']} s vs {overhead['local_wall_2_images']} s); {overhead['ray_note']}")
    for row in rows:
        if row["note"]:
            print(f"{row['engine']}: {row['note']}")
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": rows, "startup": overhead,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_before": load_before, "load_after": load_after},
              "versions": {**library_versions(), "ray": _ray_version()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
