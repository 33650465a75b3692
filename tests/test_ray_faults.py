"""extract --engine ray faults: a dead address fails in one line within seconds, a local instance is not
sized beyond this machine's cores, and a run prints nothing of Ray's own on stderr unless -v.

Each test runs the command line as a user does (its own process, its own local Ray instance when one starts).
"""
from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from cxr_transfer.core.errors import CxrError
from testkit.synthetic import write_class_tree
from cxr_transfer.extract.engine import EngineSettings, check_engine

pytest.importorskip("ray")

TINY = {"backbone": "mobilenetv2", "random_weights": True, "input_size": 32, "batch_size": 4, "progress": False}
CLI_TINY = ["--backbone", "mobilenetv2", "--random-weights", "--input-size", "32", "--batch-size", "4",
            "--no-progress"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def models(tiny_exports: Path) -> Path:
    """The tiny model's ONNX export folder (conftest's, made once per session)."""
    return tiny_exports


def test_an_address_where_nothing_listens_fails_in_one_line(run_cli, class_tree: Path, tmp_path: Path):
    port = _free_port()
    started = time.monotonic()
    result = run_cli("extract", "--data", class_tree, *CLI_TINY, "--cache-dir", tmp_path / "c", "--engine", "ray",
                     "--address", f"127.0.0.1:{port}", timeout=60)
    assert result.returncode == 2
    assert result.error_line().startswith(f"error: --address 127.0.0.1:{port}: nothing answers there")
    assert time.monotonic() - started < 30


def test_more_workers_than_local_cores_are_refused_before_ray_starts(run_cli, class_tree: Path, tmp_path: Path,
                                                                       monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cores = len(os.sched_getaffinity(0))
    result = run_cli("extract", "--data", class_tree, *CLI_TINY, "--cache-dir", tmp_path / "c", "--engine", "ray",
                     "--workers", str(cores + 1), env={"RAY_ADDRESS": ""}, timeout=120)
    assert result.returncode == 2
    assert result.error_line() == (f"error: --workers {cores + 1} x --threads-per-worker 1 needs {cores + 1} CPUs, "
                                   f"but this machine has {cores} for a local Ray instance; give fewer workers or "
                                   f"threads, or --address a Ray cluster (docs/distributed.md)")
    assert not (tmp_path / "c").exists()          # refused before any export or computing
    with pytest.raises(CxrError, match=f"`threads_per_worker` {cores + 1} needs {cores + 1} CPUs"):
        check_engine(EngineSettings(name="ray", threads_per_worker=cores + 1))


def test_a_ray_run_prints_nothing_of_rays_own_on_stderr(run_cli, models: Path, tmp_path: Path):
    data = write_class_tree(tmp_path / "d", per_class=2)
    shutil.copytree(models, tmp_path / "c" / "onnx")
    result = run_cli("extract", "--data", data, *CLI_TINY, "--cache-dir", tmp_path / "c", "--engine", "ray",
                     "--workers", "1", env={"RAY_ADDRESS": ""}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 computed" in result.stdout and "a local Ray instance" in result.stdout
    assert result.stderr == "", result.stderr
