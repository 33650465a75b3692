#!/usr/bin/env python
"""cxr-transfer command line: a thin layer that parses flags and calls the library.

    python cli.py backbones                      the registry and where weights were found
    python cli.py extract  --data DIR ...        embeddings of a folder into the HDF5 cache
    python cli.py compare  --data DIR ...        scikit-learn heads on cached embeddings
    python cli.py predict  IMAGES --model FILE   class probabilities for new images
    python cli.py finetune --data DIR ...        the paper's frozen-body + dense-head training
    python cli.py report   RUN_DIR ...           runs side by side on the same test images
    python cli.py audit    --data DIR ...        duplicates, patient leakage and shortcuts
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.settings import MAX_INPUT_SIZE, BackboneSettings

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


def int_at_least(minimum: int, maximum: int | None = None, name: str = "value"):
    """An argparse type: an int in [minimum, maximum], with a message that says the limit."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r} instead") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value} instead")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum} ({name}), got {value} instead")
        return value
    parse.__name__ = "int"
    return parse


def jobs_count(text: str) -> int:
    """--jobs: a positive number of processes, or -1 for all cores (joblib's convention)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r} instead") from None
    if value == 0 or value < -1:
        raise argparse.ArgumentTypeError(f"must be -1 (all cores) or at least 1, got {value} instead")
    return value


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


POSITIVE = int_at_least(1)
SEED = int_at_least(0, 2**32 - 1, "the largest seed NumPy accepts")
INPUT_SIZE = int_at_least(1, MAX_INPUT_SIZE, "larger inputs need tens of GiB of memory per batch")


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


def common_settings(args: argparse.Namespace) -> BackboneSettings:
    """The one BackboneSettings every stage shares, from the common flags."""
    return BackboneSettings(backbone=args.backbone.split(",")[0].strip() or "vgg16", weights_file=args.weights,
                            weights_dir=args.weights_dir or default_weights_dir(), random_weights=args.random_weights,
                            input_size=args.input_size, cache_dir=args.cache_dir, threads=args.threads,
                            progress=not args.no_progress)


def cmd_backbones(args: argparse.Namespace) -> int:
    from cxr_transfer.core.tables import text_table
    from cxr_transfer.extract.commands import backbone_table

    print(text_table(backbone_table(args.weights_dir or default_weights_dir(), args.input_size)))
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from cxr_transfer.extract.commands import extract_many
    from cxr_transfer.extract.dataset import load_dataset
    from cxr_transfer.extract.pipeline import ExtractSettings

    settings = ExtractSettings(common=common_settings(args), batch_size=args.batch_size)
    dataset = load_dataset(args.data or default_data())
    results = extract_many(dataset, args.backbone, settings)
    for line in dataset.skipped_summary():
        print(line)
    for result in results:
        print(result.summary())
        for path, reason in result.failures:
            print(f"  skipped {path}: {reason.split(': ', 1)[-1]}")
    return 0


def audit_pointer_line(data: Path) -> str | None:
    """The audit's one-line pointer for this data, when an audit of it exists."""
    from cxr_transfer.audit.run import audit_pointer
    from cxr_transfer.extract.dataset import load_dataset

    return audit_pointer(load_dataset(data))


