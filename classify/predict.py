"""``cli.py predict``: class probabilities for new images from a head saved by ``compare --save``.

Embeddings are computed through the same cache code as extraction, with the backbone, input size and
weights the head was trained on; weights whose sha256 differ from the recorded ones are refused.
"""
from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np

from classify.saved_model import load_head, read_head_info
from core.errors import CxrError
from extract.dataset import Dataset, Sample, hash_samples, images_in_folder
from extract.pipeline import ExtractSettings, load_features
from extract.registry import get_backbone
from extract.weights import resolve_weights


def unlabeled_dataset(images: str | Path, class_names: list[str]) -> Dataset:
    """Every image under a folder (or one file), hashed, with no label."""
    paths = images_in_folder(images)
    root = Path(images).resolve()
    root = root if root.is_dir() else root.parent
    samples = hash_samples([Sample(p, "") for p in paths])
    return Dataset(root.resolve(), samples, list(class_names))


def check_weights(part: dict, settings: ExtractSettings) -> ExtractSettings:
    """Settings for one backbone of the model, after checking the weights found are the ones it used."""
    config = get_backbone(part["backbone"])
    weights_file = settings.weights_file
    source = resolve_weights(config, weights_file, settings.weights_dir, settings.random_weights)
    if source.sha256 != part["weights_sha256"]:
        raise CxrError(f"the model's {config.name} features came from weights with sha256 "
                       f"{part['weights_sha256'][:16]}..., but the weights found here ({source.describe()}) have "
                       f"{source.sha256[:16]}...; pass the same weights with --weights or --weights-dir")
    return replace(settings, backbone=config.name, input_size=int(part["input_size"]), weights_file=weights_file)


def predict_images(images: str | Path, model_path: str | Path, settings: ExtractSettings,
                   out_csv: str | Path | None = None) -> tuple[Path, list[tuple[str, str]]]:
    """Write a CSV (path, sha256, predicted, one probability column per class); return it and skipped files."""
    info = read_head_info(model_path)
    parts = [check_weights(part, settings) for part in info["backbones"]]
    dataset = unlabeled_dataset(images, info["class_names"])
    model, info = load_head(model_path)
    blocks, skipped, readable = [], [], None
    for part_settings in parts:
        features, result = load_features(dataset, part_settings)
        skipped += result.failures
        readable = features.samples if readable is None else readable
        row = {sha: i for i, sha in enumerate(features.sha256)}
        blocks.append(features.embeddings[[row[s.sha256] for s in readable]])
    proba = model.predict_proba(np.hstack(blocks))
    classes = [info["class_names"][int(c)] for c in model.classes_]
    out_csv = Path(out_csv or Path(model_path).with_name(Path(model_path).stem + "-predictions.csv"))
    with open(out_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "sha256", "predicted"] + [f"p_{c}" for c in classes])
        for sample, probabilities in zip(readable, proba):
            writer.writerow([dataset.relative(sample), sample.sha256, classes[int(np.argmax(probabilities))]] +
                            [f"{p:.6f}" for p in probabilities])
    return out_csv, sorted(set(skipped))
