"""Extraction of several backbones in one go, and the backbone table (``api.extract``, ``api.backbone_table``)."""
from __future__ import annotations

import logging
from pathlib import Path

from cxr_transfer.core.errors import CxrError, Int8RefusedError
from cxr_transfer.extract.dataset import Dataset, load_dataset
from cxr_transfer.extract.engine_ray import engine_session
from cxr_transfer.extract.pipeline import (
    ExtractResult,
    ExtractSettings,
    extract_features,
)
from cxr_transfer.extract.registry import BACKBONES, parse_backbone_list
from cxr_transfer.extract.user_onnx import cached_user_models
from cxr_transfer.extract.weights import resolve_weights

log = logging.getLogger(__name__)


def extract_many(data: str | Path | Dataset, backbones: str, settings: ExtractSettings) -> list[ExtractResult]:
    """Extract the dataset with each backbone of a comma list; a --weights file goes to the only backbone.
    The Ray engine connects once (when a backbone has work) and serves every backbone. A backbone whose int8
    model is refused by the fidelity gate does not stop the others: ``Int8RefusedError`` comes at the end,
    carrying the results of those that ran."""
    configs = parse_backbone_list(backbones)
    if settings.weights_file and len(configs) > 1:
        raise CxrError("`weights` FILE names one file: use it with one backbone, or use `weights_dir` for several")
    dataset = data if isinstance(data, Dataset) else load_dataset(data)
    # Resolve every backbone's weights before computing anything: a missing file fails at once.
    for config in configs:
        resolve_weights(config, settings.weights_file, settings.weights_dir, settings.random_weights,
                        allow_download=True)
    results, refused = [], []
    with engine_session(settings.engine):
        for config in configs:
            try:
                results.append(extract_features(dataset, settings.with_backbone(config.name)))
            except Int8RefusedError as exc:   # one backbone's int8 model is refused: the others still run
                refused.append(str(exc))
    if refused:
        done = f" ({', '.join(r.backbone for r in results)} extracted)" if results else ""
        raise Int8RefusedError("; ".join(refused) + done, results)
    return results


def backbone_table(weights_dir: str | Path | None = None, input_size: int | None = None,
                   cache_dir: str | Path | None = None) -> list[dict[str, str]]:
    """One row per registered backbone: input size, preprocessing, feature dim, where its weights are; then
    the user ONNX models wrapped in ``cache_dir``."""
    rows = []
    for config in BACKBONES.values():
        try:
            source = resolve_weights(config, None, weights_dir, allow_download=False)
            found = f"{source.kind}: {source.path.name}" if source.path else source.kind
        except Exception:  # noqa: BLE001 - the table reports, it does not fail
            found = "not found (Keras would download imagenet)"
        rows.append({"backbone": config.name, "input": str(input_size or config.default_input_size),
                     "preprocess": f"{config.keras_module}.preprocess_input ({config.preprocessing})",
                     "dim": str(config.feature_dim), "weights": found})
    for info in cached_user_models(cache_dir) if cache_dir else []:
        rows.append({"backbone": f"onnx:{info['source']}", "input": str(info["default_input_size"]),
                     "preprocess": info["input"], "dim": str(info["feature_dim"]),
                     "weights": f"file sha256 {info['source_sha256'][:16]}"})
    return rows
