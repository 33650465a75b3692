"""One ONNX file from X-ray pixels to class probabilities: a saved head joined with its backbone's ONNX export.

The file (``export_model``) is one graph: ``image`` (uint8, N x S x S x 3 RGB, S the backbone's input size) is
cast to float32 and goes through the backbone's cached, verified ONNX export (its Keras preprocessing is inside),
the embedding is cast to float64 and goes through the head converted by skl2onnx, and the graph ends in
``probabilities`` (float32, N x classes, in the order of the ``class_names`` property) and ``label`` (the class
name of the largest probability, a string per image). Images are read and resized by the project's rule
(``extract.images``) before they enter it; the ``resize_rule`` property says how.

The file describes itself in ONNX ``metadata_props`` (``DESCRIBED``). The last one, ``model_sha256``, is the
sha256 of every byte of the file before it: it is written as the file's last 82 bytes (protobuf field 14 of the
ModelProto, appended after the rest is serialized; a parser reads fields in any order), so any reader can check
it with hashlib alone (``examples/read_model.py``) and ``read_exported`` refuses a changed file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import GridSearchCV

from cxr_transfer.classify.conformal import ConformalHead
from cxr_transfer.classify.heads import CappedPCA
from cxr_transfer.classify.predict import (check_input_size, check_weights, predictions_path, unlabeled_dataset,
                                           write_predictions)
from cxr_transfer.classify.saved_model import MODEL_JSON, SavedFinetuned, load_saved_model
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.io import atomic_path, atomic_write, cannot_write_error, remove_leftovers
from cxr_transfer.core.locking import file_lock
from cxr_transfer.core.outputs import writable_file
from cxr_transfer.core.version import __version__
from cxr_transfer.deploy.evidence import audit_evidence, finetune_evidence, run_evidence
from cxr_transfer.deploy.model_card import model_card
from cxr_transfer.extract.images import decoded_batches
from cxr_transfer.extract.onnx_export import OnnxBackbone, get_onnx_backbone
from cxr_transfer.extract.pipeline import ExtractSettings
from cxr_transfer.extract.quantize import get_int8_backbone
from cxr_transfer.extract.runtime import OnnxEmbedder, open_session
from cxr_transfer.extract.weights import WeightsSource, resolve_weights

FORMAT = "cxr-transfer/model/1"
HASH_KEY = "model_sha256"
HASH_PREFIX = b"\x72\x50\x0a\x0c" + HASH_KEY.encode("ascii") + b"\x12\x40"
"""The bytes before the hex digest at the end of an exported file: field 14 (metadata_props), length 80, then the
entry's key (field 1, 12 bytes) and value (field 2, 64 bytes)."""
DESCRIBED = ("format", "class_names", "input", "resize_rule", "backbone", "precision", "backbone_weights_sha256",
             "backbone_onnx_sha256", "head", "head_file", "head_joblib_sha256", "training",
             "training_data_fingerprint", "project_version", "evaluation")
"""The ``metadata_props`` every exported file carries (then ``model_sha256``, last)."""
RESIZE_RULE = ("Pillow decode; EXIF orientation applied; JPEG decoded in draft mode at no less than SxS; 16-bit grey "
               "scaled by 255/65535 and rounded; float images stretched min..max to 0..255; transparency composited "
               "onto black; palette/CMYK/other modes converted to RGB; grey copied to 3 channels; stretched to SxS "
               "with no crop or padding, OpenCV INTER_AREA when H*W >= S*S, else INTER_LINEAR "
               "(cxr_transfer.extract.images.read_rgb)")
MODEL_CARD_SUFFIX = ".model-card.md"
FIDELITY = 1e-5
"""Largest difference allowed, at export, between the file's probabilities and the two-stage path's."""


@dataclass(frozen=True)
class ExportedModel:
    """What ``export_model`` wrote: the file, what it holds, and its largest probability difference from the
    two-stage path (backbone session, then the scikit-learn head) on a check batch."""

    path: Path
    head: str
    backbone: str
    input_size: int
    class_names: list[str]
    max_difference: float
    sha256: str
    model_card: Path
    precision: str = "float32"
    evaluated: bool = False     # the run record behind the head was found (the card has its results)
    audited: bool = False       # an audit of the training data was found (the card has its findings)

    def summary_lines(self) -> list[str]:
        missing = [what for what, found in (("no run record beside the head", self.evaluated),
                                            ("no audit of the training data", self.audited)) if not found]
        return [f"exported {self.backbone} ({self.input_size} px, {self.precision}) + {self.head}: uint8 images -> "
                f"probabilities over {', '.join(self.class_names)}; differs from the two-stage path by "
                f"{self.max_difference:.1e}",
                f"model: {self.path} (model_sha256 {self.sha256[:16]}...)",
                f"model card: {self.model_card}" + (f" ({'; '.join(missing)}: see the card)" if missing else "")]


