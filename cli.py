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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from core.errors import CxrError  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "shared" / "data" / "covid19-xray"
SAMPLE_DATA = Path(__file__).resolve().parent / "data" / "sample"


def default_data() -> Path:
    """../shared's dataset when it is there, else the small bundled sample."""
    return DEFAULT_DATA if DEFAULT_DATA.is_dir() else SAMPLE_DATA


def default_weights_dir() -> str | None:
    shared = DEFAULT_DATA.parent.parent / "weights"
    return os.environ.get("CXR_WEIGHTS_DIR") or (str(shared) if shared.is_dir() else None)


def add_backbone_flags(parser: argparse.ArgumentParser, many: bool = True, input_size: int | None = None,
                       batch_size: int = 16) -> None:
    parser.add_argument("--data", type=Path, default=None,
                        help="dataset folder (<class>/ or <split>/<class>/) or CSV; default: ../shared's "
                             "covid19-xray, else data/sample")
    parser.add_argument("--backbone", "--backbones", dest="backbone", default="vgg16",
                        help="backbone name" + (", comma list or 'all'" if many else ""))
    parser.add_argument("--weights", type=Path, default=None, help="weights file for the (single) backbone")
    parser.add_argument("--weights-dir", default=default_weights_dir(),
                        help="folder searched for <backbone>_*.h5 (also $CXR_WEIGHTS_DIR); default ../shared/weights")
    parser.add_argument("--random-weights", action="store_true", help="random weights (tests only, never a fallback)")
    parser.add_argument("--input-size", type=int, default=input_size,
                        help=f"square input size (default: {input_size or 'the backbone' + chr(39) + 's'})")
    parser.add_argument("--cache-dir", type=Path, default=Path("features"), help="feature and ONNX cache folder")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"default {batch_size}")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def extract_settings(args: argparse.Namespace):
    from extract.pipeline import ExtractSettings

    return ExtractSettings(backbone=args.backbone.split(",")[0], weights_file=args.weights,
                           weights_dir=args.weights_dir, random_weights=args.random_weights,
                           input_size=args.input_size, cache_dir=args.cache_dir, batch_size=args.batch_size,
                           threads=args.threads, progress=not args.no_progress)


def cmd_backbones(args: argparse.Namespace) -> int:
    from extract.commands import backbone_table, format_table

    print(format_table(backbone_table(args.weights_dir, args.input_size)))
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from extract.commands import extract_many

    data = args.data or default_data()
    results = extract_many(data, args.backbone, extract_settings(args))
    for result in results:
        print(result.summary())
        for path, reason in result.failures:
            print(f"  skipped {path}: {reason.split(': ', 1)[-1]}")
    return 0


def audit_pointer_line(data: Path) -> str | None:
    """The audit's one-line pointer for this data, when an audit of it exists."""
    try:
        from audit.run import audit_pointer
        from extract.dataset import load_dataset
    except ImportError:
        return None
    return audit_pointer(load_dataset(data))


