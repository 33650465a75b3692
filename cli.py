#!/usr/bin/env python
"""cxr-transfer command line: a thin layer that parses flags and calls the library (``cxr_transfer.api``).

    cxr-transfer backbones                      the registry and where weights were found
    cxr-transfer extract  --data DIR ...        embeddings of a folder into the HDF5 cache
    cxr-transfer compare  --data DIR ...        scikit-learn heads on cached embeddings
    cxr-transfer predict  IMAGES --model FILE   class probabilities for new images
    cxr-transfer finetune --data DIR ...        the paper's frozen-body + dense-head training
    cxr-transfer report   RUN_DIR ...           runs side by side on the same test images
    cxr-transfer audit    --data DIR ...        duplicates, patient leakage and shortcuts
    cxr-transfer explain  IMAGES --model FILE   heatmaps of the evidence and its share at the border
    cxr-transfer validate --data DIR --external EXT   internal vs external, subgroups, calibration, conformal
    cxr-transfer export   --data DIR --out PATH   cached embeddings as Parquet or .npy for pandas, Spark, Ray

``python cli.py ...`` from a checkout (after ``pip install -e .``) and ``python -m cxr_transfer ...`` are the same.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from cxr_transfer.core.errors import CxrError, Int8RefusedError
from cxr_transfer.core import bounds
from cxr_transfer.core.bounds import IntBound
from cxr_transfer.core.settings import EXPORT_FORMATS, PRECISIONS, BackboneSettings

DATA_ENV = "CXR_DATA"
WEIGHTS_ENV = "CXR_WEIGHTS_DIR"
SHARED_DATASET = Path("shared") / "data" / "covid19-xray"
SAMPLE_DATA = Path(__file__).resolve().parent / "data" / "sample"   # package data, installed with the code


def _shared_folder() -> Path | None:
    """``shared/`` in the current directory or beside it (``../shared``), where the project's data lives."""
    for base in (Path.cwd(), Path.cwd().parent):
        if (base / SHARED_DATASET).is_dir():
            return base / "shared"
    return None


def default_data() -> Path:
    """$CXR_DATA, else ../shared's covid19-xray (looked up from the current directory), else the bundled sample."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    shared = _shared_folder()
    return shared / "data" / "covid19-xray" if shared else SAMPLE_DATA


def default_weights_dir() -> str | None:
    """$CXR_WEIGHTS_DIR, else ../shared/weights when it exists (looked up from the current directory)."""
    if os.environ.get(WEIGHTS_ENV):
        return os.environ[WEIGHTS_ENV]
    shared = _shared_folder()
    return str(shared / "weights") if shared and (shared / "weights").is_dir() else None


class Parser(argparse.ArgumentParser):
    """argparse with the house's one-line ``error: ...`` (exit status 2) for bad flags."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog.split()[-1]}: {message} (see {self.prog} --help)\n")