def export_model(model_path: str | Path, out: str | Path, settings: ExtractSettings, precision: str | None = None,
                 backbone: str | None = None, audit: str | Path | None = None) -> ExportedModel:
    """Write a saved head (``.joblib`` from compare or validate ``save``) and its backbone, or a fine-tuned model
    (its run folder), as one ONNX file ``out``, with its model card beside it (``card_path``).

    The backbone, input size, weights and precision (float32 or int8) are the head's own: weights found here with
    another sha256, or a ``backbone``, ``input_size`` or ``precision`` other than the head's, are refused.
    ``out`` (a ``.onnx`` file) and the card beside it are checked before any work. A head skl2onnx cannot convert
    is refused, naming it. The evidence (metadata ``evaluation`` and the card) comes from the run folder the head
    was saved in and from ``audit`` (an audit folder; default: the newest audit of the training data under runs/).
    """
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise CxrError(f"`out` must be a .onnx file, got {str(out)!r} instead")
    out = writable_file(out, "`out`")   # before any work
    card = writable_file(card_path(out), "`out`")
    saved = load_saved_model(model_path)
    if isinstance(saved, SavedFinetuned):
        built = _finetuned_parts(saved, settings, precision, backbone)
    else:
        built = _head_parts(saved, Path(model_path), settings, precision, backbone)
    metadata, joined = built.metadata, built.graph
    trained = json.loads(metadata["training"])
    audit_found = audit_evidence(audit, trained.get("dataset") or (built.evidence or {}).get("train", {}).get("root"),
                                 metadata["training_data_fingerprint"] or None)
    summary = {k: v for k, v in (built.evidence or {}).items() if k not in ("subgroups", "verdict")}
    metadata["evaluation"] = json.dumps(summary or None, sort_keys=True, default=str)
    for key in DESCRIBED:
        joined.metadata_props.add(key=key, value=metadata[key])
    joined.producer_name, joined.producer_version = "cxr-transfer", __version__
    body = joined.SerializeToString()
    del joined
    digest = hashlib.sha256(body).hexdigest()
    data = body + HASH_PREFIX + digest.encode("ascii")
    difference = _fidelity(data, built.reference, int(json.loads(metadata["input"])["size"]), model_path)
    text = model_card(metadata, built.evidence, audit_found, out.name, digest, difference)
    try:   # both written in full before either is renamed: a full disk leaves neither, an old pair stays whole
        with file_lock(out, settings.lock_timeout):
            remove_leftovers(out)   # of an export killed mid-write
            remove_leftovers(card)
            with atomic_path(out) as tmp, atomic_write(card, "w") as handle:
                Path(tmp).write_bytes(data)
                handle.write(text)
    except OSError as exc:
        raise cannot_write_error(out.parent, exc, "output folder", flag="`out`",
                                 kept="no model or card was written") from None
    return ExportedModel(out, metadata["head"], metadata["backbone"], int(json.loads(metadata["input"])["size"]),
                         json.loads(metadata["class_names"]), difference, digest, card,
                         metadata["precision"], built.evidence is not None, audit_found is not None)


def card_path(out: str | Path) -> Path:
    """The model card beside an exported file: ``NAME.onnx`` -> ``NAME.model-card.md`` (several models can be
    exported into one folder)."""
    return Path(out).with_name(Path(out).stem + MODEL_CARD_SUFFIX)


@dataclass
class _Built:
    """A model joined in memory: its graph, its metadata so far, the two-stage reference it must equal, and the
    evaluation of the run that made it (None when its records are not found)."""

    graph: onnx.ModelProto
    metadata: dict[str, str]
    reference: Callable[[np.ndarray], np.ndarray]
    evidence: dict[str, Any] | None


