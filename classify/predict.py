"""Predict (``cxr.predict``): class probabilities for new images from a saved model.

Two kinds of model:
- a head saved by ``compare --save`` (``NAME.joblib`` + ``NAME.json``): embeddings are computed through the
  same cache code as extraction, with the backbone, input size and weights the head was trained on; weights
  whose sha256 differ from the recorded ones are refused;
- a fine-tuned model (a finetune run folder, or its ``model.json`` / ``model.onnx``): the whole network is one
  ONNX file (raw pixels in, probabilities out), checked against the sha256 in model.json, run with
  onnxruntime on images decoded by the one decoding rule.
"""
from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np

from cxr_transfer.classify.conformal import conformal_sets_for, format_set
from cxr_transfer.classify.saved_model import SavedFinetuned, finetuned_model_json, load_saved_model
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.io import atomic_path, cannot_write_error
from cxr_transfer.core.outputs import writable_file
from cxr_transfer.extract.dataset import Dataset, Sample, hash_samples, images_in_folder
from cxr_transfer.extract.images import decoded_batches
from cxr_transfer.extract.pipeline import ExtractSettings, load_features
from cxr_transfer.extract.user_onnx import backbone_for_saved
from cxr_transfer.extract.weights import resolve_weights


def unlabeled_dataset(images: str | Path, class_names: list[str]) -> Dataset:
    """Every image under a folder (or one file), hashed, with no label."""
    paths = images_in_folder(images)
    root = Path(images).resolve()
    root = root if root.is_dir() else root.parent
    samples = hash_samples([Sample(p, "") for p in paths])
    return Dataset(root.resolve(), samples, list(class_names))


def check_weights(part: dict, settings: ExtractSettings, precision: str | None = None) -> ExtractSettings:
    """Settings for one backbone of the model, after checking the weights found are the ones it used and that
    the requested precision (if any) is the one it was trained on."""
    config = backbone_for_saved(part, settings.cache_dir)   # a user ONNX model: registered from the record
    weights_file = settings.weights_file
    source = resolve_weights(config, weights_file, settings.weights_dir, settings.random_weights)
    if source.sha256 != part["weights_sha256"]:
        raise CxrError(f"the model's {config.name} features came from weights with sha256 "
                       f"{part['weights_sha256'][:16]}..., but the weights found here ({source.describe()}) have "
                       f"{source.sha256[:16]}...; pass the same weights with `weights` or `weights_dir`")
    trained = part.get("precision", "float32")
    if precision is not None and precision != trained:
        raise CxrError(f"the model was trained on {trained} {config.name} embeddings; `precision` {precision} "
                       f"would give it other features (leave `precision` out, or use {trained})")
    check_input_size(settings.input_size, int(part["input_size"]))
    common = replace(settings.common, backbone=config.name, input_size=int(part["input_size"]),
                     weights_file=weights_file, precision=trained)
    return replace(settings, common=common, int8_sample_digest=part.get("int8_sample_digest"))


def check_input_size(asked: int | None, trained: int) -> None:
    """CxrError when an input size was asked for that is not the one the model was trained at (None: the
    model's own is used)."""
    if asked is not None and int(asked) != trained:
        raise CxrError(f"the model was trained at input_size {trained}; input_size {asked} would give it other "
                       f"features (leave `input_size` out: the model's own is used, or give {trained})")


def _finetuned_probabilities(saved: SavedFinetuned, dataset: Dataset, settings: ExtractSettings):

    check_input_size(settings.input_size, saved.input_size)
    proba = saved.onnx_probabilities(settings.threads)
    readable, blocks, skipped = [], [], []
    for good, batch, bad in decoded_batches(dataset.samples, saved.input_size, settings.batch_size,
                                            settings.decode_workers):
        skipped += [(dataset.relative(s), reason) for s, reason in bad]
        if good:
            readable += good
            blocks.append(proba(batch))
    if not readable:
        raise CxrError(f"{dataset.root}: none of the {len(dataset)} images could be read")
    return readable, np.vstack(blocks), saved.class_names, skipped


