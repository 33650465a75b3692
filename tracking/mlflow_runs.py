"""Runs where teams already look: a command's result logged to MLflow (``--mlflow [URI]``, ``--experiment``).

One parent run per command: its settings as params (backbone, precision, protocol, seeds, input size, data
fingerprint, project version, then every setting of its record as ``settings.*``) and the run folder's files
as artifacts; one child run per backbone x head (or fine-tuned model) with its metrics. ``--save`` adds, in
each head's child run, an MLflow model whose pyfunc flavour predicts from uint8 images (``pyfunc_model``).

Logging never loses the run: it happens after the run folder is written, and any failure of MLflow (a tracking
server that does not answer, a store that fails mid-way) ends in one line saying what was not logged, in the
result's ``summary_lines()``, while the command finishes as it would have without ``--mlflow``.

Everything goes through an ``MlflowClient`` of the given URI: MLflow's global tracking URI and active run are
left as they are. The adapters (``compare_runs``, ``validate_runs``, ``finetune_runs``) turn a result into
``RunLog`` objects; ``log_runs`` is the one place that talks to MLflow. Another command's result is logged by
adding its adapter to ``ADAPTERS`` and calling ``track_result`` (see ``ADAPTERS``).
"""
from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import logging
import re
import socket
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cxr_transfer.classify.compare import SUMMARY_METRICS, CompareResult
from cxr_transfer.classify.metrics import headline
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.params import param
from cxr_transfer.core.version import __version__
from cxr_transfer.finetune.report import HISTORY_CSV
from cxr_transfer.tracking.pyfunc_model import HeadFile, log_head_model
from cxr_transfer.validation.run import ValidateResult
from cxr_transfer.validation.shift import ShiftResult

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "cxr-transfer[mlflow]"'
MAX_PARAM_LENGTH = 6000   # MLflow's limit on a param value
ARTIFACTS_FOLDER = "mlartifacts"
"""A new experiment in a ``sqlite:///PATH`` store keeps its artifacts in this folder beside the database (MLflow
would otherwise use ./mlruns of whatever folder the command runs in)."""


@dataclass(frozen=True)
class TrackingSettings:
    """Where a command's results are logged in MLflow; ``mlflow=None`` logs nothing."""

    mlflow: str | bool | None = param(None, help="log the run to MLflow: a tracking URI (sqlite:///PATH/m.db, "
                                                 "http://HOST:5000), or no value for MLflow's default "
                                                 "($MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)",
                                      none_means="no MLflow logging", metavar="URI")
    experiment: str | None = param(None, help="MLflow experiment (default: the dataset folder's name)",
                                   none_means="the dataset folder's name", metavar="NAME")

    def __post_init__(self) -> None:
        if self.mlflow is not None and not isinstance(self.mlflow, (str, bool)):
            raise TypeError(f"mlflow must be a tracking URI (str), True or None, got {self.mlflow!r} instead")
        if isinstance(self.mlflow, str) and not self.mlflow.strip():
            raise CxrError("mlflow must be a tracking URI, got an empty string instead (no value: MLflow's default)",
                           param="mlflow")
        if self.experiment is not None and not isinstance(self.experiment, str):
            raise TypeError(f"experiment must be a str or None, got {self.experiment!r} instead")
        if isinstance(self.experiment, str) and not self.experiment.strip():
            raise CxrError("experiment must name an MLflow experiment, got an empty string instead (leave it out: the "
                           "dataset folder's name)", param="experiment")

    @property
    def enabled(self) -> bool:
        return self.mlflow is not None and self.mlflow is not False

    @property
    def uri(self) -> str | None:
        """The tracking URI given, or None for MLflow's own default."""
        return self.mlflow if isinstance(self.mlflow, str) else None


def require_mlflow(tracking: TrackingSettings) -> None:
    """CxrError (one line: how to install it) when logging is asked for and MLflow is not installed; called
    before any computing."""
    if tracking.enabled and importlib.util.find_spec("mlflow") is None:
        raise CxrError(f"`mlflow`: MLflow is not installed; install it with {INSTALL_HINT}", param="mlflow")


@dataclass
class RunLog:
    """One MLflow run to log: its name, params, tags, metrics (name -> value) and per-step metrics (name ->
    values at steps 0, 1, ...); ``heads`` are saved heads to log as MLflow models in it."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    steps: dict[str, list[float]] = field(default_factory=dict)
    heads: list[HeadFile] = field(default_factory=list)


@dataclass
class TrackingOutcome:
    """What ``log_runs`` did: the parent run's id (None when nothing was logged) and the lines to print."""

    run_id: str | None
    lines: list[str]
    failed: bool = False