def _metadata(class_names: list[str], size: int, **described: str) -> dict[str, str]:
    return {"format": FORMAT, "class_names": json.dumps(class_names),
            "input": json.dumps({"name": "image", "dtype": "uint8", "layout": "NHWC", "channels": "RGB",
                                 "size": size}),
            "resize_rule": RESIZE_RULE.replace("SxS", f"{size}x{size}"), "project_version": __version__, **described}


def _head_parts(saved: Any, model_path: Path, settings: ExtractSettings, precision: str | None,
                backbone: str | None) -> _Built:
    info = saved.info
    if len(info["backbones"]) != 1:
        names = "+".join(str(p["backbone"]) for p in info["backbones"])
        raise CxrError(f"{model_path}: a head on concatenated embeddings ({names}) is not exported; export a head "
                       f"trained on one backbone")
    part = info["backbones"][0]
    if backbone is not None and backbone != part["backbone"]:
        raise CxrError(f"{model_path}: the head was trained on {part['backbone']} embeddings; `backbone` {backbone} "
                       f"would feed it other features (leave `backbone` out)")
    part_settings, source, onnx_backbone = head_backbone(part, settings, precision)
    config, size = part_settings.config, int(part["input_size"])
    training = info.get("training") or {}
    head_name = str(training.get("head") or model_path.stem)
    estimator = exported_estimator(saved.model)
    class_names = [info["class_names"][int(c)] for c in estimator.classes_]
    backbone_model = onnx.load(str(onnx_backbone.path))
    head_model = head_graph(estimator, config.feature_dim, opset_of(backbone_model), head_name)
    joined = joined_graph(backbone_model, head_model, size, class_names)
    del backbone_model
    joined.doc_string = (f"{config.name} ({size} px, {source.kind} weights, {part_settings.precision}) + {head_name} "
                         f"head: uint8 RGB images (N, {size}, {size}, 3) -> probabilities over "
                         f"{', '.join(class_names)}")
    metadata = _metadata(class_names, size, backbone=config.name, precision=part_settings.precision,
                         backbone_weights_sha256=source.sha256, backbone_onnx_sha256=onnx_backbone.sha256,
                         head=head_name, head_file=model_path.name, head_joblib_sha256=info["joblib_sha256"],
                         training=json.dumps(training, sort_keys=True, default=str),
                         training_data_fingerprint=str(training.get("trained_on", "")))
    embedder = OnnxEmbedder(onnx_backbone, part_settings.threads)
    evidence = run_evidence(model_path, info, config.name, head_name, saved.model)
    return _Built(joined, metadata, lambda batch: estimator.predict_proba(embedder.embed(batch)), evidence)


def head_backbone(part: dict[str, Any], settings: ExtractSettings,
                  precision: str | None = None) -> tuple[ExtractSettings, WeightsSource, OnnxBackbone]:
    """The backbone export a saved head was trained on (one entry of its ``backbones`` record): its settings, its
    weights (sha256 checked) and its ONNX file, float32 or the int8 model of the head's own int8 sample."""
    part_settings = check_weights(part, settings, precision)
    source = resolve_weights(part_settings.config, part_settings.weights_file, part_settings.weights_dir,
                             part_settings.random_weights)
    onnx_backbone = get_onnx_backbone(part_settings.config, int(part["input_size"]), source, part_settings.cache_dir)
    if part_settings.precision == "int8":   # the int8 model of the head's own int8 sample, hash-checked
        onnx_backbone = get_int8_backbone(onnx_backbone, None, part_settings.cache_dir, part_settings.threads,
                                          digest=part_settings.int8_sample_digest,
                                          lock_timeout=part_settings.lock_timeout)
    return part_settings, source, onnx_backbone


