"""A fine-tuning run folder: created once, status kept current, finished whole or kept as partial.

Files: run.json (the record), status.json (running / partial / complete / failed, epochs done),
results.json (``classify.results``, kind "finetune"), history.csv, curves.png, confusion.png, report.md,
model.keras, model.onnx, model.json.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from cxr_transfer.classify.comparisons import CORRECT, correctness_string
from cxr_transfer.classify.metrics import classification_metrics, headline, summarize
from cxr_transfer.classify.results import Evaluation, save_results
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.outputs import new_run_dir, writable_folder
from cxr_transfer.core.record import now_iso, write_json
from cxr_transfer.extract.registry import BackboneConfig, get_backbone
from cxr_transfer.extract.weights import WeightsSource
from cxr_transfer.finetune.data import SplitImages
from cxr_transfer.finetune.export import save_model
from cxr_transfer.finetune.loops import TrainingInterrupted, TrainOutcome, say
from cxr_transfer.finetune.model import build_finetune_model
from cxr_transfer.finetune.report import plot_confusion, plot_curves, write_history, write_report
from cxr_transfer.finetune.settings import FinetuneSettings

RUN_JSON = "run.json"
STATUS_JSON = "status.json"


MODEL_FILES = ("model.keras", "model.onnx", "model.json")


def make_run_dir(settings: FinetuneSettings, size: int) -> Path:
    """The run folder: ``--run-dir`` as given (refused when it holds a finished run), else a new unique
    ``finetune-<backbone>-<size>-<path>-seed<N>-<time>-<random>`` under ``out_dir``."""
    if settings.run_dir is None:
        path_kind = f"fast-k{settings.copies}" if settings.fast else "plain"
        return new_run_dir(settings.out_dir,
                           f"finetune-{get_backbone(settings.backbone).name}-{size}-{path_kind}-seed{settings.seed}")
    run_dir = Path(settings.run_dir).expanduser()
    status = run_dir / STATUS_JSON
    if status.is_file():
        try:
            finished = json.loads(status.read_text(encoding="utf-8")).get("status") == "complete"
        except (ValueError, AttributeError):
            finished = True   # an unreadable status is no proof the run there can be overwritten
        if finished:
            raise CxrError(f"{run_dir} already holds a finished run; give another `run_dir`")
    writable_folder(run_dir, "`run_dir`")
    return run_dir


def write_status(run_dir: Path, status: str, epochs_done: int, epochs: int, **extra: Any) -> None:
    write_json(run_dir / STATUS_JSON, {"status": status, "partial": status != "complete",
                                       "epochs_done": epochs_done, "epochs": epochs, "updated": now_iso(), **extra})


def summary_rows(backbone: str, model: str, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    values = {k: v for k, v in headline(metrics).items() if v is not None}
    return [{"backbone": backbone, "model": model, "protocol": "paper", "n_evaluations": 1,
             "metrics": {k: summarize([v]) for k, v in values.items()}}]


def finish_partial(run_dir: Path, settings: FinetuneSettings, record: dict[str, Any], info: dict[str, Any],
                    class_names: Sequence[str], stop: TrainingInterrupted, decode_seconds: float,
                    wall_started: float, while_saving: bool = False) -> None:
    """Keep what an interrupted run did: history, curves, a partial results.json, report and status.

    while_saving: the interrupt came after the last epoch; the model files may be half written, so they
    are removed (predict must not load them) and the status says so.
    """
    done = len(stop.history)
    if while_saving:
        for name in MODEL_FILES:
            (run_dir / name).unlink(missing_ok=True)
    reason = "KeyboardInterrupt while saving the model" if while_saving else "KeyboardInterrupt"
    record.update(partial=True, status="interrupted", epochs_done=done, interrupted=reason,
                  timings={**stop.timings, "decode_seconds": decode_seconds,
                           "total_seconds": time.perf_counter() - wall_started})
    write_history(run_dir, stop.history)
    if stop.history:
        plot_curves(run_dir, stop.history, f"{info['backbone']} ({info['model']}), seed {info['seed']}: "
                                           f"partial, {done} of {settings.epochs} epochs")
    save_results(run_dir, "finetune", class_names, record, [], [])
    write_json(run_dir / RUN_JSON, record)
    write_report(run_dir, info, None, stop.history, partial=True)
    write_status(run_dir, "partial", done, settings.epochs, reason=reason)
    when = " (while saving the model, which was not kept)" if while_saving else ""
    say(settings, f"interrupted after {done} of {settings.epochs} epochs{when}; partial run kept in {run_dir}")


def finish(run_dir: Path, settings: FinetuneSettings, config: BackboneConfig, size: int, source: WeightsSource,
            record: dict[str, Any], info: dict[str, Any], class_names: Sequence[str], data: SplitImages,
            outcome: TrainOutcome, decode_seconds: float, wall_started: float) -> None:
    """Score, save the model (Keras + ONNX), and write results, report and figures."""
    proba = outcome.proba
    metrics = classification_metrics(data.y_test, proba.argmax(axis=1), class_names, proba)
    export_started = time.perf_counter()
    model = outcome.model
    if model is None:  # fast path: the trained head on the frozen Keras body
        model = build_finetune_model(config, size, source, head=outcome.head)
    model_info = save_model(run_dir, model, config.name, size, class_names, source, data.x_test,
                            settings.model_name, onnx=settings.export_onnx)
    timings = {**outcome.timings, "decode_seconds": decode_seconds,
               "export_seconds": time.perf_counter() - export_started}
    timings["fit_seconds"] = timings["train_seconds"] + timings.get("bank_seconds", 0.0)
    timings["fit_cpu_seconds"] = timings["train_cpu_seconds"] + timings.get("bank_cpu_seconds", 0.0)
    timings["total_seconds"] = time.perf_counter() - wall_started
    timings["total_cpu_seconds"] = time.process_time()
    timings = {k: round(v, 3) for k, v in timings.items()}
    evaluation = Evaluation(config.name, settings.model_name, "paper", 0, 0, len(data.y_train), len(data.y_test),
                            data.held_out_fingerprint, metrics, timings["fit_seconds"], timings["predict_seconds"],
                            extra={"seed": settings.seed, "epochs": settings.epochs, "input_size": size,
                                   "timings": timings, "final_epoch": outcome.history[-1],
                                   "onnx_sha256": model_info.get("onnx_sha256"),
                                   CORRECT: correctness_string(data.y_test, proba.argmax(axis=1),
                                                               [s.sha256 for s in data.test_samples]),
                                   **outcome.extra})
    record.update(partial=False, status="complete", epochs_done=len(outcome.history), timings=timings,
                  model=settings.model_name, model_files=model_info)
    write_history(run_dir, outcome.history)
    title = f"{config.name} ({settings.model_name}), seed {settings.seed}"
    plot_curves(run_dir, outcome.history, title)
    plot_confusion(run_dir, metrics["confusion_matrix"], class_names,
                   f"{title}: accuracy {metrics['accuracy']:.4f}")
    save_results(run_dir, "finetune", class_names, record, [evaluation],
                 summary_rows(config.name, settings.model_name, metrics))
    write_json(run_dir / RUN_JSON, record)
    write_report(run_dir, info, metrics, outcome.history, partial=False, timings=timings)
    write_status(run_dir, "complete", len(outcome.history), settings.epochs)
    say(settings, f"accuracy {metrics['accuracy']:.4f}; fit {timings['fit_seconds']:.1f} s, "
                   f"predict {timings['predict_seconds']:.1f} s, total {timings['total_seconds']:.1f} s -> {run_dir}")
