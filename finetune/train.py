"""Fine-tune a frozen ImageNet body + new head with the paper's settings; the library entry point.

``run_finetune(FinetuneSettings(...)) -> run_dir``. Every default is the paper's (section 4.2): input 224,
35 epochs, Adam 1e-3, batch 8, categorical cross-entropy, Dropout 0.5, augmentation during training, a
seeded stratified 80/20 split of the train/ images (``classify.protocols.paper_splits``).

Two ways to train the same head:
- plain (``fast=False``): every epoch, each training image is freshly augmented and runs through the frozen
  Keras body; this is what the paper's Keras loop did;
- fast (``fast=True``): the frozen body is deterministic, so K views per training image (view 0 =
  un-augmented; K=1 = no augmentation) are embedded once with the ONNX body (``finetune.bank``, cached and
  shared by seeds); the head then trains on cached features for the same epochs, batch and learning rate,
  drawing one random view per image per epoch. Test images are embedded un-augmented.
Both evaluate the held-out 20 % after every epoch (the paper's "validation" curves) and write the same
run folder: results.json (``classify.results``, kind "finetune"), run.json, status.json, history.csv,
curves.png, confusion.png, report.md, model.keras, model.onnx, model.json.

Ctrl-C (KeyboardInterrupt) while training keeps the run folder, marked partial (status.json, results.json's
record and report.md say ``partial: true``) with the history and curves so far, then re-raises.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from classify.metrics import classification_metrics, headline, summarize
from classify.results import Evaluation, save_results, test_fingerprint
from core.errors import CxrError
from core.record import now_iso, run_record, write_json
from extract.dataset import load_dataset
from extract.onnx_export import OnnxBackbone, get_onnx_backbone
from extract.pipeline import DEFAULT_CACHE_DIR
from extract.registry import BackboneConfig, get_backbone
from extract.weights import WeightsSource, resolve_weights
from finetune.augment import NO_AUGMENTATION, PAPER_AUGMENTATION, AugmentParams, augment_batch
from finetune.bank import bank_features
from finetune.data import SplitImages, load_split_images, paper_split, select_split_subset
from finetune.export import save_model
from finetune.model import PAPER_DENSE_UNITS, PAPER_DROPOUT, build_finetune_model, build_head, compile_model
from finetune.report import plot_confusion, plot_curves, write_history, write_report

DEFAULT_OUT_DIR = Path("runs")
RUN_JSON = "run.json"
STATUS_JSON = "status.json"
EPSILON = 1e-7  # Keras' clip in categorical cross-entropy


@dataclass
class FinetuneSettings:
    """Every setting of a fine-tuning run; defaults are the paper's. The CLI maps its flags 1:1."""

    data: str | Path
    backbone: str = "vgg16"
    weights_file: str | Path | None = None
    weights_dir: str | Path | None = None
    random_weights: bool = False          # tests only: never a fallback
    allow_download: bool = True           # let Keras fetch ImageNet weights when nothing local is found
    epochs: int = 35
    batch_size: int = 8
    lr: float = 1e-3
    input_size: int | None = 224          # the paper used 224 for all nine; None = the backbone's ImageNet size
    seed: int = 0                         # split, head initialisation, augmentation and batch order
    fast: bool = False
    views: int = 10                       # fast path: views per training image (1 = no augmentation)
    augment: bool = True                  # False = no augmentation (plain; fast: as views=1)
    dense_units: int = PAPER_DENSE_UNITS
    dropout: float = PAPER_DROPOUT
    test_size: float = 0.2
    split: str | None = "train"           # the split folder the 80/20 is drawn from (None: all images)
    group_split: bool = False             # keep each patient on one side (needs manifest patient_id)
    run_dir: str | Path | None = None     # exact folder; default: <out_dir>/finetune-<backbone>-...-<time>
    out_dir: str | Path = DEFAULT_OUT_DIR
    cache_dir: str | Path = DEFAULT_CACHE_DIR   # ONNX bodies and the fast path's view bank
    export_onnx: bool = True
    threads: int | None = None            # onnxruntime threads (fast path); None = all cores
    progress: bool = True                 # one line per epoch on stderr

    def check(self) -> None:
        """Raise CxrError for values that cannot work."""
        for name in ("epochs", "batch_size", "views", "dense_units"):
            if getattr(self, name) < 1:
                raise CxrError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise CxrError(f"learning rate must be positive, got {self.lr}")
        if not 0.0 <= self.dropout < 1.0:
            raise CxrError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def model_name(self) -> str:
        return "finetune-fast" if self.fast else "finetune"


