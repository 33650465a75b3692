"""The library API: the functions the command line calls, importable from ``cxr_transfer``.

    import cxr_transfer as cxr
    features = cxr.embed_folder("../shared/data/covid19-xray", "vgg16", weights_dir="../shared/weights")
    features.embeddings.shape          # (425, 512), rows aligned with features.samples
    result = cxr.compare("../shared/data/covid19-xray", "vgg16", heads="logreg,rbfsvm", weights_dir="../shared/weights")
    result.summary_lines()             # what the CLI prints; in memory, no run folder is written
    check = cxr.validate("../shared/data/covid19-xray", "../shared/data/external-dev", "vgg16", heads="logreg",
                         subgroups="source,age_group", weights_dir="../shared/weights", out_dir="runs")
    check.run_dir                      # runs/validate-<time>-<random>: report.md, results.json, ...

Every function takes the shared backbone settings either as keywords (``weights``/``weights_file``,
``weights_dir``, ``random_weights``, ``input_size``, ``cache_dir``, ``threads``, ``progress``) or as one
``common=BackboneSettings(...)``; the remaining keywords are the stage's own settings (see ``CompareSettings``,
``FinetuneSettings``, ``AuditSettings``). ``compare`` and ``validate`` return their result in memory and write
a run folder only when given ``out_dir``. Unknown keywords raise ``TypeError``; problems with the data or the
weights raise ``CxrError`` (a ``ValueError``). A backbone may be your own ONNX model: ``"onnx:PATH"`` (registered
here with 3 channels and no preprocessing) or the name ``register_onnx_backbone(path, spec)`` returned, in this
process or, with the same ``cache_dir``, an earlier one (``register_user_models``).

``import cxr_transfer`` loads this module, so each function imports the stage it calls inside its body:
importing the package loads no scikit-learn, OpenCV, onnxruntime or TensorFlow (tests/test_package.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from cxr_transfer.core.params import COUNT, check_int, names_argument, path_arguments
from cxr_transfer.core.settings import DEFAULT_CACHE_DIR, BackboneSettings

if TYPE_CHECKING:
    from cxr_transfer.audit.run import AuditReport
    from cxr_transfer.classify.compare import CompareResult
    from cxr_transfer.deploy.export_model import ExportedModel
    from cxr_transfer.validation.run import ValidateResult
    from cxr_transfer.validation.shift import ShiftResult
    from cxr_transfer.explain.run import ExplainResult
    from cxr_transfer.extract.export_table import ExportResult
    from cxr_transfer.extract.pipeline import FeatureSet
    from cxr_transfer.extract.registry import BackboneConfig
    from cxr_transfer.extract.user_onnx import InputSpec
    from cxr_transfer.tracking.mlflow_runs import TrackingSettings

DATA_ENV, WEIGHTS_ENV = "CXR_DATA", "CXR_WEIGHTS_DIR"
SHARED_DATASET = Path("shared") / "data" / "covid19-xray"
SAMPLE_DATA = Path(__file__).resolve().parent / "data" / "sample"   # package data, installed with the code


def default_location(what: str) -> Path | None:
    """Where the command line's ``--data`` / ``--weights-dir`` point when not given (``what``: "data" or
    "weights"): $CXR_DATA / $CXR_WEIGHTS_DIR, else the project's ``shared/`` in the current directory or beside it
    (``../shared``); for data, else the bundled sample."""
    env = os.environ.get(DATA_ENV if what == "data" else WEIGHTS_ENV)
    if env:
        return Path(env).expanduser()
    shared = next((base / "shared" for base in (Path.cwd(), Path.cwd().parent) if (base / SHARED_DATASET).is_dir()),
                  None)
    if what == "data":
        return shared / "data" / "covid19-xray" if shared else SAMPLE_DATA
    return shared / "weights" if shared and (shared / "weights").is_dir() else None


def _first_backbone(name: str | None) -> dict[str, str]:
    return {"backbone": name} if name else {}


class PredictResult(NamedTuple):
    """What ``predict`` wrote: the CSV and the (path, reason) of every skipped file (unpacks as a pair)."""

    csv_path: Path
    skipped: list[tuple[str, str]]

    def summary_lines(self) -> list[str]:
        return ([f"skipped {path}: {reason.split(': ', 1)[-1]}" for path, reason in self.skipped]
                + [f"predictions: {self.csv_path}"])


@dataclass
class ExtractRun:
    """What ``extract`` did: one ExtractResult per backbone, and the dataset's left-out entries."""

    results: list
    skipped_summary: list[str]

    def summary_lines(self) -> list[str]:
        return self.skipped_summary + [line for result in self.results for line in result.summary_lines()]