def _finetuned_parts(saved: SavedFinetuned, settings: ExtractSettings, precision: str | None,
                     backbone: str | None) -> _Built:
    info, path = saved.info, saved.info_path
    if precision not in (None, "float32"):
        raise CxrError(f"{path.parent}: a fine-tuned model runs in float32; `precision` {precision} is refused")
    if backbone is not None and backbone != info["backbone"]:
        raise CxrError(f"{path.parent}: the model was fine-tuned from {info['backbone']}; `backbone` {backbone} is "
                       f"refused (leave `backbone` out)")
    check_input_size(settings.input_size, saved.input_size)
    onnx_path, size, class_names = saved.checked_file("onnx"), saved.input_size, saved.class_names
    joined = joined_graph(onnx.load(str(onnx_path)), None, size, class_names)
    joined.doc_string = (f"{info['backbone']} fine-tuned ({size} px): uint8 RGB images (N, {size}, {size}, 3) -> "
                         f"probabilities over {', '.join(class_names)}")
    evidence = finetune_evidence(path.parent)
    training = {"head": info.get("model", "finetune"), "dataset": (evidence or {}).get("train", {}).get("root"),
                "n_train": (evidence or {}).get("train", {}).get("n"), "seed": (evidence or {}).get("seed")}
    metadata = _metadata(class_names, size, backbone=info["backbone"], precision="float32",
                         backbone_weights_sha256=str(info.get("weights_sha256", "")),
                         backbone_onnx_sha256=str(info["onnx_sha256"]), head=str(info.get("model", "finetune")),
                         head_file="", head_joblib_sha256="", training=json.dumps(training, sort_keys=True),
                         training_data_fingerprint=str((evidence or {}).get("train", {}).get("fingerprint") or ""))
    return _Built(joined, metadata, saved.onnx_probabilities(settings.threads), evidence)


def exported_estimator(model: Any) -> Any:
    """The fitted estimator a saved head predicts with: a validate head's inner head (its conformal sets are not
    exported), a tuned head's best estimator."""
    if isinstance(model, ConformalHead):
        model = model.head
    if isinstance(model, GridSearchCV):
        model = model.best_estimator_
    return model


def opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def head_graph(estimator: Any, dim: int, opset: int, name: str) -> onnx.ModelProto:
    """The head as an ONNX graph by skl2onnx: ``embedding`` (float64, N x dim) -> label, probabilities (float64);
    CxrError naming the head when skl2onnx cannot convert it."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import DoubleTensorType

    _register_converters()
    try:
        converted = convert_sklearn(estimator, initial_types=[("embedding", DoubleTensorType([None, dim]))],
                                    target_opset={"": opset, "ai.onnx.ml": 3},
                                    options={id(estimator): {"zipmap": False}})
    except Exception as exc:  # noqa: BLE001 - skl2onnx raises many kinds; the head is refused in one line
        raise CxrError(f"head {name!r} ({type(estimator).__name__}) cannot be converted to ONNX by skl2onnx "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if [o.name for o in converted.graph.output][-1:] != ["probabilities"]:
        raise CxrError(f"head {name!r}: skl2onnx gave outputs {[o.name for o in converted.graph.output]}, expected "
                       f"label and probabilities")
    return converted


_REGISTERED: list[bool] = []


def _register_converters() -> None:
    """skl2onnx converters for what it lacks: the hgb head's ``CappedPCA`` (its fitted PCA) and the SVM heads'
    temperature-scaled ``CalibratedClassifierCV`` (softmax of beta times the SVC's decision function), once."""
    if _REGISTERED:
        return
    from skl2onnx import update_registered_converter
    from skl2onnx._supported_operators import sklearn_operator_name_map
    from skl2onnx.common._registration import get_converter, get_shape_calculator
    from skl2onnx.common.shape_calculator import calculate_linear_classifier_output_shapes
    from skl2onnx.operator_converters.calibrated_classifier_cv import convert_sklearn_calibrated_classifier_cv

    def pca_shape(operator) -> None:
        kind = type(operator.inputs[0].type)
        operator.outputs[0].type = kind([operator.inputs[0].get_first_dimension(),
                                         int(operator.raw_operator.pca_.n_components_)])

    def pca_convert(scope, operator, container) -> None:
        from skl2onnx.algebra.onnx_operator import OnnxSubEstimator

        OnnxSubEstimator(operator.raw_operator.pca_, operator.inputs[0], op_version=container.target_opset,
                         output_names=operator.outputs[:1]).add_to(scope, container)

    def calibrated_convert(scope, operator, container) -> None:
        from skl2onnx.algebra.onnx_operator import OnnxSubEstimator
        from skl2onnx.algebra.onnx_ops import OnnxArgMax, OnnxGather, OnnxMul, OnnxSoftmax
        from skl2onnx.common.data_types import guess_numpy_type

        model = operator.raw_operator
        if model.method != "temperature":
            return convert_sklearn_calibrated_classifier_cv(scope, operator, container)
        if len(model.calibrated_classifiers_) != 1:
            raise NotImplementedError("temperature scaling with ensemble=True")
        calibrated, opv = model.calibrated_classifiers_[0], container.target_opset
        dtype = guess_numpy_type(operator.inputs[0].type)
        scores = OnnxSubEstimator(calibrated.estimator, operator.inputs[0], op_version=opv,
                                  options={"raw_scores": True, "zipmap": False})[1]   # binary: (-d, d)
        beta = np.array([calibrated.calibrators[0].beta_], dtype=dtype)
        proba = OnnxSoftmax(OnnxMul(scores, beta, op_version=opv), axis=1, op_version=opv,
                            output_names=operator.outputs[1:2])
        index = OnnxArgMax(proba, axis=1, keepdims=0, op_version=opv)
        label = OnnxGather(np.asarray(model.classes_, dtype=np.int64), index, op_version=opv,
                           output_names=operator.outputs[:1])
        proba.add_to(scope, container)
        label.add_to(scope, container)

    def integer_attributes(convert):
        """``convert`` with Python bools in list attributes written as ints: skl2onnx 1.20 gives the hgb head's
        leaves ``nodes_missing_value_tracks_true=False``, which onnx >= 1.17 refuses in an ints attribute."""
        def wrapped(scope, operator, container) -> None:
            add_node = container.add_node

            def add_node_ints(*args, **attrs):
                attrs = {k: [int(x) if isinstance(x, (bool, np.bool_)) else x for x in v] if isinstance(v, list)
                         else v for k, v in attrs.items()}
                return add_node(*args, **attrs)

            container.add_node = add_node_ints
            try:
                convert(scope, operator, container)
            finally:
                del container.add_node
        return wrapped

    alias = sklearn_operator_name_map[HistGradientBoostingClassifier]
    update_registered_converter(HistGradientBoostingClassifier, alias, get_shape_calculator(alias),
                                integer_attributes(get_converter(alias)),
                                options=get_converter(alias).get_allowed_options())
    update_registered_converter(CappedPCA, "CxrCappedPCA", pca_shape, pca_convert)
    update_registered_converter(CalibratedClassifierCV, "SklearnCalibratedClassifierCV",
                                calculate_linear_classifier_output_shapes, calibrated_convert,
                                options={"zipmap": [True, False, "columns"], "nocl": [True, False]})
    _REGISTERED.append(True)


def joined_graph(backbone: onnx.ModelProto, head: onnx.ModelProto | None, size: int,
                 class_names: list[str]) -> onnx.ModelProto:
    """One model: ``image`` uint8 -> Cast -> backbone -> Cast float64 -> head -> ``probabilities`` (float32) and
    ``label`` (the class name of the head's largest probability). Names are prefixed ``backbone/`` and ``head/``;
    each domain's opset is the larger of the two, and so is the IR version. Without a head (a fine-tuned model,
    whose graph ends in probabilities) the backbone's output is the probabilities."""
    backbone = onnx.compose.add_prefix(backbone, "backbone/", inplace=True) or backbone
    if head is None:   # an empty graph in the head's place: no nodes, no opsets
        head = helper.make_model(helper.make_graph([], "head", [], []), opset_imports=[])
        head.ir_version = backbone.ir_version
    else:
        head = onnx.compose.add_prefix(head, "head/", inplace=True) or head
    initialized = {i.name for i in backbone.graph.initializer}
    pixels = next(i.name for i in backbone.graph.input if i.name not in initialized)
    embedding = backbone.graph.output[0].name
    if head.graph.node:
        head_proba = head.graph.output[-1].name
        to_head = [helper.make_node("Cast", [embedding], [head.graph.input[0].name], to=TensorProto.DOUBLE,
                                    name="embedding_to_double")]
    else:
        head_proba, to_head = embedding, []
    names = helper.make_tensor("class_names", TensorProto.STRING, [len(class_names)],
                               [n.encode("utf-8") for n in class_names])
    nodes = ([helper.make_node("Cast", ["image"], [pixels], to=TensorProto.FLOAT, name="image_to_float")]
             + list(backbone.graph.node) + to_head + list(head.graph.node)
             + [helper.make_node("Cast", [head_proba], ["probabilities"], to=TensorProto.FLOAT, name="to_float"),
                helper.make_node("ArgMax", [head_proba], ["class_index"], axis=1, keepdims=0, name="class_index"),
                helper.make_node("Gather", ["class_names", "class_index"], ["label"], axis=0, name="label")])
    graph = helper.make_graph(
        nodes, "cxr_transfer_model",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(class_names)]),
         helper.make_tensor_value_info("label", TensorProto.STRING, ["N"])],
        initializer=list(backbone.graph.initializer) + list(head.graph.initializer) + [names],
        value_info=list(backbone.graph.value_info) + list(head.graph.value_info))
    graph.sparse_initializer.extend(list(backbone.graph.sparse_initializer) + list(head.graph.sparse_initializer))
    opsets: dict[str, int] = {}
    for entry in list(backbone.opset_import) + list(head.opset_import):
        domain = "" if entry.domain == "ai.onnx" else entry.domain
        opsets[domain] = max(opsets.get(domain, 0), entry.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())])
    model.ir_version = max(backbone.ir_version, head.ir_version)
    model.functions.extend(list(backbone.functions) + list(head.functions))
    return model