@dataclass
class TrainOutcome:
    """What a training loop hands back: test probabilities and timings (seconds)."""

    proba: np.ndarray | None
    history: list[dict[str, float]]
    timings: dict[str, float]
    head: Any = None
    model: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class _Interrupted(Exception):
    """Carries the epochs finished before a KeyboardInterrupt out of a training loop."""

    def __init__(self, history: list[dict[str, float]], timings: dict[str, float]) -> None:
        super().__init__("interrupted")
        self.history, self.timings = history, timings


def _say(settings: FinetuneSettings, message: str) -> None:
    if settings.progress:
        print(message, file=sys.stderr, flush=True)


def _one_hot(labels: np.ndarray, n: int) -> np.ndarray:
    return np.eye(n, dtype=np.float32)[labels]


def held_out_scores(proba: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Categorical cross-entropy (Keras' clipping) and accuracy of probabilities on integer labels."""
    picked = np.clip(proba[np.arange(len(labels)), labels], EPSILON, 1.0 - EPSILON)
    return float(-np.mean(np.log(picked))), float(np.mean(proba.argmax(axis=1) == labels))


def _epoch_loop(settings: FinetuneSettings, model: Any, n_classes: int, epoch_data: Callable[[int], tuple],
                predict_test: Callable[[], np.ndarray], y_test: np.ndarray, callbacks: Sequence[Any],
                on_epoch: Callable[[list[dict[str, float]]], None] | None) -> TrainOutcome:
    """The shared loop: fit one epoch on ``epoch_data(epoch)``, then score the held-out images;
    ``on_epoch(history)`` after each epoch (the run folder's history.csv and status.json)."""
    history: list[dict[str, float]] = []
    timings = {"train_seconds": 0.0, "validation_seconds": 0.0, "train_cpu_seconds": 0.0,
               "validation_cpu_seconds": 0.0}
    proba = None
    try:
        for epoch in range(settings.epochs):
            started, cpu_started = time.perf_counter(), time.process_time()
            x, y = epoch_data(epoch)
            result = model.fit(x, _one_hot(y, n_classes), batch_size=settings.batch_size, epochs=epoch + 1,
                               initial_epoch=epoch, shuffle=False, verbose=0, callbacks=list(callbacks))
            trained, cpu_trained = time.perf_counter(), time.process_time()
            proba = predict_test()
            val_loss, val_acc = held_out_scores(proba, y_test)
            done, cpu_done = time.perf_counter(), time.process_time()
            timings["train_seconds"] += trained - started
            timings["validation_seconds"] += done - trained
            timings["predict_seconds"] = done - trained
            timings["train_cpu_seconds"] += cpu_trained - cpu_started
            timings["validation_cpu_seconds"] += cpu_done - cpu_trained
            timings["predict_cpu_seconds"] = cpu_done - cpu_trained
            row = {"epoch": epoch + 1, "loss": float(result.history["loss"][-1]),
                   "accuracy": float(result.history["accuracy"][-1]), "val_loss": val_loss,
                   "val_accuracy": val_acc, "epoch_seconds": round(done - started, 3)}
            history.append(row)
            if on_epoch:
                on_epoch(history)
            _say(settings, f"epoch {epoch + 1}/{settings.epochs}: loss {row['loss']:.4f} acc {row['accuracy']:.4f}"
                           f" | held-out loss {val_loss:.4f} acc {val_acc:.4f} ({done - started:.1f} s)")
    except KeyboardInterrupt:
        raise _Interrupted(history, timings) from None
    # the final epoch's held-out pass is the test inference, not validation overhead
    timings["validation_seconds"] -= timings.get("predict_seconds", 0.0)
    timings["validation_cpu_seconds"] -= timings.get("predict_cpu_seconds", 0.0)
    return TrainOutcome(proba, history, timings)


def train_plain(settings: FinetuneSettings, model: Any, data: SplitImages, n_classes: int,
                callbacks: Sequence[Any] = (), on_epoch: Callable | None = None) -> TrainOutcome:
    """The paper's Keras loop: fresh augmentation every epoch, through the frozen Keras body."""
    import keras

    keras.utils.set_random_seed(settings.seed)
    compile_model(model, settings.lr)
    rng = np.random.default_rng(settings.seed)
    params = PAPER_AUGMENTATION if settings.augment else NO_AUGMENTATION
    x_test = data.x_test.astype(np.float32)

    def epoch_data(epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = rng.permutation(len(data.y_train))
        images = augment_batch(data.x_train[order], rng, params) if settings.augment else data.x_train[order]
        return images.astype(np.float32), data.y_train[order]

    def predict_test() -> np.ndarray:
        return model.predict(x_test, batch_size=16, verbose=0)

    outcome = _epoch_loop(settings, model, n_classes, epoch_data, predict_test, data.y_test, callbacks,
                          on_epoch)
    outcome.model = model
    outcome.extra["augmentation"] = asdict(params)
    return outcome


def train_fast(settings: FinetuneSettings, backbone: OnnxBackbone, data: SplitImages, n_classes: int,
               callbacks: Sequence[Any] = (), on_epoch: Callable | None = None) -> TrainOutcome:
    """The same head trained on cached embeddings of K views per training image (module docstring)."""
    import keras

    params: AugmentParams = PAPER_AUGMENTATION
    config = backbone.config
    n_views = settings.views if settings.augment else 1

    def bank_progress(done: int, total: int) -> None:
        if done == total or done % (16 * 20) == 0:
            _say(settings, f"view bank: {done}/{total} views embedded")

    train_shas = [s.sha256 for s in data.train_samples]
    cpu_started = time.process_time()
    x_views, train_stats = bank_features(backbone, train_shas, data.x_train, [n_views] * len(train_shas),
                                         n_views, params, settings.cache_dir, threads=settings.threads,
                                         progress=bank_progress)
    bank_cpu = time.process_time() - cpu_started
    test_views, test_stats = bank_features(backbone, [s.sha256 for s in data.test_samples], data.x_test,
                                           [1] * len(data.test_samples), n_views, params,
                                           settings.cache_dir, threads=settings.threads)
    test_cpu = time.process_time() - cpu_started - bank_cpu
    x_test = test_views[:, 0]
    head = build_head(config.feature_dim, settings.dense_units, settings.dropout, n_classes, seed=settings.seed)
    keras.utils.set_random_seed(settings.seed)
    compile_model(head, settings.lr)
    rng = np.random.default_rng(settings.seed)

    def epoch_data(epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = rng.permutation(len(data.y_train))
        views = rng.integers(0, n_views, size=len(order))
        return x_views[order, views], data.y_train[order]

    def predict_test() -> np.ndarray:
        return head.predict(x_test, batch_size=256, verbose=0)

    outcome = _epoch_loop(settings, head, n_classes, epoch_data, predict_test, data.y_test, callbacks,
                          on_epoch)
    outcome.head = head
    outcome.timings.update(bank_seconds=train_stats.seconds, test_embed_seconds=test_stats.seconds,
                           bank_cpu_seconds=bank_cpu, test_embed_cpu_seconds=test_cpu)
    outcome.timings["predict_seconds"] += test_stats.seconds
    outcome.timings["predict_cpu_seconds"] += test_cpu
    outcome.extra.update(views=n_views, augmentation=asdict(params), bank_file=str(train_stats.path),
                         bank_views_computed=train_stats.computed + test_stats.computed,
                         bank_views_cached=train_stats.cached + test_stats.cached,
                         onnx_body_sha256=backbone.sha256)
    return outcome


def _make_run_dir(settings: FinetuneSettings, size: int) -> Path:
    if settings.run_dir is not None:
        run_dir = Path(settings.run_dir).expanduser()
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path_kind = f"fast-k{settings.views}" if settings.fast else "plain"
        run_dir = Path(settings.out_dir).expanduser() / \
            f"finetune-{get_backbone(settings.backbone).name}-{size}-{path_kind}-seed{settings.seed}-{stamp}"
    status = run_dir / STATUS_JSON
    if status.is_file() and json.loads(status.read_text()).get("status") == "complete":
        raise CxrError(f"{run_dir} already holds a finished run; give another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _write_status(run_dir: Path, status: str, epochs_done: int, epochs: int, **extra: Any) -> None:
    write_json(run_dir / STATUS_JSON, {"status": status, "partial": status != "complete",
                                       "epochs_done": epochs_done, "epochs": epochs, "updated": now_iso(), **extra})


def _summary(backbone: str, model: str, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    values = {k: v for k, v in headline(metrics).items() if v is not None}
    return [{"backbone": backbone, "model": model, "protocol": "paper", "n_evaluations": 1,
             "metrics": {k: summarize([v]) for k, v in values.items()}}]


def run_finetune(settings: FinetuneSettings, callbacks: Sequence[Any] = ()) -> Path:
    """Run one fine-tuning (module docstring) and return its run folder.

    Weights are resolved and the model (plain) or ONNX body (fast) built before any image is decoded or any
    epoch runs, so missing weights fail at once with WeightsNotFoundError. callbacks: extra Keras callbacks
    for ``fit``. prepare_seconds in the timings is that build (plain) or ONNX export/cache lookup (fast).
    """
    wall_started = time.perf_counter()
    settings.check()
    config = get_backbone(settings.backbone)
    size = config.input_size(settings.input_size)
    source = resolve_weights(config, settings.weights_file, settings.weights_dir, settings.random_weights,
                             allow_download=settings.allow_download)
    dataset = select_split_subset(load_dataset(settings.data), settings.split)
    class_names = dataset.class_names
    split = paper_split(dataset, settings.seed, settings.test_size, settings.group_split)
    prepare_started = time.perf_counter()
    if settings.fast:  # exports (or finds cached) the ONNX body: builds the Keras body with the weights
        prepared = get_onnx_backbone(config, size, source, settings.cache_dir)
    else:
        prepared = build_finetune_model(config, size, source, settings.dense_units, settings.dropout,
                                        len(class_names), seed=settings.seed)
    prepare_seconds = time.perf_counter() - prepare_started
    run_dir = _make_run_dir(settings, size)
    record = run_record("finetune", {**asdict(settings), "input_size": size}, seed=settings.seed,
                        backbone=config.name, model=settings.model_name,
                        weights={"source": source.describe(), "sha256": source.sha256},
                        dataset={"root": str(dataset.root), "fingerprint": dataset.fingerprint,
                                 "n_images": len(dataset), "split_folder": settings.split},
                        split={"protocol": "paper", "test_size": settings.test_size,
                               "group_split": settings.group_split, "n_train": int(len(split.train_idx)),
                               "n_test": int(len(split.test_idx)),
                               "test_fingerprint": test_fingerprint(dataset.samples[i].sha256
                                                                    for i in split.test_idx)},
                        validation="the held-out test images evaluated after each epoch (no separate "
                                   "validation set, as in the paper)", partial=False, status="running")
    write_json(run_dir / RUN_JSON, record)
    _write_status(run_dir, "running", 0, settings.epochs)
    _say(settings, f"finetune {config.name} {size}px ({settings.model_name}), seed {settings.seed}: "
                   f"{len(split.train_idx)} train / {len(split.test_idx)} test images -> {run_dir}")
    info = {"backbone": config.name, "model": settings.model_name, "seed": settings.seed, "epochs": settings.epochs,
            "input_size": size, "batch_size": settings.batch_size, "lr": settings.lr,
            "dense_units": settings.dense_units, "dropout": settings.dropout,
            "views": settings.views if settings.fast else None, "weights": source.describe(),
            "n_train": len(split.train_idx), "n_test": len(split.test_idx),
            "test_fingerprint": record["split"]["test_fingerprint"]}
    trainer = train_fast if settings.fast else train_plain
    decode_seconds = 0.0

    def on_epoch(history: list[dict[str, float]]) -> None:
        write_history(run_dir, history)
        _write_status(run_dir, "running", len(history), settings.epochs)

    try:
        decode_started = time.perf_counter()
        data = load_split_images(dataset, split, size)
        decode_seconds = time.perf_counter() - decode_started
        outcome = trainer(settings, prepared, data, len(class_names), callbacks, on_epoch)
        outcome.timings["prepare_seconds"] = prepare_seconds
        _finish(run_dir, settings, config, size, source, record, info, class_names, data, outcome,
                decode_seconds, wall_started)
    except (_Interrupted, KeyboardInterrupt) as stop:
        if not isinstance(stop, _Interrupted):  # before the first epoch or while saving
            stop = _Interrupted([], {})
        _finish_partial(run_dir, settings, record, info, class_names, stop, decode_seconds, wall_started)
        raise KeyboardInterrupt from None
    except BaseException as exc:
        _write_status(run_dir, "failed", 0, settings.epochs, error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    return run_dir


def _finish_partial(run_dir: Path, settings: FinetuneSettings, record: dict[str, Any], info: dict[str, Any],
                    class_names: Sequence[str], stop: _Interrupted, decode_seconds: float,
                    wall_started: float) -> None:
    """Keep what an interrupted run did: history, curves, a partial results.json, report and status."""
    done = len(stop.history)
    record.update(partial=True, status="interrupted", epochs_done=done,
                  timings={**stop.timings, "decode_seconds": decode_seconds,
                           "total_seconds": time.perf_counter() - wall_started})
    write_history(run_dir, stop.history)
    if stop.history:
        plot_curves(run_dir, stop.history, f"{info['backbone']} ({info['model']}), seed {info['seed']}: "
                                           f"partial, {done} of {settings.epochs} epochs")
    save_results(run_dir, "finetune", class_names, record, [], [])
    write_json(run_dir / RUN_JSON, record)
    write_report(run_dir, info, None, stop.history, partial=True)
    _write_status(run_dir, "partial", done, settings.epochs, reason="KeyboardInterrupt")
    _say(settings, f"interrupted after {done} epochs; partial run kept in {run_dir}")


def _finish(run_dir: Path, settings: FinetuneSettings, config: BackboneConfig, size: int, source: WeightsSource,
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
                            data.test_fingerprint, metrics, timings["fit_seconds"], timings["predict_seconds"],
                            extra={"seed": settings.seed, "epochs": settings.epochs, "input_size": size,
                                   "timings": timings, "final_epoch": outcome.history[-1],
                                   "onnx_sha256": model_info.get("onnx_sha256"), **outcome.extra})
    record.update(partial=False, status="complete", epochs_done=len(outcome.history), timings=timings,
                  model=settings.model_name, model_files=model_info)
    write_history(run_dir, outcome.history)
    title = f"{config.name} ({settings.model_name}), seed {settings.seed}"
    plot_curves(run_dir, outcome.history, title)
    plot_confusion(run_dir, metrics["confusion_matrix"], class_names,
                   f"{title}: accuracy {metrics['accuracy']:.4f}")
    save_results(run_dir, "finetune", class_names, record, [evaluation],
                 _summary(config.name, settings.model_name, metrics))
    write_json(run_dir / RUN_JSON, record)
    write_report(run_dir, info, metrics, outcome.history, partial=False, timings=timings)
    _write_status(run_dir, "complete", len(outcome.history), settings.epochs)
    _say(settings, f"accuracy {metrics['accuracy']:.4f}; fit {timings['fit_seconds']:.1f} s, "
                   f"predict {timings['predict_seconds']:.1f} s, total {timings['total_seconds']:.1f} s -> {run_dir}")


def finetune(data: str | Path, backbone: str = "vgg16", **settings: Any) -> Path:
    """Shorthand: ``run_finetune(FinetuneSettings(data, backbone, **settings))``."""
    return run_finetune(FinetuneSettings(data, backbone, **settings))
