"""Faults a tester found in run folders: a full --out disk (A: raw traceback, a .joblib.tmp and the in-progress
marker left behind, the name blocked) and the name of an interrupted run that could not be used again (B)."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cxr_transfer.classify.saved_model as saved_model_module
from cxr_transfer.classify.compare import CompareSettings, run_compare
from cxr_transfer.validation.run import ValidateSettings, run_validate
from cxr_transfer.core import outputs
from cxr_transfer.core.errors import CxrError
from testkit.synthetic import write_class_tree
from cxr_transfer.extract.pipeline import ExtractSettings


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("runfaults")
    return {"tr": write_class_tree(base / "tr", per_class=10, seed=50),
            "ext": write_class_tree(base / "ext", per_class=2, seed=900)}


@pytest.fixture(scope="module")
def extract(tmp_path_factory) -> ExtractSettings:
    return ExtractSettings.from_options(backbone="mobilenetv2", random_weights=True, input_size=32, progress=False,
                                        cache_dir=tmp_path_factory.mktemp("features"))


def _validate(data, extract, **options) -> ValidateSettings:
    return ValidateSettings(data=data["tr"], external=data["ext"], extract=extract, backbones="mobilenetv2",
                            heads="logreg", n_boot=100, folds=2, n_jobs=1, **options)


def _compare(data, extract, **options) -> CompareSettings:
    return CompareSettings(data=data["tr"], extract=extract, backbones="mobilenetv2", heads="logreg", seeds=2,
                           n_jobs=1, **options)


def _full_disk_in_joblib_dump(monkeypatch):
    """joblib.dump writes part of the head, then the disk is full (as on a 3 MB tmpfs)."""
    def dump(value, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(saved_model_module.joblib, "dump", dump)


def _full_disk_in_json(monkeypatch):
    """No byte free: the first JSON file of the run (the in-progress marker) cannot be written."""
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name.endswith(".json.tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def _left(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []


@pytest.mark.parametrize("command", ["validate", "compare"])
@pytest.mark.parametrize("fault", [_full_disk_in_joblib_dump, _full_disk_in_json])
def test_full_out_disk_is_one_error_leaves_nothing_and_frees_the_name(data, extract, tmp_path, monkeypatch,
                                                                       command, fault):
    out = tmp_path / "runs"
    make, run = (_validate, run_validate) if command == "validate" else (_compare, run_compare)
    fault(monkeypatch)
    with pytest.raises(CxrError, match=rf"^no space left in {out}: .*free some space \(or use another `out_dir`\)"
                       ) as caught:
        run(make(data, extract, save=True), out, "f1")
    assert "\n" not in str(caught.value)
    assert not [name for name in _left(out) if name.endswith(".tmp") or outputs.IN_PROGRESS_MARKER in name]
    monkeypatch.undo()
    done = run(make(data, extract, save=True), out, "f1")   # the same --name is free again
    assert (done.run_dir / "record.json").is_file() and not (done.run_dir / outputs.IN_PROGRESS_MARKER).exists()


def test_interrupted_run_name_is_reused_and_said_once(data, extract, tmp_path, caplog):
    out = tmp_path / "runs"
    old = out / "f1"
    old.mkdir(parents=True)
    (old / outputs.IN_PROGRESS_MARKER).write_text(json.dumps({"command": "validate", "pid": 999999999,
                                                              "started": "2026-12-04T00:00:00+00:00"}))
    (old / "results.json").write_text("{}")
    (old / "stale-head.joblib").write_bytes(b"x")
    run = run_validate(_validate(data, extract), out, "f1")
    assert run.run_dir == old and not (old / "stale-head.joblib").exists()
    assert json.loads((old / "results.json").read_text())["kind"] == "validate"
    said = [r.getMessage() for r in caplog.records if "interrupted run" in r.getMessage()]
    assert len(said) == 1 and str(old) in said[0]


_HOLD = """
import sys, time
from cxr_transfer.core.outputs import run_in_progress
with run_in_progress(sys.argv[1], "compare"):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_run_still_in_progress_elsewhere_is_refused_then_free_once_killed(tmp_path):
    run_dir = tmp_path / "runs" / "busy"
    run_dir.mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "holding"
        with pytest.raises(CxrError, match=rf"^{run_dir}: a run is still writing this folder \(pid {child.pid}\)"):
            outputs.check_run_name(tmp_path / "runs", "busy")
        (run_dir / "results.json").write_text("{}")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    deadline = time.monotonic() + 10
    assert (run_dir / outputs.IN_PROGRESS_MARKER).is_file()          # killed: the marker stays
    while True:   # the kernel drops the dead child's lock at once; poll briefly all the same
        try:
            assert outputs.check_run_name(tmp_path / "runs", "busy") == run_dir
            break
        except CxrError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert list(run_dir.iterdir()) == []


def test_finished_run_is_still_refused(tmp_path):
    done = tmp_path / "runs" / "done"
    done.mkdir(parents=True)
    (done / "results.json").write_text("{}")
    with pytest.raises(CxrError, match=r"already holds a finished run \(results\.json\); give another `run_name`"):
        outputs.check_run_name(tmp_path / "runs", "done")
