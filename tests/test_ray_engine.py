"""extract --engine ray: the same cache as the local engine, shards that resume, worker faults, a real cluster.

A local Ray instance with 2 CPUs serves the in-process tests (one per module); the command-line tests start
their own instance, as a user's run does; one test starts a two-node cluster on the loopback address with
`ray start` and stops exactly the processes it started. The model is a random-weight MobileNetV2 at 32 px,
exported once and copied into each test's cache folder.
"""
from __future__ import annotations

import glob
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from cxr_transfer.core.errors import CxrError
from testkit.synthetic import write_class_tree
from cxr_transfer.extract.dataset import Sample, load_dataset
from cxr_transfer.extract.engine import EngineSettings
from cxr_transfer.extract.pipeline import ExtractSettings, extract_features

TINY = {"backbone": "mobilenetv2", "random_weights": True, "input_size": 32, "batch_size": 4, "progress": False}
CLI_TINY = ["--backbone", "mobilenetv2", "--random-weights", "--input-size", "32", "--batch-size", "4",
            "--no-progress"]
COLUMNS = ("sha256", "path", "label", "split", "group")


def _settings(cache_dir: Path, engine: EngineSettings | None = None) -> ExtractSettings:
    return ExtractSettings.from_options(cache_dir=cache_dir, engine=engine or EngineSettings(), **TINY)


def _read(path: Path) -> tuple[dict[str, list], np.ndarray]:
    with h5py.File(path, "r") as handle:
        return {c: handle[c][()].tolist() for c in COLUMNS}, handle["embeddings"][()]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A cache folder holding the tiny model's ONNX export (made once by a local extraction)."""
    cache = tmp_path_factory.mktemp("models")
    extract_features(load_dataset(write_class_tree(tmp_path_factory.mktemp("warm"), per_class=1)), _settings(cache))
    return cache / "onnx"


def _cache_with_model(models: Path, folder: Path) -> Path:
    shutil.copytree(models, folder / "onnx")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """15 images and one that is not an image."""
    root = write_class_tree(tmp_path_factory.mktemp("data") / "d", per_class=5)
    (root / "covid" / "broken.png").write_bytes(b"not an image at all")
    return root


@pytest.fixture(scope="module")
def local_cache(data: Path, models: Path, tmp_path_factory) -> Path:
    """The local engine's cache file for ``data``: what the Ray engine must reproduce."""
    cache = _cache_with_model(models, tmp_path_factory.mktemp("local"))
    return extract_features(load_dataset(data), _settings(cache)).cache_path


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance with 2 CPUs for the in-process tests of this module."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, object_store_memory=150 * 2**20, include_dashboard=False,
             log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_ray_engine_writes_the_local_engines_cache(ray_local, data: Path, local_cache: Path, models: Path,
                                                    tmp_path: Path):
    cache = _cache_with_model(models, tmp_path / "ray")
    engine = EngineSettings(name="ray", workers=2, shard_size=4)
    result = extract_features(load_dataset(data), _settings(cache, engine))
    local = extract_features(load_dataset(data), _settings(local_cache.parent.parent))   # the cached summary
    assert result.cache_path.name == local_cache.name
    assert (result.n_computed, result.n_cached) == (15, 0)
    assert result.failures == local.failures and [Path(p).name for p, _ in result.failures] == ["broken.png"]
    assert "2 workers x 1 thread on 1 node, 4 shards, 0 failed" in result.summary()
    ray_columns, ray_embeddings = _read(result.cache_path)
    local_columns, local_embeddings = _read(local_cache)
    assert ray_columns == local_columns
    assert np.array_equal(ray_embeddings, local_embeddings)      # bitwise: docs/distributed.md
    assert not result.cache_path.with_name(result.cache_path.name + ".parts").exists()   # merged, parts gone
    with h5py.File(result.cache_path, "r") as handle:
        assert '"engine": "ray"' in handle.attrs["engine"]

    again = extract_features(load_dataset(data), _settings(cache, engine))   # only the unreadable file again
    assert (again.n_computed, again.n_cached, len(again.failures)) == (0, 15, 1)
    assert "1 shard, 0 failed" in again.summary()


