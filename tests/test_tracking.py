"""MLflow tracking (``--mlflow``): runs read back from a real sqlite store and a real ``mlflow server``, saved
heads as pyfunc models that predict, and a run that is never lost when MLflow fails. Random-weight MobileNetV2
at 32 px on tiny synthetic images."""
from __future__ import annotations

import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import cxr_transfer
from cxr_transfer import cli
from cxr_transfer.classify.saved_model import load_head
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.settings import BackboneSettings
from cxr_transfer.extract.pipeline import ExtractSettings
from cxr_transfer.tracking import mlflow_runs
from cxr_transfer.tracking.pyfunc_model import HeadFile, log_head_model
from testkit.synthetic import write_class_tree

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

TINY = dict(random_weights=True, input_size=32, progress=False, n_jobs=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_exports: Path) -> Path:
    base = tmp_path_factory.mktemp("tracking")
    shutil.copytree(tiny_exports, base / "cache" / "onnx")   # skip the backbone's export
    write_class_tree(base / "xrays", per_class=8, splits=("train", "test"), size=48)
    return base


def _compare(base: Path, out: Path, **kw):
    return cxr_transfer.compare(base / "xrays", "mobilenetv2", heads="logreg,knn", protocol="paper", seeds=2,
                                out_dir=out, cache_dir=base / "cache", **TINY, **kw)


def _runs(uri: str, experiment: str) -> tuple[object, list]:
    """(parent run, child runs) of the one parent run in ``experiment``."""
    client = MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in found]
    return parents[0], [r for r in found if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]


def test_compare_logs_a_parent_run_its_child_runs_and_saved_heads_as_models(base, tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'm.db'}"   # its folder is made
    result = _compare(base, tmp_path / "runs", save=True, mlflow=uri)
    assert result.tracking and result.tracking[-1].startswith("mlflow: run ")
    assert "experiment 'xrays'" in result.summary_lines()[-1] and "2 model(s)" in result.tracking[-1]
    parent, children = _runs(uri, "xrays")   # default experiment: the dataset folder's name
    assert parent.info.status == "FINISHED"
    params = parent.data.params
    assert (params["protocol"], params["seeds"], params["backbone"], params["precision"], params["input_size"]) == \
        ("paper", "2", "mobilenetv2", "float32", "32")
    assert params["data_fingerprint"] == result.record["dataset_fingerprint"]
    assert params["project_version"] == cxr_transfer.__version__
    assert (params["settings.heads"], params["settings.extract.random_weights"]) == ("logreg,knn", "True")
    client = MlflowClient(uri)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "results.json", "record.json", "mobilenetv2-logreg.joblib"} <= artifacts
    assert (tmp_path / "store" / "mlartifacts" / "xrays").is_dir()   # beside the database, not ./mlruns
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == {"mobilenetv2 + logreg", "mobilenetv2 + knn", "mobilenetv2 + selected"}
    summary = {row["model"]: row for row in result.summary}
    for head in ("logreg", "knn"):
        metrics = by_name[f"mobilenetv2 + {head}"].data.metrics
        assert metrics["accuracy"] == pytest.approx(summary[head]["accuracy"]["mean"])
        assert metrics["accuracy_ci_low"] <= metrics["accuracy"] <= metrics["accuracy_ci_high"]
        assert {"macro_f1_mean", "macro_f1_std", "covid_sensitivity_mean", "roc_auc_macro_ci_high"} <= set(metrics)
        history = client.get_metric_history(by_name[f"mobilenetv2 + {head}"].info.run_id, "split_accuracy")
        split_values = [e.metrics["accuracy"] for e in result.evaluations if e.model == head]
        assert [m.step for m in history] == [0, 1]
        assert [m.value for m in history] == pytest.approx(split_values)

    # the saved head as a pyfunc model: loaded back, it predicts what embed_images + the head give
    child = by_name["mobilenetv2 + logreg"].info.run_id
    local = client.download_artifacts(child, "models/mobilenetv2-logreg", str(tmp_path / "model"))
    model = mlflow.pyfunc.load_model(local)
    assert model.metadata.get_input_schema().inputs[0].type == np.dtype(np.uint8)
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    predicted = model.predict(images)
    head, info = load_head(result.run_dir / "mobilenetv2-logreg.joblib")
    expected = head.predict_proba(cxr_transfer.embed_images(images, "mobilenetv2", random_weights=True,
                                                            input_size=32, cache_dir=base / "cache"))
    assert list(predicted.columns) == info["class_names"]
    np.testing.assert_allclose(predicted.to_numpy(), expected, rtol=1e-5, atol=1e-6)
    assert (Path(local) / "input_example.json").is_file() or any(Path(local).glob("*example*"))
    with pytest.raises(Exception, match="uint8|dtype|type"):   # the signature: uint8 pixels only
        model.predict(images.astype(np.float64))
    assert {a.path for a in client.list_artifacts(child, "models/mobilenetv2-logreg/artifacts")} == {
        "models/mobilenetv2-logreg/artifacts/mobilenetv2-logreg.onnx",   # the single file of export-model
        "models/mobilenetv2-logreg/artifacts/mobilenetv2-logreg.model-card.md"}
    settings = ExtractSettings(BackboneSettings(random_weights=True, cache_dir=base / "cache"))
    gone = HeadFile(result.run_dir / "missing.joblib", settings)   # a head export-model refuses: the reason
    assert log_head_model(client, child, gone) == f"{gone.path}: no such model file"