def _fidelity(data: bytes, reference: Callable[[np.ndarray], np.ndarray], size: int, model_path: str | Path) -> float:
    """The largest probability difference between the new file and the two-stage path (``reference``) on a random
    batch; CxrError above ``FIDELITY``."""
    batch = np.random.default_rng(0).integers(0, 256, size=(3, size, size, 3), dtype=np.uint8)
    session = open_session(data)
    proba = session.run(["probabilities"], {"image": batch})[0]
    difference = float(np.max(np.abs(proba - reference(batch))))
    if not difference <= FIDELITY:
        raise CxrError(f"{model_path}: the joined ONNX model's probabilities differ from the two-stage path's by "
                       f"{difference:.1e} (more than {FIDELITY:.0e}); not written")
    return difference


def read_exported(path: str | Path, threads: int | None = None) -> tuple[Any, dict[str, str]]:
    """(an onnxruntime session of the file, its metadata) after checking its ``model_sha256``: CxrError naming the
    file when it is not a model ``export_model`` wrote, or its bytes changed since."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CxrError(f"{path}: cannot read the model ({exc.strerror or exc})") from None
    end = len(HASH_PREFIX) + 64
    if len(data) < end or data[-end:-64] != HASH_PREFIX:
        raise CxrError(f"{path}: no model_sha256 at its end: not a model written by export-model (or re-saved since)")
    if hashlib.sha256(data[:-end]).hexdigest().encode("ascii") != data[-64:]:
        raise CxrError(f"{path}: its bytes differ from the model_sha256 recorded in it; refusing a changed model "
                       f"(export it again)")
    session = open_session(data, threads)
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    if metadata.get("format") != FORMAT:
        raise CxrError(f"{path}: format {metadata.get('format')!r}, expected {FORMAT!r}")
    return session, metadata


def is_exported_model(path: str | Path) -> bool:
    """True for a ``.onnx`` file with no fine-tuned model's ``model.json`` beside it (predict's cue to run it as
    an exported model)."""
    path = Path(path)
    return path.suffix.lower() == ".onnx" and not path.with_name(MODEL_JSON).is_file()


def predict_exported(images: str | Path, model_path: str | Path, settings: ExtractSettings,
                     out_csv: str | Path | None = None) -> tuple[Path, list[tuple[str, str]]]:
    """``predict`` with an exported model: the file checked (``read_exported``), the images read by the one rule
    (``extract.images.decoded_batches``) at its input size; writes the same CSV as a saved head's predict."""
    out_csv = predictions_path(out_csv, images, model_path)   # before any computing
    session, metadata = read_exported(model_path, settings.threads)
    size, class_names = int(json.loads(metadata["input"])["size"]), json.loads(metadata["class_names"])
    check_input_size(settings.input_size, size)
    dataset = unlabeled_dataset(images, class_names)
    readable, blocks, skipped = [], [], []
    for good, batch, bad in decoded_batches(dataset.samples, size, settings.batch_size, settings.decode_workers):
        skipped += [(dataset.relative(s), reason) for s, reason in bad]
        if good:
            readable += good
            blocks.append(session.run(["probabilities"], {"image": batch})[0])
    if not readable:
        raise CxrError(f"{dataset.root}: none of the {len(dataset)} images could be read")
    out_csv = Path(out_csv or Path(model_path).with_name(Path(model_path).stem + "-predictions.csv"))
    return write_predictions(out_csv, dataset, readable, np.vstack(blocks), class_names), skipped