@dataclass
class SideBySide:
    """The ``report`` of run folders side by side: table rows, notes and the Markdown file written."""

    rows: list[dict[str, str]]
    notes: list[str]
    path: Path

    def summary_lines(self) -> list[str]:
        from cxr_transfer.core.tables import text_table

        return [text_table(self.rows)] + [f"note: {note}" for note in self.notes] + ["", f"report: {self.path}"]


def settings_classes() -> dict[str, type]:
    """The settings dataclasses behind the commands, by name: their fields' ``param`` metadata (constraint,
    default, help) is what the command line's flags are made of (``cli.py``)."""
    from cxr_transfer.audit.run import AuditSettings
    from cxr_transfer.classify.compare import CompareSettings
    from cxr_transfer.extract.engine import EngineSettings
    from cxr_transfer.extract.pipeline import ExtractSettings
    from cxr_transfer.extract.user_onnx import InputSpec
    from cxr_transfer.finetune.settings import FinetuneSettings
    from cxr_transfer.tracking.mlflow_runs import TrackingSettings
    from cxr_transfer.validation.run import ValidateSettings
    from cxr_transfer.validation.shift import ShiftSettings

    return {"backbone": BackboneSettings, "extract": ExtractSettings, "engine": EngineSettings,
            "onnx": InputSpec, "compare": CompareSettings, "validate": ValidateSettings,
            "finetune": FinetuneSettings, "audit": AuditSettings, "tracking": TrackingSettings,
            "shift": ShiftSettings}


def _tracking(mlflow: str | bool | None, experiment: str | None) -> TrackingSettings:
    """The ``mlflow`` / ``experiment`` arguments as TrackingSettings, refused before any computing when MLflow
    is asked for and not installed."""
    from cxr_transfer.tracking.mlflow_runs import TrackingSettings, require_mlflow

    tracking = TrackingSettings(mlflow, experiment)
    require_mlflow(tracking)
    return tracking


