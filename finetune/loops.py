"""The training loops: the paper's plain Keras loop and the fast path on cached embeddings of augmented copies.

Both fit one epoch at a time and score the held-out images after each (the paper's "validation" curves);
a KeyboardInterrupt leaves the loop as ``TrainingInterrupted`` carrying the epochs finished so far.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from cxr_transfer.extract.onnx_export import OnnxBackbone
from cxr_transfer.finetune.augment import NO_AUGMENTATION, PAPER_AUGMENTATION, AugmentParams, augment_batch
from cxr_transfer.finetune.bank import bank_features
from cxr_transfer.finetune.data import SplitImages
from cxr_transfer.finetune.model import build_head, compile_model
from cxr_transfer.finetune.settings import FinetuneSettings

EPSILON = 1e-7  # Keras' clip in categorical cross-entropy


@dataclass
class TrainOutcome:
    """What a training loop hands back: test probabilities and timings (seconds)."""

    proba: np.ndarray | None
    history: list[dict[str, float]]
    timings: dict[str, float]
    head: Any = None
    model: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class TrainingInterrupted(Exception):
    """Carries the epochs finished before a KeyboardInterrupt out of a training loop."""

    def __init__(self, history: list[dict[str, float]], timings: dict[str, float]) -> None:
        super().__init__("interrupted")
        self.history, self.timings = history, timings


def say(settings: FinetuneSettings, message: str) -> None:
    if settings.progress:
        print(message, file=sys.stderr, flush=True)


def _one_hot(labels: np.ndarray, n: int) -> np.ndarray:
    return np.eye(n, dtype=np.float32)[labels]


def held_out_scores(proba: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Categorical cross-entropy (Keras' clipping) and accuracy of probabilities on integer labels."""
    picked = np.clip(proba[np.arange(len(labels)), labels], EPSILON, 1.0 - EPSILON)
    return float(-np.mean(np.log(picked))), float(np.mean(proba.argmax(axis=1) == labels))


def epoch_loop(settings: FinetuneSettings, model: Any, n_classes: int, epoch_data: Callable[[int], tuple],
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
            say(settings, f"epoch {epoch + 1}/{settings.epochs}: loss {row['loss']:.4f} acc {row['accuracy']:.4f}"
                           f" | held-out loss {val_loss:.4f} acc {val_acc:.4f} ({done - started:.1f} s)")
    except KeyboardInterrupt:
        raise TrainingInterrupted(history, timings) from None
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

    outcome = epoch_loop(settings, model, n_classes, epoch_data, predict_test, data.y_test, callbacks,
                          on_epoch)
    outcome.model = model
    outcome.extra["augmentation"] = asdict(params)
    return outcome


def train_fast(settings: FinetuneSettings, backbone: OnnxBackbone, data: SplitImages, n_classes: int,
               callbacks: Sequence[Any] = (), on_epoch: Callable | None = None) -> TrainOutcome:
    """The same head trained on cached embeddings of K augmented copies per training image (module docstring)."""
    import keras

    params: AugmentParams = PAPER_AUGMENTATION
    config = backbone.config
    n_copies = settings.copies if settings.augment else 1

    def bank_progress(done: int, total: int) -> None:
        if done == total or done % (16 * 20) == 0:
            say(settings, f"bank: {done}/{total} augmented copies embedded")

    train_shas = [s.sha256 for s in data.train_samples]
    cpu_started = time.process_time()
    x_copies, train_stats = bank_features(backbone, train_shas, data.x_train, [n_copies] * len(train_shas),
                                          n_copies, params, settings.cache_dir, threads=settings.threads,
                                          progress=bank_progress)
    bank_cpu = time.process_time() - cpu_started
    test_copies, test_stats = bank_features(backbone, [s.sha256 for s in data.test_samples], data.x_test,
                                            [1] * len(data.test_samples), n_copies, params,
                                            settings.cache_dir, threads=settings.threads)
    test_cpu = time.process_time() - cpu_started - bank_cpu
    x_test = test_copies[:, 0]
    head = build_head(config.feature_dim, settings.dense_units, settings.dropout, n_classes, seed=settings.seed)
    keras.utils.set_random_seed(settings.seed)
    compile_model(head, settings.lr)
    rng = np.random.default_rng(settings.seed)

    def epoch_data(epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = rng.permutation(len(data.y_train))
        copies = rng.integers(0, n_copies, size=len(order))
        return x_copies[order, copies], data.y_train[order]

    def predict_test() -> np.ndarray:
        return head.predict(x_test, batch_size=256, verbose=0)

    outcome = epoch_loop(settings, head, n_classes, epoch_data, predict_test, data.y_test, callbacks,
                          on_epoch)
    outcome.head = head
    outcome.timings.update(bank_seconds=train_stats.seconds, test_embed_seconds=test_stats.seconds,
                           bank_cpu_seconds=bank_cpu, test_embed_cpu_seconds=test_cpu)
    outcome.timings["predict_seconds"] += test_stats.seconds
    outcome.timings["predict_cpu_seconds"] += test_cpu
    outcome.extra.update(copies=n_copies, augmentation=asdict(params), bank_file=str(train_stats.path),
                         bank_copies_computed=train_stats.computed + test_stats.computed,
                         bank_copies_cached=train_stats.cached + test_stats.cached,
                         onnx_body_sha256=backbone.sha256)
    return outcome