def bounded(bound: IntBound):
    """An argparse type: an int within one of ``core.bounds``' bounds (the ones the library checks too)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r} instead") from None
        problem = bound.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    parse.__name__ = "int"
    return parse


jobs_count = bounded(bounds.JOBS)
"""--jobs: a positive number of processes, or -1 for all cores (joblib's convention)."""


def fraction(text: str) -> float:
    """A float strictly between 0 and 1 (test sizes)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r} instead") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value} instead")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r} instead") from None
    if not value > 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {value} instead")
    return value


POSITIVE = bounded(bounds.COUNT)
SEED = bounded(bounds.SEED)
INPUT_SIZE = bounded(bounds.INPUT_SIZE)


def add_backbone_flags(parser: argparse.ArgumentParser, many: bool = True, input_size: int | None = None,
                       batch_size: int = 16) -> None:
    parser.add_argument("--data", type=Path, default=None,
                        help="dataset folder (<class>/ or <split>/<class>/) or CSV; default: $CXR_DATA, else "
                             "../shared/data/covid19-xray, else the bundled sample")
    parser.add_argument("--backbone", "--backbones", dest="backbone", default="vgg16",
                        help="backbone name" + (", comma list or 'all'" if many else ""))
    parser.add_argument("--weights", type=Path, default=None, help="weights file for the (single) backbone")
    parser.add_argument("--weights-dir", default=None,
                        help="folder searched for <backbone>_*.h5; default $CXR_WEIGHTS_DIR, else ../shared/weights")
    parser.add_argument("--random-weights", action="store_true", help="random weights (tests only, never a fallback)")
    parser.add_argument("--input-size", type=INPUT_SIZE, default=input_size,
                        help=f"square input size (default: {input_size or 'the backbone' + chr(39) + 's'})")
    parser.add_argument("--cache-dir", type=Path, default=Path("features"), help="feature and ONNX cache folder")
    parser.add_argument("--batch-size", type=POSITIVE, default=batch_size, help=f"default {batch_size}")
    parser.add_argument("--threads", type=POSITIVE, default=None, help="onnxruntime threads (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="float32 (default) or int8: a statically quantized export calibrated on the dataset's "
                             "own images, refused when its embeddings drift from float32 (predict: the model's own)")
    parser.add_argument("--calibration-size", type=POSITIVE, default=64,
                        help="int8: images of the dataset to calibrate on (default 64)")
    onnx = parser.add_argument_group("your own ONNX model (--backbone onnx:PATH)")
    onnx.add_argument("--channels", type=int, choices=(1, 3), default=3, help="image channels the model takes")
    onnx.add_argument("--preprocess", choices=("caffe", "tf", "torch", "none"), default="none",
                      help="pixel normalisation (Keras preprocess_input modes; none: raw 0-255)")
    onnx.add_argument("--mean", type=_floats, default=None, help="per-channel mean in [0, 1] (with --std)")
    onnx.add_argument("--std", type=_floats, default=None, help="per-channel std in [0, 1] (with --mean)")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma list of numbers, e.g. 0.5 or 0.485,0.456,0.406; got '{text}'")


def register_user_backbones(args: argparse.Namespace) -> None:
    """Replace each onnx:PATH of --backbone by the name of the validated, registered model."""
    from cxr_transfer.extract.user_onnx import InputSpec, is_user_onnx, resolve_backbone_spec

    if not any(is_user_onnx(item) for item in args.backbone.split(",")):
        return
    spec = InputSpec(args.channels, args.preprocess, args.mean, args.std)
    args.backbone = resolve_backbone_spec(args.backbone, spec, args.input_size, args.cache_dir)


def common_settings(args: argparse.Namespace) -> BackboneSettings:
    """The one BackboneSettings every stage shares, from the common flags."""
    return BackboneSettings(backbone=args.backbone.split(",")[0].strip() or "vgg16", weights_file=args.weights,
                            weights_dir=args.weights_dir or default_weights_dir(), random_weights=args.random_weights,
                            input_size=args.input_size, cache_dir=args.cache_dir, threads=args.threads,
                            progress=not args.no_progress, precision=args.precision or "float32",
                            calibration_size=args.calibration_size)


def cmd_backbones(args: argparse.Namespace) -> int:
    from cxr_transfer.core.tables import text_table
    from cxr_transfer.extract.commands import backbone_table

    print(text_table(backbone_table(args.weights_dir or default_weights_dir(), args.input_size, args.cache_dir)))
    return 0


def engine_settings(args: argparse.Namespace):
    """--engine and the Ray flags; the Ray flags with the local engine are refused (they would do nothing)."""
    from cxr_transfer.extract.engine import EngineSettings

    ray_flags = {"--address": args.address, "--workers": args.workers,
                 "--threads-per-worker": args.threads_per_worker, "--shard-size": args.shard_size}
    given = [flag for flag, value in ray_flags.items() if value is not None]
    if args.engine != "ray":
        if given:
            raise CxrError(f"{', '.join(given)} only apply to --engine ray; add --engine ray or leave them out")
        return EngineSettings()
    options = {"address": args.address, "workers": args.workers, "threads_per_worker": args.threads_per_worker,
               "shard_size": args.shard_size}
    return EngineSettings(name="ray", **{k: v for k, v in options.items() if v is not None})


def cmd_extract(args: argparse.Namespace) -> int:
    from cxr_transfer.extract.commands import extract_many
    from cxr_transfer.extract.dataset import load_dataset
    from cxr_transfer.extract.engine import check_engine
    from cxr_transfer.extract.pipeline import ExtractSettings

    settings = ExtractSettings(common=common_settings(args), batch_size=args.batch_size, engine=engine_settings(args))
    check_engine(settings.engine)   # Ray missing: say how to install it before reading any data
    dataset = load_dataset(args.data or default_data())
    try:
        results, refused = extract_many(dataset, args.backbone, settings), None
    except Int8RefusedError as exc:   # the other backbones ran: report them, then the refusal (exit 2)
        results, refused = exc.results, exc
    for line in dataset.skipped_summary():
        print(line)
    for result in results:
        print(result.summary())
        for path, reason in result.failures:
            print(f"  skipped {path}: {reason.split(': ', 1)[-1]}")
    if refused is not None:
        raise refused
    return 0


def audit_pointer_line(data: Path) -> str | None:
    """The audit's one-line pointer for this data, when an audit of it exists."""
    from cxr_transfer.audit.run import audit_pointer
    from cxr_transfer.extract.dataset import load_dataset

    return audit_pointer(load_dataset(data))


def cmd_compare(args: argparse.Namespace) -> int:
    from cxr_transfer import api
    from cxr_transfer.classify.report import compare_summary_text

    data = args.data or default_data()
    run = api.compare(data, args.backbone, args.heads, common=common_settings(args),
                               batch_size=args.batch_size, protocol=args.protocol, seed=args.seed, seeds=args.seeds,
                               folds=args.folds, repeats=args.repeats, test_size=args.test_size,
                               group_by=args.group_by, concat=args.concat, tune=args.tune, save=args.save,
                               head=args.head, select_folds=args.select_folds,
                               out_dir=args.out, run_name=args.name, n_jobs=args.jobs)
    print(compare_summary_text(run.evaluations, run.summary, {"head": args.head, "select_folds": args.select_folds}))
    if run.skipped:
        print(f"\n{len(run.skipped)} file(s) or folder(s) of the dataset left out:")
        for path, reason in run.skipped:
            print(f"  left out {path}: {reason}")
    print(f"\nrun folder: {run.run_dir} (report.md, results.json, results.csv, plots, record.json)")
    pointer = audit_pointer_line(data)
    if pointer:
        print(pointer)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cxr_transfer import api

    out, skipped = api.predict(args.images, args.model, out=args.out, precision=args.precision,
                                        conformal=args.conformal, common=common_settings(args),
                                        batch_size=args.batch_size)
    for path, reason in skipped:
        print(f"skipped {path}: {reason.split(': ', 1)[-1]}")
    print(f"predictions: {out}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from cxr_transfer import api

    data = args.data or default_data()
    run_dir = api.finetune_backbone(data, args.backbone, common=common_settings(args), epochs=args.epochs,
                                    batch_size=args.batch_size, lr=args.lr, seed=args.seed, fast=args.fast,
                                    views=args.views, augment=not args.no_augment, dense_units=args.dense_units,
                                    dropout=args.dropout, test_size=args.test_size, group_by=args.group_by,
                                    run_dir=args.run_dir, out_dir=args.out)
    print(f"run folder: {run_dir} (report.md, results.json, curves.png, confusion.png, model.keras, model.onnx)")
    pointer = audit_pointer_line(data)
    if pointer:
        print(pointer)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cxr_transfer.classify.side_by_side import side_by_side, write_side_by_side
    from cxr_transfer.core.tables import text_table

    rows, notes = side_by_side(args.runs, head=args.head)
    print(text_table(rows))
    for note in notes:
        print(f"note: {note}")
    out = write_side_by_side(args.runs, args.out, head=args.head)
    print(f"\nreport: {out}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from cxr_transfer import api

    report = api.audit_dataset(args.data or default_data(), args.backbone, common=common_settings(args),
                                out_dir=args.out, runs_dir=args.runs_dir, seed=args.seed, strict=args.strict)
    for line in report.dataset.skipped_summary():
        print(line)
    print(report.verdict)
    for finding in report.findings:
        print(f"- {finding}")
    print(f"report: {report.out_dir / 'audit.md'} ({report.timings['total']:.0f} s)")
    return report.exit_code


def cmd_explain(args: argparse.Namespace) -> int:
    from cxr_transfer import api
    from cxr_transfer.explain.run import summary_lines

    result = api.explain_images(args.images, args.model, out=args.out, method=args.method,
                                  precision=args.precision, overwrite=args.overwrite, common=common_settings(args),
                                  batch_size=args.batch_size)
    for path, reason in result.skipped:
        print(f"skipped {path}: {reason.split(': ', 1)[-1]}")
    for line in summary_lines(result.explanations):
        print(line)
    print(f"{result.method}: {len(result.explanations)} heatmaps in {result.out_dir} ({result.csv_path.name})")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from cxr_transfer import api

    run = api.validate(args.data or default_data(), args.external, args.backbone, args.heads,
                                common=common_settings(args), batch_size=args.batch_size, group_by=args.group_by,
                                merge_duplicates=not args.no_merge_duplicates, subgroups=args.subgroups,
                                alpha=args.alpha, calibrate=args.calibrate, folds=args.folds, n_boot=args.n_boot,
                                seed=args.seed, save=args.save, explain=args.explain, out_dir=args.out,
                                run_name=args.name,
                                n_jobs=args.jobs)
    for warning in run.warnings:
        print(f"warning: {warning}")
    for line in run.verdict:
        print(line)
    for note in run.notes:
        print(f"note: {note}")
    for where, entries in run.skipped.items():
        if entries:
            print(f"{where}: {len(entries)} file(s) skipped or left out:")
            for path, reason in entries:
                print(f"  skipped {path}: {reason}")
    print(f"\nrun folder: {run.run_dir} (report.md, results.json, results.csv, accuracy.png, reliability.png)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cxr_transfer import api

    result = api.export_embeddings(args.data or default_data(), args.backbone, out=args.out,
                                            format=args.format, overwrite=args.overwrite,
                                            common=common_settings(args), batch_size=args.batch_size)
    for line in result.dataset.skipped_summary():
        print(line)
    print(result.extraction.summary())
    for path, reason in result.extraction.failures:
        print(f"  skipped {path}: {reason.split(': ', 1)[-1]}")
    print(result.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cxr-transfer", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("backbones", help="list the backbone registry and where weights were found")
    p.add_argument("--weights-dir", default=None, help="default $CXR_WEIGHTS_DIR, else ../shared/weights")
    p.add_argument("--input-size", type=INPUT_SIZE, default=None)
    p.add_argument("--cache-dir", type=Path, default=Path("features"),
                   help="also list the user ONNX models (onnx:PATH) wrapped in this cache")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("extract", help="embed a folder of images into the HDF5 cache")
    add_backbone_flags(p)
    engine = p.add_argument_group("engine (docs/distributed.md)")
    engine.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: this process (default); ray: a Ray cluster, or a local Ray instance")
    engine.add_argument("--address", default=None,
                        help="ray: cluster address host:port, auto or ray://host:port (default: $RAY_ADDRESS, else "
                             "a new local instance)")
    engine.add_argument("--workers", type=POSITIVE, default=None,
                        help="ray: actors, each with its own onnxruntime session (default: the cluster's CPUs / "
                             "--threads-per-worker)")
    engine.add_argument("--threads-per-worker", type=POSITIVE, default=None,
                        help="ray: onnxruntime threads (and CPUs reserved) per worker (default 1)")
    engine.add_argument("--shard-size", type=POSITIVE, default=None,
                        help="ray: images per shard, the unit of work, retry and resume (default 256)")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("compare", help="benchmark scikit-learn heads on cached embeddings")
    add_backbone_flags(p)
    p.add_argument("--heads", default="all", help="comma list of logreg,linsvm,rbfsvm,knn,rf,hgb,mlp or 'all'")
    p.add_argument("--protocol", choices=("paper", "cv", "holdout"), default="paper",
                   help="paper: seeded stratified 80/20 of train/; cv: repeated stratified k-fold of train/; "
                        "holdout: fit on train/, evaluate on test/")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--seeds", type=POSITIVE, default=10, help="paper protocol: number of seeded splits")
    p.add_argument("--folds", type=bounded(bounds.FOLDS), default=5)
    p.add_argument("--repeats", type=POSITIVE, default=1)
    p.add_argument("--test-size", type=fraction, default=0.2)
    p.add_argument("--group-by", default=None, help="patient_id (manifest/CSV) or dicom:PatientID (salted hash of "
                                                    "the DICOM header's id): no patient on both sides of a split")
    p.add_argument("--concat", action="store_true", help="also evaluate all backbones' embeddings concatenated")
    p.add_argument("--tune", action="store_true", help="tune each head by inner CV on the training fold only")
    p.add_argument("--save", action="store_true", help="refit each head on all evaluated images and save it")
    p.add_argument("--head", default=None,
                   help="the head the report names as chosen (default: chosen on each split by CV inside its "
                        "training part)")
    p.add_argument("--select-folds", type=int, default=3,
                   help="folds of the CV inside each training part that chooses the head (default 3)")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder for run folders")
    p.add_argument("--name", default=None, help="run folder name (default: compare-PROTOCOL-TIMESTAMP)")
    p.add_argument("--jobs", type=jobs_count, default=-1, help="parallel fits (default: all cores)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("predict", help="class probabilities for new images from a saved head")
    p.add_argument("images", type=Path, help="an image file or a folder of images")
    p.add_argument("--model", type=Path, required=True, help="a .joblib head written by compare --save, or a finetune run folder")
    add_backbone_flags(p)
    p.add_argument("--out", type=Path, default=None, help="CSV to write (default: beside the model)")
    p.add_argument("--conformal", type=float, default=None, metavar="ALPHA",
                   help="add a 'set' column: the conformal prediction set at miscoverage ALPHA (heads saved by "
                        "validate --save with the same --alpha)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("finetune", help="the paper's frozen-body + dense-head Keras training")
    add_backbone_flags(p, many=False, input_size=224, batch_size=8)
    p.add_argument("--epochs", type=POSITIVE, default=35)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--seed", type=SEED, default=0, help="split, initialisation, augmentation and batch order")
    p.add_argument("--fast", action="store_true", help="train the head on a cached bank of augmented views")
    p.add_argument("--views", type=POSITIVE, default=10, help="--fast: augmented views per training image (1: none)")
    p.add_argument("--no-augment", action="store_true", help="plain loop without augmentation")
    p.add_argument("--dense-units", type=POSITIVE, default=64, help="hidden units of the head (see finetune/model.py)")
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--test-size", type=fraction, default=0.2)
    p.add_argument("--group-by", default=None, help="patient_id (or group, or dicom:PatientID): keep each patient on "
                                                    "one side of the split")
    p.add_argument("--run-dir", type=Path, default=None, help="exact run folder")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder for run folders")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("report", help="fine-tuned models and heads side by side on the same test images")
    p.add_argument("runs", nargs="+", type=Path, help="finetune and compare run folders")
    p.add_argument("--out", type=Path, default=Path("runs") / "side-by-side.md")
    p.add_argument("--head", default=None,
                   help="the head to put beside the fine-tuned models (default: the head compare chose on each "
                        "split by CV inside its training part)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("audit", help="duplicates, patient leakage and shortcuts in a dataset")
    add_backbone_flags(p, many=False)
    p.add_argument("--out", type=Path, default=None, help="report folder (default: runs/audit/<dataset id>/)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where audits are kept and looked up")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--strict", action="store_true", help="exit with status 1 when the audit finds anything")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("explain", help="heatmaps of what a saved head or fine-tuned model looks at")
    p.add_argument("images", type=Path, help="an image file or a folder of images")
    p.add_argument("--model", type=Path, required=True, help="a .joblib head written by compare --save, or a finetune run folder")
    add_backbone_flags(p)
    p.add_argument("--method", choices=("auto", "cam", "occlusion", "gradcam"), default="auto",
                   help="auto: exact CAM for linear heads, occlusion for other heads, Grad-CAM for fine-tuned models")
    p.add_argument("--out", type=Path, default=None, help="folder for the PNGs and explain.csv (default: beside the model)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an --out folder that holds files: an earlier explain run there is replaced")
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("validate", help="internal vs external validation: subgroups, calibration, conformal sets")
    add_backbone_flags(p)
    p.add_argument("--external", type=Path, required=True,
                   help="external dataset folder or CSV (never trained or tuned on); its manifest's extra columns "
                        "can be subgroups")
    p.add_argument("--heads", default="logreg", help="comma list of logreg,linsvm,rbfsvm,knn,rf,hgb,mlp or 'all'")
    p.add_argument("--group-by", default=None,
                   help="patient_id (default when TRAIN has patient ids): folds and bootstrap by patient")
    p.add_argument("--no-merge-duplicates", action="store_true",
                   help="do not join patients that share a near-duplicate radiograph into one group")
    p.add_argument("--subgroups", default="", help="comma list of EXT manifest columns, e.g. source,age_group,view")
    p.add_argument("--alpha", type=float, default=0.1, help="conformal miscoverage (sets cover 1 - alpha)")
    p.add_argument("--calibrate", choices=("sigmoid", "isotonic"), default=None,
                   help="also recalibrate each head on grouped folds of TRAIN and report before / after")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates per interval (100 to 100000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", action="store_true",
                   help="save each head with its conformal calibration (for predict --conformal)")
    p.add_argument("--explain", type=int, default=0, metavar="N",
                   help="heatmaps of the N most confident external errors and the border share per class "
                        "(saves the heads, which explain reads)")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder for run folders")
    p.add_argument("--name", default=None, help="run folder name (default: validate-TIMESTAMP-XXXXXX)")
    p.add_argument("--jobs", type=int, default=-1, help="parallel fits (default: all cores)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("export", help="cached embeddings as Parquet or .npy, readable by pandas, Spark and Ray",
                       description="Write one backbone's embeddings of a dataset with sha256, path, label, split "
                                   "and group, one row per image, in the cache's order. Embeddings the HDF5 cache "
                                   "lacks are computed first, exactly as compare does; the cache stays the source "
                                   "of truth. parquet: one file, embedding = fixed-size list of float32, backbone, "
                                   "weights, precision and cache path in the schema metadata. npy: a folder with "
                                   "embeddings.npy (float32 N x D), rows.csv (UTF-8) and metadata.json.")
    add_backbone_flags(p, many=False)
    p.add_argument("--format", choices=EXPORT_FORMATS, default="parquet",
                   help="parquet (one file, default) or npy (a folder)")
    p.add_argument("--out", type=Path, required=True,
                   help="the Parquet file or npy folder to write; its parent folder must exist")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (an npy folder only when it holds nothing but an export)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``cxr-transfer`` command: parse, run, and turn user-fixable errors into one ``error:`` line (exit 2)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")   # this process is the command line's own: quiet TensorFlow
    for stream in (sys.stdout, sys.stderr):  # a file name the terminal cannot show must not end the run
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if getattr(args, "channels", None) is not None:
            register_user_backbones(args)
        return args.func(args)
    except CxrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