def cmd_compare(args: argparse.Namespace) -> int:
    from classify.compare import CompareSettings, run_compare
    from classify.report import summary_rows, text_table

    data = args.data or default_data()
    settings = CompareSettings(data=data, extract=extract_settings(args), backbones=args.backbone, heads=args.heads,
                               protocol=args.protocol, seed=args.seed, seeds=args.seeds, folds=args.folds,
                               repeats=args.repeats, test_size=args.test_size, group_by=args.group_by,
                               concat=args.concat, tune=args.tune, save=args.save, out_dir=args.out,
                               run_name=args.name, n_jobs=args.jobs)
    run = run_compare(settings)
    print(text_table(summary_rows(run.summary)))
    print(f"\nrun folder: {run.run_dir} (report.md, results.json, results.csv, plots, record.json)")
    pointer = audit_pointer_line(data)
    if pointer:
        print(pointer)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from classify.predict import predict_images

    out, skipped = predict_images(args.images, args.model, extract_settings(args), args.out)
    for path, reason in skipped:
        print(f"skipped {path}: {reason.split(': ', 1)[-1]}")
    print(f"predictions: {out}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from finetune.train import FinetuneSettings, run_finetune

    data = args.data or default_data()
    settings = FinetuneSettings(data=data, backbone=args.backbone, weights_file=args.weights,
                                weights_dir=args.weights_dir, random_weights=args.random_weights,
                                epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                input_size=args.input_size, seed=args.seed, fast=args.fast, views=args.views,
                                augment=not args.no_augment, dense_units=args.dense_units, dropout=args.dropout,
                                test_size=args.test_size, group_split=args.group_by == "patient_id",
                                run_dir=args.run_dir, out_dir=args.out, cache_dir=args.cache_dir,
                                threads=args.threads, progress=not args.no_progress)
    run_dir = run_finetune(settings)
    print(f"run folder: {run_dir} (report.md, results.json, curves.png, confusion.png, model.keras, model.onnx)")
    pointer = audit_pointer_line(data)
    if pointer:
        print(pointer)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from classify.side_by_side import side_by_side, write_side_by_side
    from classify.report import text_table

    rows, notes = side_by_side(args.runs)
    print(text_table(rows))
    for note in notes:
        print(f"note: {note}")
    out = write_side_by_side(args.runs, args.out)
    print(f"\nreport: {out}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from audit.run import AuditSettings, run_audit

    settings = AuditSettings(data=args.data or default_data(), backbone=args.backbone, weights_file=args.weights,
                             weights_dir=args.weights_dir, random_weights=args.random_weights,
                             input_size=args.input_size, cache_dir=args.cache_dir, out_dir=args.out,
                             runs_dir=args.runs_dir, seed=args.seed, strict=args.strict,
                             progress=not args.no_progress)
    report = run_audit(settings)
    print(report.verdict)
    for finding in report.findings:
        print(f"- {finding}")
    print(f"report: {report.out_dir / 'audit.md'} ({report.timings['total']:.0f} s)")
    return report.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cli.py", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("backbones", help="list the backbone registry and where weights were found")
    p.add_argument("--weights-dir", default=default_weights_dir())
    p.add_argument("--input-size", type=int, default=None)
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=10, help="paper protocol: number of seeded splits")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--test-size", type=float, default=0.2)
    p.add_argument("--group-by", default=None, help="patient_id: no patient on both sides of a split")
    p.add_argument("--concat", action="store_true", help="also evaluate all backbones' embeddings concatenated")
    p.add_argument("--tune", action="store_true", help="tune each head by inner CV on the training fold only")
    p.add_argument("--save", action="store_true", help="refit each head on all evaluated images and save it")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder for run folders")
    p.add_argument("--name", default=None, help="run folder name (default: compare-PROTOCOL-TIMESTAMP)")
    p.add_argument("--jobs", type=int, default=-1, help="parallel fits (default: all cores)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("predict", help="class probabilities for new images from a saved head")
    p.add_argument("images", type=Path, help="an image file or a folder of images")
    p.add_argument("--model", type=Path, required=True, help="a .joblib head written by compare --save, or a finetune run folder")
    add_backbone_flags(p)
    p.add_argument("--out", type=Path, default=None, help="CSV to write (default: beside the model)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("finetune", help="the paper's frozen-body + dense-head Keras training")
    add_backbone_flags(p, many=False, input_size=224, batch_size=8)
    p.add_argument("--epochs", type=int, default=35)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="split, initialisation, augmentation and batch order")
    p.add_argument("--fast", action="store_true", help="train the head on a cached bank of augmented views")
    p.add_argument("--views", type=int, default=10, help="--fast: augmented views per training image (1: none)")
    p.add_argument("--no-augment", action="store_true", help="plain loop without augmentation")
    p.add_argument("--dense-units", type=int, default=64, help="hidden units of the head (see finetune/model.py)")
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--test-size", type=float, default=0.2)
    p.add_argument("--group-by", default=None, help="patient_id: keep each patient on one side of the split")
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="exit with status 1 when the audit finds anything")
    p.set_defaults(func=cmd_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
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
