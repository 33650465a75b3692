"""Fine-tune a frozen ImageNet body + new head with the paper's settings: the orchestration.

``run_finetune(FinetuneSettings(...)) -> run_dir``. Every default is the paper's (section 4.2): input 224,
35 epochs, Adam 1e-3, batch 8, categorical cross-entropy, Dropout 0.5, augmentation during training, a
seeded stratified 80/20 split of the train/ images (``classify.protocols.paper_splits``).

Two ways to train the same head:
- plain (``fast=False``): every epoch, each training image is freshly augmented and runs through the frozen
  Keras body; this is what the paper's Keras loop did;
- fast (``fast=True``): the frozen body is deterministic, so K augmented copies per training image (copy 0 =
  un-augmented; K=1 = no augmentation) are embedded once with the ONNX body (``finetune.bank``, cached and
  shared by seeds); the head then trains on cached features for the same epochs, batch and learning rate,
  drawing one random copy per image per epoch. Test images are embedded un-augmented.
Both evaluate the held-out 20 % after every epoch (the paper's "validation" curves) and write the same
run folder: results.json (``classify.results``, kind "finetune"), run.json, status.json, history.csv,
curves.png, confusion.png, report.md, model.keras, model.onnx, model.json.

Modules: ``settings`` (FinetuneSettings), ``loops`` (the two training loops), ``run_folder`` (the files).
Ctrl-C (KeyboardInterrupt) while training keeps the run folder, marked partial (status.json, results.json's
record and report.md say ``partial: true``) with the history and curves so far, then re-raises; when it
arrives after the last epoch, while the model is saved, every epoch's history is kept and the half-written
model files are removed. Unreadable images are skipped and counted (run.json, report), as extraction does.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from cxr_transfer.extract.duplicates import hash_cache_path
from cxr_transfer.classify.protocols import resolve_groups
from cxr_transfer.classify.results import images_fingerprint
from cxr_transfer.core.outputs import writable_folder
from cxr_transfer.core.record import run_record, write_json
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.onnx_export import get_onnx_backbone
from cxr_transfer.extract.registry import get_backbone
from cxr_transfer.extract.weights import resolve_weights
from cxr_transfer.finetune.data import decode_readable, load_split_images, paper_split, select_split_subset
from cxr_transfer.finetune.loops import TrainingInterrupted, say, train_fast, train_plain
from cxr_transfer.finetune.model import build_finetune_model
from cxr_transfer.finetune.report import write_history
from cxr_transfer.finetune.run_folder import RUN_JSON, finish, finish_partial, make_run_dir, write_status
from cxr_transfer.finetune.settings import DEFAULT_OUT_DIR, FinetuneSettings

__all__ = ["DEFAULT_OUT_DIR", "FinetuneSettings", "run_finetune"]


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
    writable_folder(Path(settings.run_dir).expanduser().parent if settings.run_dir else settings.out_dir, "run")
    dataset = select_split_subset(load_dataset(settings.data), settings.split)
    class_names = dataset.class_names
    resolve_groups(dataset, settings.group_by, merge_duplicates=False)  # fail before building anything
    prepare_started = time.perf_counter()
    if settings.fast:  # exports (or finds cached) the ONNX body: builds the Keras body with the weights
        prepared = get_onnx_backbone(config, size, source, settings.cache_dir)
    else:
        prepared = build_finetune_model(config, size, source, settings.dense_units, settings.dropout,
                                        len(class_names), seed=settings.seed)
    prepare_seconds = time.perf_counter() - prepare_started
    decode_started = time.perf_counter()
    dataset, images, skipped = decode_readable(dataset, size)   # unreadable images are skipped and counted
    decode_seconds = time.perf_counter() - decode_started
    for path, reason in skipped:
        say(settings, f"skipped {path}: {reason}")
    split = paper_split(dataset, settings.seed, settings.test_size, settings.group_by,
                        hash_cache_path(dataset, settings.cache_dir))
    run_dir = make_run_dir(settings, size)
    record = run_record("finetune", {**asdict(settings), "input_size": size}, seed=settings.seed,
                        backbone=config.name, model=settings.model_name,
                        weights={"source": source.describe(), "sha256": source.sha256},
                        dataset={"root": str(dataset.root), "fingerprint": dataset.fingerprint,
                                 "n_images": len(dataset), "split_folder": settings.split,
                                 "skipped": skipped, "left_out": dataset.skipped},
                        split={"protocol": "paper", "test_size": settings.test_size,
                               "group_by": settings.group_by, "n_train": int(len(split.train_idx)),
                               "n_test": int(len(split.test_idx)),
                               "test_fingerprint": images_fingerprint(dataset.samples[i].sha256
                                                                    for i in split.test_idx)},
                        validation="the held-out test images evaluated after each epoch (no separate "
                                   "validation set, as in the paper)", partial=False, status="running")
    write_json(run_dir / RUN_JSON, record)
    write_status(run_dir, "running", 0, settings.epochs)
    say(settings, f"finetune {config.name} {size}px ({settings.model_name}), seed {settings.seed}: "
                   f"{len(split.train_idx)} train / {len(split.test_idx)} test images -> {run_dir}")
    info = {"backbone": config.name, "model": settings.model_name, "seed": settings.seed, "epochs": settings.epochs,
            "input_size": size, "batch_size": settings.batch_size, "lr": settings.lr,
            "dense_units": settings.dense_units, "dropout": settings.dropout,
            "copies": settings.copies if settings.fast else None, "weights": source.describe(),
            "n_train": len(split.train_idx), "n_test": len(split.test_idx),
            "test_fingerprint": record["split"]["test_fingerprint"]}
    trainer = train_fast if settings.fast else train_plain
    outcome = None

    def on_epoch(history: list[dict[str, float]]) -> None:
        write_history(run_dir, history)
        write_status(run_dir, "running", len(history), settings.epochs)

    try:
        data = load_split_images(dataset, split, size, images=images)
        outcome = trainer(settings, prepared, data, len(class_names), callbacks, on_epoch)
        outcome.timings["prepare_seconds"] = prepare_seconds
        finish(run_dir, settings, config, size, source, record, info, class_names, data, outcome,
                decode_seconds, wall_started)
    except (TrainingInterrupted, KeyboardInterrupt) as stop:
        saving = outcome is not None and not isinstance(stop, TrainingInterrupted)
        if saving:  # every epoch ran: keep their history, the model files may be half written
            stop = TrainingInterrupted(outcome.history, outcome.timings)
        elif not isinstance(stop, TrainingInterrupted):  # before the first epoch
            stop = TrainingInterrupted([], {})
        finish_partial(run_dir, settings, record, info, class_names, stop, decode_seconds, wall_started,
                       while_saving=saving)
        raise KeyboardInterrupt from None
    except BaseException as exc:
        write_status(run_dir, "failed", len(outcome.history) if outcome else 0, settings.epochs,
                     error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    return run_dir
