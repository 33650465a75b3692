"""Shared fixtures: synthetic datasets, ../shared when it is beside the repository."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from testkit.synthetic import write_class_tree

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data" / "covid19-xray"
SHARED_WEIGHTS = SHARED / "weights"


def _project_python_files() -> list[Path]:
    """The project's own .py files under ROOT: not .git, build outputs, caches, run folders, or any virtual
    environment (a folder holding pyvenv.cfg, e.g. the .venv that .ci/run creates inside the checkout)."""
    skipped = {".git", "build", "dist", "features", "runs", "__pycache__"}
    found: list[Path] = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = sorted(d for d in subfolders if d not in skipped and not d.endswith(".egg-info")
                               and not (Path(folder, d) / "pyvenv.cfg").exists())
        found += [Path(folder, name) for name in sorted(files) if name.endswith(".py")]
    return found


@pytest.fixture(scope="session")
def project_python_files() -> list[Path]:
    return _project_python_files()


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory) -> Path:
    """The ONNX export folder of mobilenetv2 with random weights at 32 px, made once by a local extraction:
    tests copy it into their own cache folder to skip the export."""
    from cxr_transfer.extract.dataset import load_dataset
    from cxr_transfer.extract.pipeline import ExtractSettings, extract_features

    cache = tmp_path_factory.mktemp("tiny-exports")
    extract_features(load_dataset(write_class_tree(tmp_path_factory.mktemp("warm"), per_class=1)),
                     ExtractSettings.from_options(cache_dir=cache, backbone="mobilenetv2", random_weights=True,
                                                  input_size=32, progress=False))
    return cache / "onnx"


@pytest.fixture
def class_tree(tmp_path: Path) -> Path:
    return write_class_tree(tmp_path / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data/covid19-xray is not beside the repository")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_weights() -> Path:
    if not (SHARED_WEIGHTS / "vgg16_imagenet_notop.weights.h5").is_file():
        pytest.skip("../shared/weights is not beside the repository")
    return SHARED_WEIGHTS


@dataclass
class CliResult:
    """What one command-line run did: exit status and its two output streams."""

    returncode: int
    stdout: str
    stderr: str

    def error_line(self) -> str:
        """The single ``error: ...`` line of a refused run (asserts there is exactly one and no traceback)."""
        assert "Traceback" not in self.stderr, self.stderr[-3000:]
        lines = [line for line in self.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, self.stderr[-3000:]
        return lines[0]


@pytest.fixture
def run_cli(tmp_path: Path):
    """Run ``python -m cxr_transfer.cli ARGS`` in a subprocess (cwd: tmp_path unless given); returns a CliResult.

    The command line as a user meets it: real argument parsing, real exit status, real stderr.
    """
    def run(*args: str | Path, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> CliResult:
        done = subprocess.run([sys.executable, "-m", "cxr_transfer.cli", *map(str, args)], capture_output=True,
                              text=True, encoding="utf-8", errors="replace", cwd=cwd or tmp_path, timeout=timeout,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})
        return CliResult(done.returncode, done.stdout, done.stderr)

    return run


@contextlib.contextmanager
def _read_only(folder: Path):
    """Make ``folder`` unwritable, for root too (immutable attribute) or by its mode bits."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)],
                                                            check=False, capture_output=True).returncode != 0:
            pytest.skip("running as root on a file system without chattr +i: cannot make a folder read-only")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(mode)


@pytest.fixture
def read_only():
    """``with read_only(folder):`` makes the folder unwritable inside the block (see ``_read_only``)."""
    return _read_only