# ------------------------------------------------------------------------------------------ params, metrics


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys: {"extract": {"precision": "int8"}} -> {"extract.precision": "int8"}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _number(value: Any) -> float | None:
    """A metric value MLflow takes (NaN included), or None for what is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def interval_metrics(prefix: str, summary: dict[str, Any] | None) -> dict[str, float]:
    """``{prefix}_mean``, ``_std``, ``_ci_low``, ``_ci_high`` of one summarized metric (a point estimate,
    ``value``, is logged as ``{prefix}`` itself)."""
    if not summary:
        return {}
    found = {}
    for key in ("value", "mean", "std", "ci_low", "ci_high"):
        value = _number(summary.get(key))
        if value is not None:
            found[prefix if key == "value" else f"{prefix}_{key}"] = value
    return found


def _common_params(record: dict[str, Any], command: str) -> dict[str, Any]:
    """The params every parent run has, then every setting of the run record as ``settings.<name>``."""
    extraction = record.get("extraction") or {}
    settings = record.get("settings") or {}
    first = next(iter(extraction.values()), {})
    return {"command": command, "project_version": __version__,
            "backbone": settings.get("backbones") or settings.get("backbone"),
            "precision": first.get("precision") or (settings.get("extract") or settings).get("precision"),
            "input_size": ",".join(str(e.get("input_size")) for e in extraction.values()) or None,
            "weights_sha256": ",".join(str(e.get("weights_sha256")) for e in extraction.values()) or None,
            "seed": record.get("seed"), **flatten(settings, "settings.")}


# --------------------------------------------------------------------------------------------- adapters


def compare_runs(result: CompareResult) -> tuple[RunLog, list[RunLog]]:
    """The parent and one child per (backbone, model) of the summary: accuracy (the mean over splits) and each
    summary metric's mean, std and interval; per split (step = split, in the order repeat, fold) its values."""
    record, settings = result.record, result.settings
    params = {**_common_params(record, "compare"), "heads": settings.heads, "protocol": settings.protocol,
              "seeds": settings.seeds if settings.protocol == "paper" else None,
              "folds": settings.folds if settings.protocol == "cv" else None,
              "data_fingerprint": record.get("dataset_fingerprint"),
              "evaluated_fingerprint": record.get("evaluated_fingerprint"), "n_splits": record.get("n_splits"),
              "evaluated_images": record.get("evaluated_images")}
    parent = RunLog(f"compare-{settings.protocol}", params, {"cxr.command": "compare"})
    saved = {p.stem: p for p in sorted(result.run_dir.glob("*.joblib"))} if result.run_dir else {}   # save
    children = []
    for row in result.summary:
        child = RunLog(f"{row['backbone']} + {row['model']}",
                       {"backbone": row["backbone"], "head": row["model"], "protocol": row["protocol"],
                        "n_evaluations": row["n_evaluations"]},
                       {"cxr.backbone": row["backbone"], "cxr.head": row["model"]})
        for metric in SUMMARY_METRICS:
            child.metrics.update(interval_metrics(metric, row.get(metric)))
        if row.get("accuracy"):
            child.metrics["accuracy"] = float(row["accuracy"]["mean"])
        child.metrics.update(fit_seconds=row["fit_seconds"], predict_seconds=row["predict_seconds"])
        group = sorted((e for e in result.evaluations if (e.backbone, e.model, e.protocol) ==
                        (row["backbone"], row["model"], row["protocol"])), key=lambda e: (e.repeat, e.fold))
        for evaluation in group:
            for name, value in headline(evaluation.metrics).items():
                if _number(value) is not None:
                    child.steps.setdefault(f"split_{name}", []).append(float(value))
        head_file = saved.get(f"{row['backbone']}-{row['model']}")
        if head_file is not None:
            child.heads.append(HeadFile(head_file, settings.extract))
        children.append(child)
    return parent, children


VALIDATE_METRICS = ("accuracy", "macro_f1", "auc_macro")