def cmd_compare(args: argparse.Namespace) -> int:
    import cxr_transfer
    from cxr_transfer.classify.report import summary_rows
    from cxr_transfer.core.tables import text_table

    data = args.data or default_data()
    run = cxr_transfer.compare(data, args.backbone, args.heads, common=common_settings(args),
                               batch_size=args.batch_size, protocol=args.protocol, seed=args.seed, seeds=args.seeds,
                               folds=args.folds, repeats=args.repeats, test_size=args.test_size,
                               group_by=args.group_by, concat=args.concat, tune=args.tune, save=args.save,
                               out_dir=args.out, run_name=args.name, n_jobs=args.jobs)
    print(text_table(summary_rows(run.summary)))
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
    import cxr_transfer

    out, skipped = cxr_transfer.predict(args.images, args.model, out=args.out, common=common_settings(args),
                                        batch_size=args.batch_size)
    for path, reason in skipped:
        print(f"skipped {path}: {reason.split(': ', 1)[-1]}")
    print(f"predictions: {out}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    import cxr_transfer

    data = args.data or default_data()
    run_dir = cxr_transfer.finetune(data, args.backbone, common=common_settings(args), epochs=args.epochs,
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

    rows, notes = side_by_side(args.runs)
    print(text_table(rows))
    for note in notes:
        print(f"note: {note}")
    out = write_side_by_side(args.runs, args.out)
    print(f"\nreport: {out}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    import cxr_transfer

    report = cxr_transfer.audit(args.data or default_data(), args.backbone, common=common_settings(args),
                                out_dir=args.out, runs_dir=args.runs_dir, seed=args.seed, strict=args.strict)
    for line in report.dataset.skipped_summary():
        print(line)
    print(report.verdict)
    for finding in report.findings:
        print(f"- {finding}")
    print(f"report: {report.out_dir / 'audit.md'} ({report.timings['total']:.0f} s)")
    return report.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cxr-transfer", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("backbones", help="list the backbone registry and where weights were found")
    p.add_argument("--weights-dir", default=None, help="default $CXR_WEIGHTS_DIR, else ../shared/weights")
    p.add_argument("--input-size", type=INPUT_SIZE, default=None)
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("extract", help="embed a folder of images into the HDF5 cache")
    add_backbone_flags(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("compare", help="benchmark scikit-learn heads on cached embeddings")
    add_backbone_flags(p)
    p.add_argument("--heads", default="all", help="comma list of logreg,linsvm,rbfsvm,knn,rf,hgb,mlp or 'all'")
    p.add_argument("--protocol", choices=("paper", "cv", "holdout"), default="paper",
                   help="paper: seeded stratified 80/20 of train/; cv: repeated stratified k-fold of train/; "
                        "holdout: fit on train/, evaluate on test/")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--seeds", type=POSITIVE, default=10, help="paper protocol: number of seeded splits")
    p.add_argument("--folds", type=int_at_least(2), default=5)
    p.add_argument("--repeats", type=POSITIVE, default=1)
    p.add_argument("--test-size", type=fraction, default=0.2)
    p.add_argument("--group-by", default=None, help="patient_id: no patient on both sides of a split")
    p.add_argument("--concat", action="store_true", help="also evaluate all backbones' embeddings concatenated")
    p.add_argument("--tune", action="store_true", help="tune each head by inner CV on the training fold only")
    p.add_argument("--save", action="store_true", help="refit each head on all evaluated images and save it")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder for run folders")
    p.add_argument("--name", default=None, help="run folder name (default: compare-PROTOCOL-TIMESTAMP)")
    p.add_argument("--jobs", type=jobs_count, default=-1, help="parallel fits (default: all cores)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("predict", help="class probabilities for new images from a saved head")
    p.add_argument("images", type=Path, help="an image file or a folder of images")
    p.add_argument("--model", type=Path, required=True, help="a .joblib head written by compare --save, or a finetune run folder")
    add_backbone_flags(p)
    p.add_argument("--out", type=Path, default=None, help="CSV to write (default: beside the model)")
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
    p.add_argument("--group-by", default=None, help="patient_id (or group): keep each patient on one side of the split")
    p.add_argument("--run-dir", type=Path, default=None, help="exact run folder")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder for run folders")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("report", help="fine-tuned models and heads side by side on the same test images")
    p.add_argument("runs", nargs="+", type=Path, help="finetune and compare run folders")
    p.add_argument("--out", type=Path, default=Path("runs") / "side-by-side.md")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("audit", help="duplicates, patient leakage and shortcuts in a dataset")
    add_backbone_flags(p, many=False)
    p.add_argument("--out", type=Path, default=None, help="report folder (default: runs/audit/<dataset id>/)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where audits are kept and looked up")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--strict", action="store_true", help="exit with status 1 when the audit finds anything")
    p.set_defaults(func=cmd_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a file name the terminal cannot show must not end the run
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except CxrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
