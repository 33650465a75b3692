"""Results without disk (issue 23): compare and validate compute in memory (``evaluate_*``), and write a run folder
only when asked (``write_*_run``, or ``out_dir=`` in the API); ``summary_lines()`` is what the CLI prints."""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest

import cxr_transfer
from cxr_transfer import api, cli
from cxr_transfer.classify.compare import write_compare_run
from cxr_transfer.core.errors import CxrError
from testkit.synthetic import write_class_tree
from cxr_transfer.validation.run import write_validate_run

COMMON = dict(random_weights=True, input_size=32, progress=False, n_jobs=1)
VOLATILE = {"created", "seconds", "timings", "fit_seconds", "predict_seconds", "saved_models", "computed"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("inmemory")
    found = {"tr": write_class_tree(base / "tr", per_class=10, seed=50),
             "ext": write_class_tree(base / "ext", per_class=2, seed=900)}
    shutil.copy(next((found["tr"] / "covid").iterdir()), found["tr"] / "stray.png")   # left out: no class folder
    return found


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("features")


@pytest.fixture
def quiet_disk(tmp_path, cache, monkeypatch) -> dict[str, Path]:
    """An empty working folder and an empty temporary folder, to see that nothing is written there."""
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return {"work": work, "tmp": tmp, "cache": cache}


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _stable(value):
    """``value`` without what differs between two computations of the same run (times, paths of saved heads),
    with nan as None (as results.json has it)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, (list, tuple)):
        return [_stable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_compare_in_memory_writes_nothing_and_equals_a_written_run(data, quiet_disk, tmp_path):
    options = dict(heads="logreg,knn", seeds=2, cache_dir=quiet_disk["cache"], **COMMON)
    result = cxr_transfer.compare(data["tr"], "mobilenetv2", **options)
    assert _files(quiet_disk["work"]) == [] and _files(quiet_disk["tmp"]) == []    # no runs/ anywhere
    assert result.run_dir is None and len(result.evaluations) == 2 * 2 + 2
    assert not any(line.startswith("run folder:") for line in result.summary_lines())

    written = cxr_transfer.compare(data["tr"], "mobilenetv2", out_dir=tmp_path / "out", run_name="w", **options)
    assert written.run_dir == tmp_path / "out" / "w"
    payload = _json(written.run_dir / "results.json")
    assert _stable([e["metrics"] for e in payload["evaluations"]]) == _stable([e.metrics for e in result.evaluations])
    assert _stable(payload["summary"]) == _stable(result.summary)
    assert _stable(payload["record"]) == _stable(result.record)

    later = write_compare_run(result, tmp_path / "out", "later")        # the same result, written afterwards
    assert later == result.run_dir == tmp_path / "out" / "later"
    assert _files(later) == _files(written.run_dir)
    assert _stable(_json(later / "results.json")) == _stable(payload)
    twice = write_compare_run(result, tmp_path / "out", "twice")        # the folder comes from the result alone
    for name in ("results.json", "record.json", "results.csv", "comparisons.json", "report.md"):
        assert (later / name).read_bytes() == (twice / name).read_bytes(), name
    assert result.summary_lines()[-1] == (f"run folder: {twice} (report.md, results.json, results.csv, plots, "
                                          f"record.json)")


def test_validate_in_memory_writes_nothing_and_equals_a_written_run(data, quiet_disk, tmp_path):
    options = dict(heads="logreg", folds=2, n_boot=100, subgroups="label", cache_dir=quiet_disk["cache"], **COMMON)
    result = cxr_transfer.validate(data["tr"], data["ext"], "mobilenetv2", **options)
    assert _files(quiet_disk["work"]) == [] and _files(quiet_disk["tmp"]) == []
    assert result.run_dir is None and [m.name for m in result.models] == ["mobilenetv2 + logreg"]
    assert result.fitted[0].model is None                      # nothing to save: the final head is not kept

    written = cxr_transfer.validate(data["tr"], data["ext"], "mobilenetv2", out_dir=tmp_path / "out",
                                    run_name="w", **options)
    payload = _json(written.run_dir / "results.json")
    assert _stable(payload["models"]) == _stable([m.as_dict() for m in result.models])
    assert payload["models"][0]["external"]["metrics"]["accuracy"]["value"] == \
        result.models[0].external["metrics"]["accuracy"]["value"]
    assert payload["verdict"] == result.verdict and payload["notes"] == result.notes

    later = write_validate_run(result, tmp_path / "out", "later")
    assert later == result.run_dir and _files(later) == _files(written.run_dir)
    assert _stable(_json(later / "results.json")) == _stable(payload)
    assert (later / "external_predictions.csv").read_text() == (written.run_dir / "external_predictions.csv").read_text()
    twice = write_validate_run(result, tmp_path / "out", "twice")
    for name in ("results.json", "record.json", "results.csv", "external_predictions.csv", "report.md"):
        assert (later / name).read_bytes() == (twice / name).read_bytes(), name


def test_save_explain_or_a_run_name_without_out_dir_are_refused_before_any_work(tmp_path):
    missing = tmp_path / "missing"          # never read: the refusal comes first
    with pytest.raises(CxrError, match=r"^out_dir is needed for save=True: ") as caught:
        cxr_transfer.compare(missing, "mobilenetv2", heads="logreg", save=True, **COMMON)
    assert caught.value.param == "out_dir" and "\n" not in str(caught.value)
    with pytest.raises(CxrError, match=r"^out_dir is needed for save=True and explain=2: ") as caught:
        cxr_transfer.validate(missing, missing, "mobilenetv2", save=True, explain=2, **COMMON)
    assert caught.value.param == "out_dir"
    with pytest.raises(CxrError, match=r"^out_dir is needed for run_name='x': ") as caught:
        cxr_transfer.validate(missing, missing, "mobilenetv2", run_name="x", **COMMON)
    assert caught.value.param == "out_dir"
    assert not missing.exists() and not (tmp_path / "runs").exists()


def test_summary_lines_are_what_the_cli_prints(data, quiet_disk, tmp_path, monkeypatch, capsys):
    compared = cxr_transfer.compare(data["tr"], "mobilenetv2", heads="logreg", seeds=2, out_dir=tmp_path / "out",
                                    cache_dir=quiet_disk["cache"], **COMMON)
    validated = cxr_transfer.validate(data["tr"], data["ext"], "mobilenetv2", heads="logreg", folds=2, n_boot=100,
                                      out_dir=tmp_path / "out", cache_dir=quiet_disk["cache"], **COMMON)
    assert compared.skipped and any(line.startswith("  left out stray.png") for line in compared.summary_lines())
    monkeypatch.setattr(api, "compare", lambda *args, **kwargs: compared)
    monkeypatch.setattr(api, "validate", lambda *args, **kwargs: validated)
    assert cli.main(["compare", "--data", str(data["tr"]), "--heads", "logreg"]) == 0
    assert capsys.readouterr().out.splitlines() == compared.summary_lines()
    assert cli.main(["validate", "--data", str(data["tr"]), "--external", str(data["ext"])]) == 0
    assert capsys.readouterr().out.splitlines() == validated.summary_lines()
    assert validated.summary_lines()[-1].startswith(f"run folder: {validated.run_dir} (report.md")