def test_validate_logs_internal_and_external_values_ece_and_coverage(base, tmp_path):
    train = base / "xrays"
    ext = write_class_tree(tmp_path / "ext", per_class=4, seed=500)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    result = cxr_transfer.validate(train, ext, "mobilenetv2", heads="logreg", folds=3, n_boot=200,
                                   out_dir=tmp_path / "runs", cache_dir=base / "cache", mlflow=uri,
                                   experiment="external checks", save=True, **TINY)
    assert result.tracking[-1].startswith("mlflow: run ") and "1 child run(s), 1 model(s)" in result.tracking[-1]
    parent, (child,) = _runs(uri, "external checks")
    assert parent.data.params["external_fingerprint"] == result.record["external_fingerprint"]
    (model,) = result.models
    metrics = child.data.metrics
    assert metrics["internal_accuracy"] == pytest.approx(model.internal["metrics"]["accuracy"]["value"])
    assert metrics["external_accuracy"] == pytest.approx(model.external["metrics"]["accuracy"]["value"])
    assert {"internal_accuracy_ci_low", "external_accuracy_ci_high", "gap_accuracy", "internal_ece",
            "external_ece", "internal_coverage", "external_coverage", "external_mean_set_size"} <= set(metrics)
    assert metrics["external_coverage"] == pytest.approx(model.conformal["external"]["coverage"])
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id)}
    assert {"report.md", "external_predictions.csv"} <= artifacts
    model = mlflow.pyfunc.load_model(MlflowClient(uri).download_artifacts(
        child.info.run_id, "models/mobilenetv2-logreg", str(tmp_path / "model")))   # a head with its conformal part
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(model.predict(images).sum(axis=1), 1.0, rtol=1e-6)