def test_a_killed_worker_is_retried_and_the_result_is_complete(ray_local, data: Path, local_cache: Path,
                                                               models: Path, tmp_path: Path, monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setenv("CXR_RAY_TEST_FAULT", f"crash-once:1:{marker}")   # the worker process exits on shard 1
    cache = _cache_with_model(models, tmp_path / "ray")
    result = extract_features(load_dataset(data), _settings(cache, EngineSettings(name="ray", workers=2,
                                                                                  shard_size=4)))
    assert marker.exists()                      # the worker really died once
    assert result.n_computed == 15 and "0 failed" in result.summary()
    ray_columns, ray_embeddings = _read(result.cache_path)
    local_columns, local_embeddings = _read(local_cache)
    assert ray_columns == local_columns and np.array_equal(ray_embeddings, local_embeddings)


def test_a_shard_whose_worker_keeps_dying_is_named(ray_local, data: Path, models: Path, tmp_path: Path,
                                                   monkeypatch):
    monkeypatch.setenv("CXR_RAY_TEST_FAULT", "crash:0")              # shard 0 ends its worker every time
    cache = _cache_with_model(models, tmp_path / "ray")
    engine = EngineSettings(name="ray", workers=2, shard_size=4, max_retries=1)
    dataset = load_dataset(data)
    result = extract_features(dataset, _settings(cache, engine))
    first_shard = sorted(s.sha256 for s in dataset.samples)[:4]
    lost = {dataset.relative(s) for s in dataset.samples if s.sha256 in first_shard}
    named = {path for path, reason in result.failures if "shard 0's Ray worker died 2 times" in reason}
    assert named == lost
    assert result.n_computed == 16 - 4 - ("covid/broken.png" not in lost)
    assert len(result.failures) == 4 + ("covid/broken.png" not in lost)
    assert "1 failed" in result.summary()
    columns, _ = _read(result.cache_path)
    assert not set(first_shard) & {sha.decode() for sha in columns["sha256"]}


def test_shards_are_cut_by_sha256_and_named_by_their_content():
    from cxr_transfer.extract.engine_ray import make_shards

    samples = [Sample(Path(f"{i}.png"), "a", sha256=f"{sha:064x}") for i, sha in enumerate([5, 3, 9, 1, 7])]
    shards = make_shards(samples, 2)
    assert [[s.sha256[-1] for s in shard.samples] for shard in shards] == [["1", "3"], ["5", "7"], ["9"]]
    again = make_shards(list(reversed(samples)), 2)
    assert [s.name for s in shards] == [s.name for s in again] and len({s.name for s in shards}) == 3
    assert shards[0].part_name == f"part-shard-{shards[0].name}.npz"


def test_the_actor_stops_the_run_on_a_missing_model_and_fails_only_the_shard_otherwise(ray_local, data: Path,
                                                                                      models: Path, tmp_path: Path):
    from dataclasses import replace

    from cxr_transfer.extract.engine_ray import EmbedShard, make_shards
    from cxr_transfer.extract.images import ImageMask
    from cxr_transfer.extract.onnx_export import get_onnx_backbone
    from cxr_transfer.extract.registry import get_backbone
    from cxr_transfer.extract.weights import resolve_weights

    config = get_backbone("mobilenetv2")
    onnx = get_onnx_backbone(config, 32, resolve_weights(config, None, None, True), models.parent)
    (shard,) = make_shards(load_dataset(data).samples[:3], 4)       # covid/broken.png and two images
    batch = {key: np.array([value]) for key, value in shard.item().items()}

    def boom(image):
        raise RuntimeError("mask broke")

    parts = tmp_path / "parts"
    missing = EmbedShard(replace(onnx, path=tmp_path / "gone.onnx"), 4, 1, None, str(parts))(batch)
    assert missing["fatal"].tolist() == [True] and "is not on node" in missing["error"][0]
    broken = EmbedShard(onnx, 4, 1, ImageMask("boom", boom), str(parts))(batch)
    assert broken["fatal"].tolist() == [False] and broken["error"].tolist() == ["RuntimeError: mask broke"]
    fine = EmbedShard(onnx, 4, 1, None, str(parts))(batch)
    assert (fine["error"].tolist(), fine["done"].tolist()) == ([""], [2])
    (failure,) = json.loads(fine["failures"][0])
    assert failure[1].endswith("broken.png: cannot read image (UnidentifiedImageError: cannot identify image file "
                               f"'{data / 'covid' / 'broken.png'}')")
    assert [p.name for p in parts.iterdir()] == [shard.part_name]


def test_the_driver_names_the_images_of_a_failed_shard_and_stops_on_a_fatal_one():
    from cxr_transfer.extract.engine_ray import _Run, make_shards

    samples = [Sample(Path(f"/d/{i}.png"), "a", sha256=f"{i:064x}") for i in range(4)]
    shards = make_shards(samples, 2)
    run = _Run(shards, {s.sha256: s for s in samples})
    row = {"index": 1, "node": "n", "fatal": False, "error": "OSError: disk went away", "done": 0,
           "seconds": 0.0, "failures": "[]"}
    assert run.add(row) == 2
    assert run.computed.failures == [(samples[2], "/d/2.png: shard 1 failed (OSError: disk went away)"),
                                     (samples[3], "/d/3.png: shard 1 failed (OSError: disk went away)")]
    with pytest.raises(CxrError, match="no space left"):
        run.add({**row, "index": 0, "fatal": True, "error": "no space left in /d"})


# ---------------------------------------------------------------------------------------------- command line
def _group_alive(pgid: int) -> list[str]:
    """Live (not zombie) processes of a process group: the command lines of what a test started."""
    alive = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(Path(stat).with_name("cmdline").read_bytes().replace(b"\0", b" ").decode()[:80])
        except (OSError, IndexError, ValueError):
            continue
    return alive


def _end_group(pgid: int) -> None:
    """SIGKILL what is left of a process group this test started (Ray's per-node agents outlive a killed driver)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _start_cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cxr_transfer.cli", *args], cwd=cwd, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env})


def _parts(cache: Path) -> set[str]:
    return {p.name for p in cache.rglob("*.parts/part-shard-*.npz")}


def _wait_for_parts(child: subprocess.Popen, cache: Path, more_than: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while len(_parts(cache)) <= more_than:
        assert child.poll() is None, child.communicate()[1][-3000:]
        assert time.time() < deadline, "no new shard finished in time"
        time.sleep(0.2)


def test_interrupted_runs_keep_their_shards_and_the_rerun_computes_only_the_rest(models: Path, tmp_path: Path,
                                                                                 run_cli):
    pytest.importorskip("ray")
    data = write_class_tree(tmp_path / "d", per_class=4)                     # 12 images: 6 shards of 2
    cache = _cache_with_model(models, tmp_path / "cache")
    args = ["extract", "--data", str(data), *CLI_TINY, "--cache-dir", str(cache), "--engine", "ray",
            "--workers", "1", "--shard-size", "2"]
    slow = {"CXR_RAY_TEST_FAULT": "sleep:1"}

    child = _start_cli(args, tmp_path, slow)                                 # 1. Ctrl-C
    try:
        _wait_for_parts(child, cache, 0)
        deadline = time.time() + 60
        while child.poll() is None and time.time() < deadline:
            os.killpg(child.pid, signal.SIGINT)     # what a terminal's Ctrl-C sends (again, as a user would,
            time.sleep(1.0)                         # when the first arrives while Ray itself handles signals)
        _, stderr = child.communicate(timeout=60)
        assert child.returncode == 130 and "interrupted" in stderr, stderr[-3000:]
        deadline = time.time() + 15
        while _group_alive(child.pid) and time.time() < deadline:
            time.sleep(0.5)
        assert not _group_alive(child.pid)                                   # the local instance is gone
    finally:
        _end_group(child.pid)
    after_interrupt = _parts(cache)
    assert 1 <= len(after_interrupt) < 6

    child = _start_cli(args, tmp_path, slow)                                 # 2. kill -9 of the driver
    try:
        _wait_for_parts(child, cache, len(after_interrupt))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        _end_group(child.pid)
    finished = _parts(cache)
    assert after_interrupt < finished and len(finished) < 6

    done = run_cli(*args, cwd=tmp_path)                                      # 3. the rerun
    assert done.returncode == 0, done.stderr[-3000:]
    # The worker may finish the shard it was on after its driver died: at least the shards seen are cached.
    counts = re.search(r"12 images, (\d+) cached, (\d+) computed.* (\d+) shards?, 0 failed", done.stdout)
    n_cached, n_computed, n_shards = map(int, counts.groups())
    assert n_cached >= 2 * len(finished) and n_cached + n_computed == 12 and n_shards == n_computed // 2
    local = extract_features(load_dataset(data), _settings(_cache_with_model(models, tmp_path / "local")))
    (ray_file,) = cache.rglob("*.h5")
    ray_columns, ray_embeddings = _read(ray_file)
    local_columns, local_embeddings = _read(local.cache_path)
    assert ray_columns == local_columns and np.array_equal(ray_embeddings, local_embeddings)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_node_cluster_on_the_loopback_address(data: Path, local_cache: Path, models: Path, tmp_path: Path,
                                                   run_cli):
    pytest.importorskip("ray")
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="cxr-ray-", dir="/tmp")     # short: Ray's socket paths must stay short
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    start = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address=127.0.0.1",
             "--num-cpus=1", f"--object-store-memory={100 * 2**20}", f"--temp-dir={temp_dir}",
             "--disable-usage-stats"]
    nodes: list[subprocess.Popen] = []
    try:
        for extra in (["--head", f"--port={port}", "--include-dashboard=false"], [f"--address=127.0.0.1:{port}"]):
            with open(Path(temp_dir) / f"node{len(nodes)}.log", "w") as log:
                nodes.append(subprocess.Popen(start + extra + [f"--dashboard-agent-listen-port={_free_port()}"],
                                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        wait = ("import ray, sys, time\n"
                f"ray.init(address='127.0.0.1:{port}', logging_level='ERROR')\n"
                "deadline = time.time() + 90\n"
                "while ray.cluster_resources().get('CPU', 0) < 2 and time.time() < deadline:\n"
                "    time.sleep(0.5)\n"
                "print(len([n for n in ray.nodes() if n['Alive']]))\n")
        ready = subprocess.run([sys.executable, "-c", wait], env=env, capture_output=True, text=True, timeout=150,
                               check=False)
        assert ready.stdout.strip() == "2", ready.stderr[-3000:]

        cache = _cache_with_model(models, tmp_path / "cache")
        done = run_cli("extract", "--data", data, *CLI_TINY, "--cache-dir", cache, "--engine", "ray",
                       "--address", f"127.0.0.1:{port}", "--workers", "2", "--shard-size", "2",
                       env={**env, "CXR_RAY_TEST_FAULT": "sleep:0.5"}, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "16 images, 0 cached, 15 computed" in done.stdout
        assert f"the Ray cluster at 127.0.0.1:{port}, 2 workers x 1 thread on 2 nodes, 8 shards, 0 failed" \
            in done.stdout
        (ray_file,) = cache.rglob("*.h5")
        ray_columns, ray_embeddings = _read(ray_file)
        local_columns, local_embeddings = _read(local_cache)
        assert ray_columns == local_columns and np.array_equal(ray_embeddings, local_embeddings)
    finally:
        for node in reversed(nodes):                    # the worker node first, then the head
            node.send_signal(signal.SIGTERM)            # `ray start --block` stops its node's processes
            try:
                node.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            _end_group(node.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- without Ray
def test_without_ray_the_engine_says_how_to_install_it(monkeypatch, class_tree: Path, tmp_path: Path, capsys):
    import cxr_transfer
    from cxr_transfer import cli

    monkeypatch.setitem(sys.modules, "ray", None)       # `import ray` raises ImportError, as when not installed
    monkeypatch.setitem(sys.modules, "ray.data", None)
    status = cli.main(["extract", "--data", str(class_tree), *CLI_TINY, "--cache-dir", str(tmp_path / "c"),
                       "--engine", "ray"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip() == 'error: --engine ray needs Ray, which is not installed: pip install "cxr-transfer[distributed]"'
    with pytest.raises(CxrError, match=r'pip install "cxr-transfer\[distributed\]"'):
        cxr_transfer.embed_folder(class_tree, "mobilenetv2", random_weights=True, input_size=32,
                                  cache_dir=tmp_path / "c", engine="ray")
    assert not (tmp_path / "c").exists()                # refused before any work


def test_ray_flags_need_the_ray_engine_and_sane_values(class_tree: Path, tmp_path: Path, run_cli):
    refused = run_cli("extract", "--data", class_tree, *CLI_TINY, "--cache-dir", tmp_path / "c", "--workers", "2",
                      "--shard-size", "8")
    assert refused.returncode == 2
    assert refused.error_line() == ("error: --workers, --shard-size only apply to --engine ray; add --engine ray "
                                    "or leave them out")
    bad = run_cli("extract", "--data", class_tree, "--engine", "ray", "--workers", "0")
    assert bad.returncode == 2 and "--workers: must be at least 1, got 0 instead" in bad.error_line()
    with pytest.raises(CxrError, match="shard_size must be at least 1, got 0 instead"):
        EngineSettings(name="ray", shard_size=0)
    with pytest.raises(CxrError, match="engine must be one of local, ray, got 'spark' instead"):
        EngineSettings(name="spark")