def register_onnx_backbones(backbones: str, *, channels: int = 3, preprocess: str = "none",
                            mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                            input_size: int | None = None, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> str:
    """The command line's registration: every ``onnx:PATH`` of ``backbones`` wrapped with these input settings
    (``register_user_models``); a list without one is returned as it is."""
    from cxr_transfer.extract.registry import is_user_onnx, split_backbone_spec
    from cxr_transfer.extract.user_onnx import InputSpec

    if not any(is_user_onnx(item) for item in split_backbone_spec(backbones)):
        return backbones
    return register_user_models(backbones, InputSpec(channels, preprocess, mean, std), input_size, cache_dir)


class BackboneTable(list):
    """Rows of ``backbone_table`` (a list of dicts) that print as a text table."""

    def summary_lines(self) -> list[str]:
        from cxr_transfer.core.tables import text_table

        return [text_table(self)]


def backbone_table(weights_dir: str | Path | None = None, input_size: int | None = None,
                   cache_dir: str | Path | None = DEFAULT_CACHE_DIR) -> BackboneTable:
    """One row per backbone (input size, preprocessing, feature dim, where its weights were found), then the
    user ONNX models wrapped in ``cache_dir``."""
    from cxr_transfer.extract.registry import BACKBONES
    from cxr_transfer.extract.user_onnx import cached_user_models
    from cxr_transfer.extract.weights import resolve_weights

    rows = BackboneTable()
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


@path_arguments("data")
def extract(data: str | Path, backbones: str = "vgg16", *, common: BackboneSettings | None = None,
            **options: Any) -> ExtractRun:
    """Embeddings of a dataset by each backbone of a comma list, into the HDF5 cache (nothing else written).

    Stage keywords: ``batch_size``, ``engine=EngineSettings(...)`` and the other ``ExtractSettings`` fields.
    Every backbone's weights are found before anything is computed; the Ray engine connects once and serves
    every backbone. A backbone whose int8 model fails the fidelity gate does not stop the others:
    ``Int8RefusedError`` comes at the end, carrying the results of those that ran.
    """
    from cxr_transfer.core.errors import CxrError, Int8RefusedError
    from cxr_transfer.extract.dataset import load_dataset
    from cxr_transfer.extract.engine import check_engine
    from cxr_transfer.extract.engine_ray import engine_session
    from cxr_transfer.extract.pipeline import ExtractSettings, extract_features
    from cxr_transfer.extract.registry import parse_backbone_list
    from cxr_transfer.extract.weights import resolve_weights

    settings = ExtractSettings.from_options(common, **options)
    registered, backbones = _with_user_models(settings.common, names_argument("backbones", backbones))
    settings, configs = replace(settings, common=registered), parse_backbone_list(backbones)
    if settings.weights_file and len(configs) > 1:
        raise CxrError("`weights` FILE names one file: use it with one backbone, or use `weights_dir` for several")
    check_engine(settings.engine)   # Ray missing: say how to install it before reading any data
    dataset = load_dataset(data)
    for config in configs:
        resolve_weights(config, settings.weights_file, settings.weights_dir, settings.random_weights)
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
    return ExtractRun(results, dataset.skipped_summary())


def report_runs(runs: list[str | Path], out: str | Path = Path("runs") / "side-by-side.md",
                head: str | None = None) -> SideBySide:
    """Fine-tuned models and heads side by side on the same test images; writes the Markdown report."""
    from cxr_transfer.classify.side_by_side import side_by_side, write_side_by_side

    rows, notes = side_by_side(runs, head=head)
    return SideBySide(rows, notes, write_side_by_side(runs, out, head=head))


def audit_pointer(data: str | Path) -> str | None:
    """The audit's one-line pointer for this dataset, when an audit of it exists (compare and finetune show it)."""
    from cxr_transfer.audit.run import audit_pointer as pointer
    from cxr_transfer.extract.dataset import load_dataset

    return pointer(load_dataset(data))


def register_user_models(backbones: str, spec: InputSpec | None = None, input_size: int | None = None,
                         cache_dir: str | Path = DEFAULT_CACHE_DIR) -> str:
    """``backbones`` (a name or comma list) with its user ONNX models registered in this process.

    ``onnx:PATH`` becomes the name of the model registered from PATH: the one this process registered, or with
    ``spec`` given (or none registered) ``register_onnx_backbone(PATH, spec or InputSpec(), input_size,
    cache_dir)``. A user model's name this process has not registered is registered from ``cache_dir``'s
    persisted registrations (``register_cached_onnx_backbone``). Other names are kept as they are.
    """
    from cxr_transfer.extract.registry import (USER_ONNX_NAME_PREFIX, USER_ONNX_PREFIX, get_backbone, is_user_onnx,
                                               registered_backbones, split_backbone_spec)
    from cxr_transfer.extract.user_onnx import InputSpec, register_cached_onnx_backbone, register_onnx_backbone

    names = []
    for item in split_backbone_spec(backbones):
        if is_user_onnx(item):
            path = Path(item[len(USER_ONNX_PREFIX):]).expanduser().resolve()
            known = [c.name for c in registered_backbones().values() if c.is_user_onnx and c.source_path == path]
            item = get_backbone(item).name if spec is None and known else \
                register_onnx_backbone(path, spec or InputSpec(), input_size, cache_dir)
        elif item.startswith(USER_ONNX_NAME_PREFIX) and item not in registered_backbones():
            item = register_cached_onnx_backbone(item, cache_dir)
        names.append(item)
    return ",".join(names)


def _with_user_models(common: BackboneSettings, backbones: str | None = None) -> tuple[BackboneSettings, str]:
    """(``common`` with the first of ``backbones`` as its backbone, ``backbones`` with their user ONNX models
    registered with its input size and cache, by ``register_user_models``); ``backbones`` defaults to
    ``common.backbone``."""
    names = register_user_models(common.backbone if backbones is None else backbones, None, common.input_size,
                                 common.cache_dir)
    return replace(common, backbone=names.split(",")[0]), names


def _needs_out_dir(out_dir: str | Path | None, asked: dict[str, bool]) -> None:
    """CxrError when settings that write into a run folder (``asked``: setting -> given) come without
    ``out_dir``."""
    given = [name for name, on in asked.items() if on]
    if out_dir is None and given:
        from cxr_transfer.core.errors import CxrError

        raise CxrError(f"out_dir is needed for {' and '.join(given)}: they write into a run folder; give out_dir "
                       f"(e.g. out_dir='runs'), or leave them out to get the result in memory only", param="out_dir")


def list_backbones() -> list[BackboneConfig]:
    """The registry of the paper's nine backbones (input size, preprocessing, feature dimension, weight file)."""
    from cxr_transfer.extract.registry import BACKBONES

    return list(BACKBONES.values())


@path_arguments("data")
def embed_folder(data: str | Path, backbone: str = "vgg16", *, weights: str | Path | None = None,
                 weights_dir: str | Path | None = None, random_weights: bool = False, input_size: int | None = None,
                 cache_dir: str | Path = DEFAULT_CACHE_DIR, batch_size: int = 16, threads: int | None = None,
                 progress: bool = False, engine: str = "local", address: str | None = None,
                 workers: int | None = None, threads_per_worker: int = 1, shard_size: int = 256) -> FeatureSet:
    """Embeddings of every readable image of a dataset folder or CSV, through the HDF5 cache.

    Returns a ``FeatureSet``: ``embeddings`` (float32, one row per readable image), ``samples`` (path, label,
    split, group, sha256), ``labels``, ``class_names``. Only images not cached yet are computed, in this process
    (``engine="local"``) or on a Ray cluster (``engine="ray"`` with ``address``, ``workers``,
    ``threads_per_worker``, ``shard_size``; docs/distributed.md), into the same cache.
    """
    from cxr_transfer.extract.dataset import load_dataset
    from cxr_transfer.extract.engine import EngineSettings, check_engine
    from cxr_transfer.extract.pipeline import ExtractSettings, load_features
    from cxr_transfer.extract.registry import get_backbone

    common = BackboneSettings(backbone=backbone, weights_file=weights, weights_dir=weights_dir,
                              random_weights=random_weights, input_size=input_size, cache_dir=Path(cache_dir),
                              threads=threads, progress=progress)   # arguments first (types, bounds), data second
    engine_settings = EngineSettings(name=engine, address=address, workers=workers,
                                     threads_per_worker=threads_per_worker, shard_size=shard_size)
    check_engine(engine_settings)
    common, _ = _with_user_models(common)
    get_backbone(common.backbone)
    features, _ = load_features(load_dataset(data), ExtractSettings(common=common, batch_size=batch_size,
                                                                    engine=engine_settings))
    return features


def embed_images(images: np.ndarray, backbone: str = "vgg16", *, weights: str | Path | None = None,
                 weights_dir: str | Path | None = None, random_weights: bool = False, input_size: int | None = None,
                 cache_dir: str | Path = DEFAULT_CACHE_DIR, batch_size: int = 16,
                 threads: int | None = None) -> np.ndarray:
    """Embeddings of images already in memory: uint8 (N, H, W, 3) RGB or (N, H, W) grey -> float32 (N, dim).

    No embedding cache and no image files: each image is stretched to the network's input with the same rule
    as image files (``extract.images.resize_square``). The ONNX export itself is cached in ``cache_dir/onnx``.
    """
    from cxr_transfer.extract.onnx_export import get_onnx_backbone
    from cxr_transfer.extract.registry import get_backbone
    from cxr_transfer.extract.runtime import OnnxEmbedder, embed_pixels, rgb_array
    from cxr_transfer.extract.weights import resolve_weights

    images = rgb_array(images)   # before any export
    check_int("batch_size", batch_size, COUNT)
    # the shared settings check backbone, input_size (1..MAX_INPUT_SIZE) and threads before any export
    common, _ = _with_user_models(BackboneSettings(backbone=backbone, weights_file=weights, weights_dir=weights_dir,
                                                   random_weights=random_weights, input_size=input_size,
                                                   cache_dir=Path(cache_dir), threads=threads))
    config = get_backbone(common.backbone)
    size = config.input_size(common.input_size)
    source = resolve_weights(config, weights, weights_dir, random_weights)
    embedder = OnnxEmbedder(get_onnx_backbone(config, size, source, common.cache_dir), threads)
    return embed_pixels(embedder, images, batch_size)


@path_arguments("data", "out")
def export_embeddings(data: str | Path, backbone: str = "vgg16", *, out: str | Path, format: str = "parquet",
                      overwrite: bool = False, common: BackboneSettings | None = None, **options: Any) -> ExportResult:
    """One backbone's cached embeddings of a dataset as Parquet (one file) or npy (a folder), for other tools.

    Embeddings the cache lacks are computed first, as ``compare`` does; the HDF5 cache stays the source of
    truth. Parquet: columns sha256, path, label, split, group and embedding (fixed-size list of float32), the
    backbone, weights, precision and cache path in the schema metadata; npy: ``embeddings.npy``, ``rows.csv``
    and ``metadata.json`` (``extract/export_table.py``). An existing ``out`` is refused unless ``overwrite``.
    Stage keywords: ``batch_size`` and the other ``ExtractSettings`` fields.
    """
    from cxr_transfer.core.errors import CxrError
    from cxr_transfer.extract.export_table import export_embeddings as export_table
    from cxr_transfer.extract.pipeline import ExtractSettings
    from cxr_transfer.extract.registry import parse_backbone_list

    if not isinstance(backbone, str) or not backbone.strip():
        raise TypeError(f"backbone must be a non-empty str, got {backbone!r} instead")
    settings = ExtractSettings.from_options(common, **_first_backbone(backbone.strip()), **options)
    registered, names = _with_user_models(settings.common)
    if len(parse_backbone_list(names)) != 1:
        raise CxrError(f"`backbone`: an export holds one backbone, got {backbone!r} instead; "
                       f"export each backbone to its own `out`")
    return export_table(data, out, replace(settings, common=registered), format, overwrite)


def _workflow_settings(cls: type, name: str, common: BackboneSettings | None, backbones: str,
                       options: dict[str, Any], *, backbones_param: str = "backbones", heads: str | None = None,
                       **given: Any) -> Any:
    """A workflow's settings (compare, validate, shift) from flat keywords: the extraction keywords go to
    ``ExtractSettings`` (the backbone list's user ONNX models registered, the first as its backbone), the rest
    to ``cls``, with ``backbones`` and ``heads`` when given ``heads``; an unknown keyword is a TypeError."""
    from cxr_transfer.extract.pipeline import ExtractSettings

    backbones = names_argument(backbones_param, backbones)   # arguments first
    lists = {} if heads is None else {"heads": names_argument("heads", heads)}
    extract_keywords = {f.name for f in fields(ExtractSettings)} | {f.name for f in fields(BackboneSettings)}
    extract = ExtractSettings.from_options(common, **{k: options.pop(k) for k in list(options)
                                                      if k in extract_keywords | {"weights"}})
    unknown = sorted(set(options) - {f.name for f in fields(cls)} - {"data", "external", "target", "model", "extract"})
    if unknown:
        raise TypeError(f"unknown setting(s) {', '.join(unknown)} for {name}")
    registered, backbones = _with_user_models(extract.common, backbones)
    if lists:
        lists["backbones"] = backbones
    return cls(extract=replace(extract, common=registered), **lists, **given, **options)


@path_arguments("data", "out_dir")
def compare(data: str | Path, backbones: str = "vgg16", heads: str = "all", *, out_dir: str | Path | None = None,
            run_name: str | None = None, mlflow: str | bool | None = None, experiment: str | None = None,
            common: BackboneSettings | None = None, **options: Any) -> CompareResult:
    """Score scikit-learn heads on cached embeddings under one protocol (``protocol='paper'|'cv'|'holdout'``).

    Returns the ``CompareResult`` (every evaluation, the summary table, the run record; ``summary_lines()``
    is what the CLI prints). Nothing is written but the embedding cache unless ``out_dir`` is given: then the
    run folder (report.md, results.json, results.csv, plots, record.json) is written under it, named
    ``run_name`` or ``compare-<protocol>-<time>-<random>``, and ``result.run_dir`` is set; ``out_dir`` and
    ``run_name`` are checked before any computing. ``save=True`` (one ``.joblib`` per head) needs ``out_dir``.
    Stage keywords: those of ``CompareSettings`` (protocol, seed, seeds, folds, repeats, group_by, tune, save,
    head, ...) and ``batch_size`` for the extraction. ``mlflow`` (a tracking URI, or True for MLflow's default)
    logs the result to MLflow afterwards, in ``experiment`` (default: the dataset folder's name): a parent run
    with the run folder as artifacts, one child run per backbone and head, and with ``save`` each head as an
    MLflow model (``tracking/``); an MLflow failure is one line of ``summary_lines()``, never an exception.
    """
    from cxr_transfer.classify.compare import CompareSettings, evaluate_compare, run_compare
    from cxr_transfer.extract.registry import parse_backbone_list
    from cxr_transfer.tracking.mlflow_runs import track_result

    settings = _workflow_settings(CompareSettings, "compare", common, backbones, options, heads=heads,
                                  data=Path(data))
    parse_backbone_list(settings.backbones)
    _needs_out_dir(out_dir, {"save=True": settings.save, f"run_name={run_name!r}": run_name is not None})
    tracking = _tracking(mlflow, experiment)
    result = evaluate_compare(settings) if out_dir is None else run_compare(settings, out_dir, run_name)
    if tracking.enabled:
        track_result(result, tracking)
    return result


@path_arguments("data")
def finetune_backbone(data: str | Path, backbone: str = "vgg16", *, mlflow: str | bool | None = None,
                      experiment: str | None = None, common: BackboneSettings | None = None,
                      **options: Any) -> Path:
    """The paper's frozen-body + dense-head Keras training; returns the run folder.

    Defaults are the paper's (input 224, 35 epochs, batch 8, Adam 1e-3); stage keywords are those of
    ``FinetuneSettings`` (epochs, batch_size, lr, seed, fast, copies, group_by, out_dir, run_dir, ...).
    ``mlflow`` / ``experiment``: as in ``compare``; the line saying what was logged (or not) is printed on
    stderr with finetune's progress lines (``progress=False``: logged, a failure as a warning).
    """
    from cxr_transfer.finetune.train import FinetuneSettings, run_finetune
    from cxr_transfer.tracking.mlflow_runs import track_finetune

    if common is None:
        options = {"input_size": 224, **options}   # the paper's size for all nine
    settings = FinetuneSettings.from_options(common, data=data, **_first_backbone(backbone), **options)
    tracking = _tracking(mlflow, experiment)
    run_dir = run_finetune(replace(settings, common=_with_user_models(settings.common)[0]))
    if tracking.enabled:
        track_finetune(run_dir, data, tracking, settings.progress)
    return run_dir


@path_arguments("data")
def audit_dataset(data: str | Path, backbone: str = "vgg16", *, common: BackboneSettings | None = None,
          **options: Any) -> AuditReport:
    """Duplicates, patient leakage and acquisition / pixel shortcuts of a dataset; writes audit.md."""
    from cxr_transfer.audit.run import AuditSettings, run_audit

    settings = AuditSettings.from_options(common, data=data, **_first_backbone(backbone), **options)
    return run_audit(replace(settings, common=_with_user_models(settings.common)[0]))


@path_arguments("images", "model", "out")
def predict(images: str | Path, model: str | Path, *, out: str | Path | None = None, precision: str | None = None,
            conformal: float | None = None, common: BackboneSettings | None = None,
            **options: Any) -> PredictResult:
    """Class probabilities for an image file or folder from a saved head (.joblib) or a finetune run folder.

    Writes a CSV (path, sha256, predicted, one probability column per class) and returns it with the
    (path, reason) of every skipped file. The model's backbone, input size and precision (float32 / int8) come
    from the model itself; a ``precision`` other than the one it was trained on is refused.
    ``conformal=ALPHA`` adds a ``set`` column (classes joined by '|'), for heads saved by ``validate(save=True)``
    with that alpha. ``model`` may also be a file ``export_model`` wrote (refused when its bytes changed).
    """
    from cxr_transfer.classify.predict import predict_images
    from cxr_transfer.core.errors import CxrError
    from cxr_transfer.deploy.export_model import is_exported_model, predict_exported
    from cxr_transfer.extract.pipeline import ExtractSettings

    settings = ExtractSettings.from_options(common, **options)
    if is_exported_model(model):   # one file from export_model: checked against its model_sha256, then run
        if conformal is not None or precision not in (None, "float32"):
            raise CxrError(f"{model}: an exported model gives probabilities only (its precision is its own); leave "
                           f"out `conformal` and `precision`")
        return PredictResult(*predict_exported(images, model, settings, out))
    return PredictResult(*predict_images(images, model, settings, out, precision, conformal=conformal))


@path_arguments("model", "out", "audit")
def export_model(model: str | Path, out: str | Path, *, precision: str | None = None, backbone: str | None = None,
                 audit: str | Path | None = None, common: BackboneSettings | None = None,
                 **options: Any) -> ExportedModel:
    """One ONNX file from a saved head (.joblib, float32 or int8) and its backbone, or from a fine-tuned model (its
    run folder): uint8 RGB images (N, S, S, 3) at the model's input size in, ``probabilities`` (float32, one column
    per class) and ``label`` (class name) out; and its model card (``NAME.model-card.md``) beside it.

    The file carries its description in ONNX ``metadata_props`` (class names, input size and resize rule,
    backbone and weights sha256, head and its joblib sha256, project version, training data fingerprint, and the
    ``evaluation`` of the run that saved the head: internal/external accuracy with intervals, ECE, flagged
    subgroups, the conformal threshold) and a ``model_sha256`` that ``predict`` checks. The card's audit findings
    come from ``audit`` (an audit folder), else the newest audit of the training data under runs/. ``out`` is
    checked before any work; a head trained on other weights, or a ``backbone``/``input_size``/``precision``
    other than the model's, is refused, and so is a head skl2onnx cannot convert. Runs without this package:
    ``examples/read_model.py``.
    """
    from cxr_transfer.deploy.export_model import export_model as export
    from cxr_transfer.extract.pipeline import ExtractSettings

    return export(model, out, ExtractSettings.from_options(common, **options), precision, backbone, audit)


@path_arguments("images", "model", "out")
def explain_images(images: str | Path, model: str | Path, *, out: str | Path | None = None, method: str = "auto",
            pngs: bool = True, precision: str | None = None, overwrite: bool = False,
            common: BackboneSettings | None = None, **options: Any) -> ExplainResult:
    """Heatmaps of the evidence for each image's predicted class, and its share in the audit's regions.

    model: a saved head (.joblib: exact CAM when linear, else occlusion) or a finetune run folder (Grad-CAM);
    ``method`` forces cam, occlusion or gradcam. Writes one PNG per image and explain.csv (path, sha256,
    predicted, probability, method, center/middle/border share) into ``out`` (default beside the model).
    A head runs at the precision it was trained on (an int8 head by occlusion through its int8 model); a
    ``precision`` other than that one is refused. ``out`` is checked before the model is loaded; a folder that
    already holds files is refused unless ``overwrite`` (which replaces an earlier explain run there).
    """
    from cxr_transfer.explain.run import run_explain
    from cxr_transfer.extract.pipeline import ExtractSettings

    return run_explain(images, model, ExtractSettings.from_options(common, **options), out, method, pngs,
                          precision, overwrite)


@path_arguments("data", "external", "out_dir")
def validate(data: str | Path, external: str | Path, backbones: str = "vgg16", heads: str = "logreg", *,
             out_dir: str | Path | None = None, run_name: str | None = None, mlflow: str | bool | None = None,
             experiment: str | None = None, common: BackboneSettings | None = None,
             **options: Any) -> ValidateResult:
    """Internal (patient-grouped out-of-fold) vs external accuracy, subgroups, calibration and conformal sets.

    Fits each head on TRAIN only; EXT is only predicted. Returns the ``ValidateResult`` (per-model results,
    verdict, notes, warnings, the run record; ``summary_lines()`` is what the CLI prints). Nothing is written
    but the embedding and hash caches unless ``out_dir`` is given: then the run folder (report.md,
    results.json, results.csv, accuracy.png, reliability.png, external_predictions.csv, record.json) is
    written under it, named ``run_name`` or ``validate-<time>-<random>``, and ``result.run_dir`` is set;
    ``out_dir`` and ``run_name`` are checked before any computing. ``save=True`` (one ``.joblib`` per model)
    and ``explain=N`` (heatmaps of the N most confident external errors) need ``out_dir``. Stage keywords:
    those of ``ValidateSettings`` (group_by, subgroups, alpha, calibrate, folds, n_boot, seed, save, explain,
    ...) and ``batch_size`` for the extraction. ``mlflow`` / ``experiment``: as in ``compare`` (one child run
    per model: internal and external values, the gap, ECE, conformal coverage).
    """
    from cxr_transfer.tracking.mlflow_runs import track_result
    from cxr_transfer.validation.run import ValidateSettings, evaluate_validate, run_validate

    settings = _workflow_settings(ValidateSettings, "validate", common, backbones, options, heads=heads,
                                  data=Path(data), external=Path(external))
    _needs_out_dir(out_dir, {"save=True": settings.save, f"explain={settings.explain}": bool(settings.explain),
                             f"run_name={run_name!r}": run_name is not None})
    tracking = _tracking(mlflow, experiment)
    result = evaluate_validate(settings) if out_dir is None else run_validate(settings, out_dir, run_name)
    if tracking.enabled:
        track_result(result, tracking)
    return result


@path_arguments("data", "target", "model", "out_dir")
def shift_check(data: str | Path, target: str | Path, backbone: str = "vgg16", *, model: str | Path | None = None,
                out_dir: str | Path | None = None, run_name: str | None = None, mlflow: str | bool | None = None,
                experiment: str | None = None, common: BackboneSettings | None = None,
                **options: Any) -> ShiftResult:
    """Will a model trained on ``data`` work on the images of ``target`` (no labels needed)?

    Two-sample tests of TRAIN vs TARGET on cached embeddings (domain classifier AUC and MMD, permutation
    p-values, ``shift_detected`` at ``alpha``), per-subgroup shift (``subgroups``: TARGET manifest columns),
    TARGET ranked by atypicality and, with ``model`` (a head saved by compare or validate ``save``; its own
    backbone and weights are used), the expected accuracy by ATC and DoC with bootstrap intervals, calibrated on
    TRAIN out-of-fold predictions (the head's estimator refitted in patient-grouped folds). Returns the
    ``ShiftResult`` (``results`` is results.json's content, ``summary_lines()`` what the CLI prints); the run
    folder (report.md, results.json, record.json, atypical.png, atypical.csv) is written only with ``out_dir``.
    Stage keywords: those of ``ShiftSettings`` (subgroups, alpha, permutations, folds, n_boot, top, seed) and
    ``batch_size``. ``mlflow`` / ``experiment``: as in ``compare`` (the tests in the parent run, one child run per
    accuracy estimator).
    """
    from cxr_transfer.tracking.mlflow_runs import track_result
    from cxr_transfer.validation.shift import ShiftSettings, evaluate_shift, run_shift

    settings = _workflow_settings(ShiftSettings, "shift_check", common, backbone, options,
                                  backbones_param="backbone", data=Path(data), target=Path(target),
                                  model=Path(model) if model is not None else None)
    _needs_out_dir(out_dir, {f"run_name={run_name!r}": run_name is not None})
    tracking = _tracking(mlflow, experiment)
    result = evaluate_shift(settings) if out_dir is None else run_shift(settings, out_dir, run_name)
    if tracking.enabled:
        track_result(result, tracking)
    return result