def predict_images(images: str | Path, model_path: str | Path, settings: ExtractSettings,
                   out_csv: str | Path | None = None,
                   precision: str | None = None,
                   conformal: float | None = None) -> tuple[Path, list[tuple[str, str]]]:
    """Write a CSV (path, sha256, predicted, one probability column per class, and with ``conformal=ALPHA``
    the prediction set); return it and skipped files."""
    if conformal is not None and finetuned_model_json(model_path) is not None:
        raise CxrError(f"{model_path}: `conformal` needs a head saved by validate `save`, not a fine-tuned model")
    out_csv = predictions_path(out_csv, images, model_path)   # before any computing
    saved = load_saved_model(model_path)
    if isinstance(saved, SavedFinetuned):
        dataset = unlabeled_dataset(images, [])
        readable, proba, classes, skipped = _finetuned_probabilities(saved, dataset, settings)
        default_out = saved.info_path.parent / "predictions.csv"
        return write_predictions(Path(out_csv or default_out), dataset, readable, proba, classes), skipped
    model, info = saved.model, saved.info
    parts = [check_weights(part, settings, precision) for part in info["backbones"]]
    dataset = unlabeled_dataset(images, info["class_names"])
    blocks, skipped, readable = [], [], None
    for part_settings in parts:
        # prune=False: a few files of a folder must not drop the folder's other cached embeddings.
        features, result = load_features(dataset, part_settings, prune=False)
        skipped += result.failures
        readable = features.samples if readable is None else readable
        row = {sha: i for i, sha in enumerate(features.sha256)}
        blocks.append(features.embeddings[[row[s.sha256] for s in readable]])
    proba = model.predict_proba(np.hstack(blocks))
    classes = [info["class_names"][int(c)] for c in model.classes_]
    sets = None
    if conformal is not None:

        sets = [format_set(row, classes) for row in conformal_sets_for(model, np.hstack(blocks), conformal, model_path)]
    out_csv = Path(out_csv or Path(model_path).with_name(Path(model_path).stem + "-predictions.csv"))
    return write_predictions(out_csv, dataset, readable, proba, classes, sets), sorted(set(skipped))


def predictions_path(out_csv: str | Path | None, images: str | Path, model_path: str | Path) -> Path | None:
    """predict's ``out``, checked before any computing: a writable file that is neither the model nor the images
    it reads, and, when it exists already, a ``.csv`` (an earlier predictions file is replaced; a model, an image
    or any other file never is). None keeps the default beside the model."""
    if out_csv is None:
        return None
    out = writable_file(out_csv, "`out`")
    for what, given in (("model", model_path), ("images", images)):
        if out.resolve() == Path(given).expanduser().resolve():
            raise CxrError(f"`out` {out} is the {what} this run reads; give another file for the predictions")
    if out.exists() and out.suffix.lower() != ".csv":
        raise CxrError(f"`out` {out} exists and is not a .csv file; predictions replace only an earlier .csv, give "
                       f"another file")
    return out


def write_predictions(out_csv: Path, dataset: Dataset, readable: list[Sample], proba: np.ndarray,
                      classes: list[str], sets: list[str] | None = None) -> Path:
    """Write predict's CSV atomically: path, sha256, predicted, one probability column per class (and the
    conformal set). A failed write (a full disk) leaves an earlier file as it was and is one error line."""
    try:
        with atomic_path(out_csv) as tmp, open(tmp, "w", newline="", encoding="utf-8",
                                               errors="surrogateescape") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "sha256", "predicted"] + [f"p_{c}" for c in classes] +
                            (["set"] if sets is not None else []))
            for row, (sample, probabilities) in enumerate(zip(readable, proba)):
                writer.writerow([dataset.relative(sample), sample.sha256, classes[int(np.argmax(probabilities))]] +
                                [f"{p:.6f}" for p in probabilities] + ([sets[row]] if sets is not None else []))
    except OSError as exc:
        raise cannot_write_error(out_csv.parent, exc, "output folder", flag="`out`",
                                 kept="no predictions file was written") from None
    return out_csv