def validate_runs(result: ValidateResult) -> tuple[RunLog, list[RunLog]]:
    """The parent and one child per model: internal and external values of every metric with their intervals,
    the external - internal gap, ECE and Brier score, conformal coverage and mean set size (and, with
    ``calibrate``, the recalibrated ECE)."""
    record, settings = result.record, result.settings
    params = {**_common_params(record, "validate"), "heads": settings.heads, "protocol": "grouped-cv",
              "folds": settings.folds, "alpha": settings.alpha, "n_boot": settings.n_boot,
              "calibrate": settings.calibrate, "group_by": record.get("grouping"),
              "data_fingerprint": record.get("train_fingerprint"),
              "external_fingerprint": record.get("external_fingerprint"), "n_train": record.get("n_train"),
              "n_external": record.get("n_external"), "external": str(settings.external)}
    parent = RunLog("validate", params, {"cxr.command": "validate"})
    saved = {p.stem: p for p in sorted(result.run_dir.glob("*.joblib"))} if result.run_dir else {}
    children = []
    for model in result.models:
        child = RunLog(model.name, {"backbone": model.backbone, "head": model.head},
                       {"cxr.backbone": model.backbone, "cxr.head": model.head})
        for where in ("internal", "external"):
            scores = getattr(model, where)
            for name, values in (scores.get("metrics") or {}).items():
                child.metrics.update(interval_metrics(f"{where}_{name}", values))
            for key in ("ece", "brier"):
                value = _number((scores.get("calibration") or {}).get(key))
                if value is not None:
                    child.metrics[f"{where}_{key}"] = value
            conformal = model.conformal.get(where) or {}
            for key, metric in (("coverage", "coverage"), ("mean_size", "mean_set_size"), ("ci_low", "coverage_ci_low"),
                                ("ci_high", "coverage_ci_high")):
                value = _number(conformal.get(key))
                if value is not None:
                    child.metrics[f"{where}_{metric}"] = value
        for name, values in model.gap.items():
            value = _number(values.get("value"))
            if value is not None:
                child.metrics[f"gap_{name}"] = value
        if model.calibrated:
            for where in ("internal", "external"):
                value = _number((model.calibrated.get(where) or {}).get("ece"))
                if value is not None:
                    child.metrics[f"calibrated_{where}_ece"] = value
        child.metrics["fit_seconds"] = model.seconds
        head_file = saved.get(f"{model.backbone}-{model.head}")
        if head_file is not None:
            child.heads.append(HeadFile(head_file, settings.extract))
        children.append(child)
    return parent, children