def test_finetune_logs_its_run_folder_and_the_epochs_as_steps(base, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    run_dir = cxr_transfer.finetune_backbone(base / "xrays", "mobilenetv2", random_weights=True, input_size=32,
                                             epochs=2, fast=True, copies=1, export_onnx=False, progress=True,
                                             cache_dir=base / "cache", run_dir=tmp_path / "ft", mlflow=uri)
    parent, (child,) = _runs(uri, "xrays")
    said = capsys.readouterr().err.splitlines()   # finetune returns its folder: the line comes with its progress
    assert f"mlflow: run {parent.info.run_id} in experiment 'xrays' at {uri} (1 child run(s))" in said
    assert parent.data.params["backbone"] == "mobilenetv2" and parent.data.params["input_size"] == "32"
    assert 0.0 <= child.data.metrics["accuracy"] <= 1.0
    history = MlflowClient(uri).get_metric_history(child.info.run_id, "epoch_val_accuracy")
    assert [m.step for m in history] == [0, 1]
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id)}
    assert {"report.md", "results.json", "history.csv"} <= artifacts and run_dir == tmp_path / "ft"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_server_or_a_failure_midway_never_loses_the_run(base, tmp_path, monkeypatch):
    port = _free_port()   # nothing listens there: said at once, not after MLflow's minutes of retries
    result = _compare(base, tmp_path / "runs", mlflow=f"http://127.0.0.1:{port}")
    (line,) = result.tracking
    assert line.startswith(f"warning: mlflow: nothing was logged to experiment 'xrays' at http://127.0.0.1:{port}: "
                           f"OSError: cannot connect to 127.0.0.1:{port}")
    assert str(result.run_dir) in line and (result.run_dir / "report.md").is_file()
    assert result.summary_lines()[-1] == line
    folder = tmp_path / "a-folder.db"   # a sqlite store SQLite cannot open: said at once, not after retries
    folder.mkdir()
    start = time.monotonic()
    (line,) = _compare(base, tmp_path / "runs", mlflow=f"sqlite:///{folder}").tracking
    assert line.startswith("warning: mlflow: nothing was logged")
    assert f"cannot open the SQLite database {folder}" in line
    assert time.monotonic() - start < 60

    class Failing(http.server.BaseHTTPRequestHandler):   # a server that answers, with errors only
        def do_GET(self):
            self.send_error(503, "down for maintenance")

        do_POST = do_GET

        def log_message(self, *args):
            pass

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")   # MLflow's retries, for a quick test
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = _compare(base, tmp_path / "runs", mlflow=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    (line,) = result.tracking
    assert line.startswith("warning: mlflow: nothing was logged") and "503" in line, line
    assert (result.run_dir / "results.json").is_file()

    uri = f"sqlite:///{tmp_path / 'm.db'}"   # the store fails once the child runs are logged

    def refuse(*args, **kwargs):
        raise OSError("artifact store is full")

    monkeypatch.setattr(MlflowClient, "log_artifacts", refuse)
    result = _compare(base, tmp_path / "runs", mlflow=uri)
    (line,) = result.tracking
    assert "the parent run and 3 of 3 child run(s) logged" in line and "the rest not" in line
    assert "OSError: artifact store is full" in line and (result.run_dir / "results.json").is_file()
    parent, children = _runs(uri, "xrays")
    assert parent.info.status == "FAILED" and len(children) == 3


def test_without_mlflow_installed_one_error_line_says_how_to_install_it(base, tmp_path, monkeypatch, capsys):
    real = mlflow_runs.importlib.util.find_spec
    monkeypatch.setattr(mlflow_runs.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(CxrError, match=r'pip install "cxr-transfer\[mlflow\]"'):
        _compare(base, tmp_path / "runs", mlflow=True)
    with pytest.raises(CxrError, match="experiment must name an MLflow experiment"):
        _compare(base, tmp_path / "runs", mlflow=True, experiment=" ")
    assert not (tmp_path / "runs").exists()   # refused before anything was computed or written
    code = cli.main(["compare", "--data", str(base / "xrays"), "--backbone", "mobilenetv2", "--random-weights",
                     "--cache-dir", str(base / "cache"), "--out", str(tmp_path / "runs"), "--mlflow"])
    assert code == 2
    assert capsys.readouterr().err.strip() == ('error: --mlflow: MLflow is not installed; install it with '
                                               'pip install "cxr-transfer[mlflow]"')


def test_the_mlflow_flag_without_a_uri_uses_mlflow_tracking_uri(base, tmp_path, run_cli):
    uri = f"sqlite:///{tmp_path / 'env.db'}"
    done = run_cli("compare", "--data", base / "xrays", "--backbone", "mobilenetv2", "--random-weights",
                   "--input-size", "32", "--cache-dir", base / "cache", "--heads", "logreg", "--seeds", "2",
                   "--jobs", "1", "--out", tmp_path / "runs", "--mlflow", "--experiment", "from the CLI",
                   env={"MLFLOW_TRACKING_URI": uri})
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"in experiment 'from the CLI' at {uri}" in done.stdout
    parent, (child,) = _runs(uri, "from the CLI")
    assert "accuracy" in child.data.metrics and parent.data.params["heads"] == "logreg"


def test_a_real_mlflow_server_receives_the_runs(base, tmp_path):
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path / 'server.db'}", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        result = _compare(base, tmp_path / "runs", mlflow=uri, experiment="server")
        assert result.tracking[-1].startswith("mlflow: run ") and uri in result.tracking[-1]
        parent, children = _runs(uri, "server")
        assert len(children) == 3 and all("accuracy" in c.data.metrics for c in children)
        assert "report.md" in {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id)}
    finally:   # the server and the workers it started: one process group, ended together
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def test_shift_logs_its_tests_and_one_child_per_accuracy_estimator(base, tmp_path):
    """shift --mlflow: the two-sample tests in the parent run, each label-free estimate (with its interval and the
    target's true accuracy from its class folders) in a child run, the run folder as artifacts."""
    saved = _compare(base, tmp_path / "runs", save=True).run_dir / "mobilenetv2-logreg.joblib"
    target = write_class_tree(tmp_path / "target", per_class=4, seed=900)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    result = cxr_transfer.shift_check(base / "xrays" / "train", target, "mobilenetv2", model=saved, permutations=19,
                                      n_boot=100, folds=2, out_dir=tmp_path / "runs", cache_dir=base / "cache",
                                      mlflow=uri, **{k: v for k, v in TINY.items() if k != "n_jobs"})
    assert result.tracking[-1].startswith("mlflow: run ") and result.tracking[-1] in result.summary_lines()
    parent, children = _runs(uri, "train")
    assert parent.data.metrics["domain_auc"] == pytest.approx(result.results["domain_auc"])
    assert parent.data.metrics["shift_detected"] == float(result.shift_detected)
    assert parent.data.params["target_fingerprint"] == result.record["target_fingerprint"]
    estimates = {c.data.tags["cxr.estimator"]: c.data.metrics for c in children}
    assert set(estimates) == {k for k, v in result.results["estimated_accuracy"].items() if isinstance(v, dict)}
    for method, metrics in estimates.items():
        expected = result.results["estimated_accuracy"][method]
        assert metrics["estimated_accuracy"] == pytest.approx(expected["value"])
        assert metrics["estimated_accuracy_ci_low"] <= metrics["estimated_accuracy"] <= metrics[
            "estimated_accuracy_ci_high"]
        assert metrics["target_accuracy"] == pytest.approx(result.results["target_accuracy"]["value"])
    assert "report.md" in {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id)}