def finetune_runs(run_dir: str | Path) -> tuple[RunLog, list[RunLog]]:
    """The parent and one child (the fine-tuned model) of a finetune run folder, from its results.json and
    run.json: the held-out metrics and, per epoch (step = epoch - 1), every column of history.csv."""
    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    record = results.get("record") or json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    settings = record.get("settings") or {}
    evaluation = (results.get("evaluations") or [{}])[0]
    params = {**_common_params(record, "finetune"), "backbone": record.get("backbone"),
              "model": record.get("model"), "precision": "float32", "protocol": "paper",
              "input_size": settings.get("input_size"), "seed": record.get("seed"),
              "data_fingerprint": (record.get("dataset") or {}).get("fingerprint"),
              "test_fingerprint": evaluation.get("test_fingerprint"), "status": record.get("status"),
              "weights_sha256": (record.get("weights") or {}).get("sha256")}
    parent = RunLog(f"finetune-{record.get('backbone')}", params, {"cxr.command": "finetune"})
    child = RunLog(f"{record.get('backbone')} + {record.get('model')}",
                   {"backbone": record.get("backbone"), "model": record.get("model"),
                    "epochs": settings.get("epochs"), "epochs_done": record.get("epochs_done")},
                   {"cxr.backbone": str(record.get("backbone")), "cxr.head": str(record.get("model"))})
    if evaluation.get("metrics"):
        for name, value in headline(evaluation["metrics"]).items():
            if _number(value) is not None:
                child.metrics[name] = float(value)
    for key, value in ((evaluation.get("extra") or {}).get("timings") or {}).items():
        if _number(value) is not None:
            child.metrics[key] = float(value)
    history = run_dir / HISTORY_CSV
    if history.is_file():
        with open(history, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                for key, text in row.items():
                    try:
                        value = float(text)
                    except (TypeError, ValueError):
                        continue
                    if key != "epoch":
                        child.steps.setdefault(f"epoch_{key}", []).append(value)
    return parent, [child]


def shift_runs(result: ShiftResult) -> tuple[RunLog, list[RunLog]]:
    """The parent (the two-sample tests: domain AUC and p, MMD p, shift_detected as 1/0) and, with a model, one
    child per label-free accuracy estimator (its value and interval, and the target's true accuracy when the
    target's folders name classes, for scoring the estimate only)."""
    record, settings, results = result.record, result.settings, result.results
    params = {**_common_params(record, "shift"), "alpha": settings.alpha, "permutations": settings.permutations,
              "data_fingerprint": record.get("train_fingerprint"), "target": str(settings.target),
              "target_fingerprint": record.get("target_fingerprint"), "n_train": record.get("n_train"),
              "n_target": record.get("n_target"), "model": str(settings.model) if settings.model else None}
    parent = RunLog("shift", params, {"cxr.command": "shift"})
    for key in ("domain_auc", "domain_p", "mmd2", "mmd_p"):
        if _number(results.get(key)) is not None:
            parent.metrics[key] = float(results[key])
    parent.metrics["shift_detected"] = float(bool(results.get("shift_detected")))
    estimates, truth = results.get("estimated_accuracy") or {}, results.get("target_accuracy") or {}
    children = []
    for method, estimate in estimates.items():
        if not isinstance(estimate, dict) or _number(estimate.get("value")) is None:
            continue
        child = RunLog(f"estimate {method}", {"estimator": estimate.get("method"), "model": params["model"]},
                       {"cxr.estimator": method})
        child.metrics.update(interval_metrics("estimated_accuracy", estimate))
        if _number(truth.get("value")) is not None:
            child.metrics["target_accuracy"] = float(truth["value"])
        children.append(child)
    return parent, children


def dataset_name(data: str | Path) -> str:
    """The default experiment: the dataset folder's name (a CSV's file name without its suffix)."""
    path = Path(data).expanduser().resolve()
    return path.stem if path.suffix.lower() == ".csv" else path.name


# ---------------------------------------------------------------------------------------------- logging


def _resolved_uri(uri: str | None) -> str:
    """The tracking URI given, else MLflow's default ($MLFLOW_TRACKING_URI included)."""
    import mlflow   # inside: MLflow is an optional extra, and `import cxr_transfer` stays light without it

    return uri or mlflow.get_tracking_uri()


def _client(uri: str) -> Any:
    """An MlflowClient of ``uri``."""
    from mlflow.tracking import MlflowClient   # inside: as above

    return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """OSError when the tracking store cannot be used, said at once where MLflow would retry for minutes: an
    http(s) server that cannot be connected to ($MLFLOW_HTTP_REQUEST_MAX_RETRIES, 7 by default, with growing
    waits), a ``sqlite:///PATH`` database that SQLite cannot open (a folder, a file that is no database, a place
    where no file can be made; its folder is made first)."""
    from urllib.parse import urlsplit

    database = sqlite_database(uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
        try:
            with contextlib.closing(sqlite3.connect(database, timeout=timeout)) as connection:
                connection.execute("pragma schema_version").fetchall()
        except sqlite3.Error as exc:
            raise OSError(f"cannot open the SQLite database {database} ({exc})") from None
        return
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise OSError(f"cannot connect to {parts.hostname}:{port} ({exc.strerror or exc})") from None


def sqlite_database(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` tracking URI, else None."""
    if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0]).expanduser().resolve()


def _experiment_id(client: Any, uri: str, name: str) -> str:
    """The experiment's id, created when missing (in a sqlite store, with its artifacts beside the database)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    database = sqlite_database(uri)
    location = None if database is None else \
        (database.parent / ARTIFACTS_FOLDER / re.sub(r"[^A-Za-z0-9._-]+", "_", name)).as_uri()
    return client.create_experiment(name, artifact_location=location)


def _param_value(value: Any) -> str:
    text = json.dumps(value, default=str) if isinstance(value, (list, tuple)) else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[:MAX_PARAM_LENGTH - 3] + "..."


def _log_run(client: Any, run_id: str, run: RunLog) -> None:
    """Params, tags and metrics of one run, in batches of MLflow's limits (100 params, 1000 metrics)."""
    from mlflow.entities import Metric, Param, RunTag   # inside: MLflow is an optional extra

    now = int(time.time() * 1000)
    params = [Param(k, _param_value(v)) for k, v in run.params.items() if v is not None]
    tags = [RunTag(k, str(v)) for k, v in run.tags.items()]
    metrics = [Metric(k, v, now, 0) for k, v in run.metrics.items()]
    metrics += [Metric(k, v, now, step) for k, values in run.steps.items() for step, v in enumerate(values)]
    for start in range(0, max(len(params), 1), 100):
        client.log_batch(run_id, params=params[start:start + 100], tags=tags if start == 0 else [])
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start:start + 1000])


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


def log_runs(tracking: TrackingSettings, parent: RunLog, children: list[RunLog], run_dir: str | Path | None,
             default_experiment: str) -> TrackingOutcome:
    """Log ``parent`` (with ``run_dir``'s files as artifacts) and its ``children`` as nested runs; never raises
    for a failure of MLflow: the outcome's lines say what was logged, or what was not and why.

    The hook for every command: build the ``RunLog`` objects from a result (as ``compare_runs`` does) and call
    this with the command's ``TrackingSettings``.
    """
    if not tracking.enabled:
        return TrackingOutcome(None, [])
    experiment = tracking.experiment or default_experiment
    where = tracking.uri or "MLflow's default tracking URI"
    done, parent_id, client, notes, models = "nothing", None, None, [], 0
    try:
        where = _resolved_uri(tracking.uri)
        check_reachable(where)   # before MLflow opens it (and makes a sqlite database's folder)
        client = _client(where)
        experiment_id = _experiment_id(client, where, experiment)
        parent_id = client.create_run(experiment_id, run_name=parent.name).info.run_id
        _log_run(client, parent_id, parent)
        done = "the parent run's params"
        for index, child in enumerate(children):
            child_id = client.create_run(experiment_id, run_name=child.name,
                                         tags={"mlflow.parentRunId": parent_id}).info.run_id
            _log_run(client, child_id, child)
            for head in child.heads:
                problem = log_head_model(client, child_id, head)
                if problem:
                    notes.append(f"note: mlflow: {head.path.name} not logged as a model: {problem}")
                models += problem is None
            client.set_terminated(child_id)
            done = f"the parent run and {index + 1} of {len(children)} child run(s)"
        if run_dir is not None:
            client.log_artifacts(parent_id, str(run_dir))
        client.set_terminated(parent_id)
    except Exception as exc:  # noqa: BLE001 - MLflow's failures never lose the run (module docstring)
        if parent_id is not None and client is not None:
            try:
                client.set_terminated(parent_id, status="FAILED")
            except Exception:  # noqa: BLE001 - the store may be gone: the line below says so
                pass
        kept = f" (the run folder {run_dir} is complete)" if run_dir is not None else ""
        logged = "nothing was logged" if parent_id is None else f"{done} logged (run {parent_id}), the rest not"
        line = f"warning: mlflow: {logged} to experiment '{experiment}' at {where}: {_reason(exc)}{kept}"
        log.debug("MLflow logging failed", exc_info=True)
        return TrackingOutcome(parent_id, notes + [line], failed=True)
    saved = f", {models} model(s)" if models else ""
    return TrackingOutcome(parent_id, notes + [f"mlflow: run {parent_id} in experiment '{experiment}' at {where} "
                                              f"({len(children)} child run(s){saved})"])


ADAPTERS: dict[type, Callable[[Any], tuple[RunLog, list[RunLog]]]] = {
    CompareResult: compare_runs, ValidateResult: validate_runs, ShiftResult: shift_runs}
"""The result types ``track_result`` logs, each with its adapter. Another command (shift, ...) is added by
writing ``<command>_runs(result) -> (parent, children)`` and an entry here; its result needs ``settings.data``,
``run_dir`` and a ``tracking: list[str]`` field that its ``summary_lines()`` prints, and its api function calls
``track_result`` after the run (as ``api.compare`` does)."""


def track_result(result: Any, tracking: TrackingSettings) -> TrackingOutcome:
    """Log a result of a command in ``ADAPTERS`` (compare, validate), its run folder as the artifacts when
    written; the outcome's lines are appended to ``result.tracking`` so that ``summary_lines()`` shows them."""
    adapter = ADAPTERS.get(type(result))
    if adapter is None:
        known = ", ".join(cls.__name__ for cls in ADAPTERS)
        raise TypeError(f"result must be one of {known}, got {type(result).__name__} instead")
    parent, children = adapter(result)
    outcome = log_runs(tracking, parent, children, result.run_dir, dataset_name(result.settings.data))
    result.tracking.extend(outcome.lines)
    return outcome


def track_finetune(run_dir: str | Path, data: str | Path, tracking: TrackingSettings,
                   progress: bool = False) -> TrackingOutcome:
    """Log a finetune run folder. finetune returns its folder only, so the outcome's lines go where its
    progress lines go (stderr) with ``progress``, else to this module's logger (a failure as a warning)."""
    try:
        parent, children = finetune_runs(run_dir)
    except (OSError, ValueError) as exc:
        outcome = TrackingOutcome(None, [f"warning: mlflow: nothing was logged: {run_dir} could not be read "
                                         f"({_reason(exc)})"], failed=True)
    else:
        outcome = log_runs(tracking, parent, children, run_dir, dataset_name(data))
    for line in outcome.lines:
        if progress:
            print(line, file=sys.stderr, flush=True)
        else:
            (log.warning if outcome.failed else log.info)(line)
    return outcome
