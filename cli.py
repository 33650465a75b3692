#!/usr/bin/env python
"""cxr-transfer command line: a command table, flags made from the settings' field metadata, one runner.

Every command (``COMMANDS``) calls one function of ``cxr_transfer.api`` and prints its result's
``summary_lines()``; a library error that names a parameter is printed with that parameter's flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from cxr_transfer import api
from cxr_transfer.core.errors import CxrError, Int8RefusedError
from cxr_transfer.core.params import Interval, Options, flag_of, param_info, parse_floats


class Parser(argparse.ArgumentParser):
    """argparse with the house's one-line ``error: ...`` (exit status 2) for bad flags."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog.split()[-1]}: {message} (see {self.prog} --help)\n")


def flag_type(constraint: Interval | Options | None, annotation: str):
    """The argparse type of a field: a number checked against its Interval (the library's own words), a Path."""
    if isinstance(constraint, Interval):
        def parse(text: str) -> float | int:
            try:
                return constraint.parse(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        parse.__name__ = "number" if constraint.real else "int"
        return parse
    if isinstance(constraint, Options) and isinstance(constraint.values[0], int):
        return int
    if annotation.startswith("tuple"):
        return parse_floats
    return Path if "Path" in annotation and "str" not in annotation.split("|")[0] else str


def add_settings_flags(group, cls: type, skip: tuple[str, ...] = (), defaults: dict[str, Any] | None = None,
                       aliases: dict[str, str] | None = None, only: tuple[str, ...] = ()) -> None:
    """One flag per ``param`` field of ``cls`` (not in ``skip``): default, limits, choices and help from the
    field; a bool that defaults to True becomes ``--no-NAME``."""
    for field in dataclasses.fields(cls):
        info = param_info(field)
        if info is None or not info["cli"] or field.name in skip or (only and field.name not in only):
            continue
        default = (defaults or {}).get(field.name, field.default)
        names = [flag_of(field)] + ([aliases[field.name]] if field.name in (aliases or {}) else [])
        if field.type in ("bool", bool):   # a flag that turns it on, or --no-NAME when it is on by default
            group.add_argument(*(["--no-" + names[0][2:]] if default else names), dest=field.name,
                               action="store_false" if default else "store_true",
                               help=("turn off: " if default else "") + info["help"])
            continue
        constraint = info["constraint"]
        choices = constraint.values if isinstance(constraint, Options) else None
        shown = f" (default {default})" if default not in (None, "", dataclasses.MISSING) else ""
        metavar = None if choices else info.get("metavar") or names[0][2:].upper().replace("-", "_")
        optional = str(field.type).startswith("str | bool")   # --mlflow [URI]: the flag alone means True
        group.add_argument(*names, dest=field.name, default=default, help=info["help"] + shown, metavar=metavar,
                           **({"nargs": "?", "const": True} if optional else
                              {"choices": choices, "type": flag_type(constraint, str(field.type))}))


def add_common_flags(parser: argparse.ArgumentParser, classes: dict[str, type], command: Command) -> None:
    """--data, the model flags (BackboneSettings), the runtime flags and your own ONNX model's input flags (predict
    and explain: to find a moved ONNX file, and to refuse a size or precision the model was not trained at)."""
    if command.data:
        parser.add_argument("--data", type=Path, help="dataset folder (<class>/ or <split>/<class>/) or CSV; default: "
                                                      "$CXR_DATA, else ../shared/data/covid19-xray, else the sample")
    skip = ("allow_download",) + (("backbone",) if command.stage in ("compare", "validate") else ())
    model = parser.add_argument_group("model and runtime")
    add_settings_flags(model, classes["backbone"], skip=skip, aliases={"backbone": "--backbones"},
                       defaults={"precision": None, "input_size": command.input_size})
    if command.batch_size:
        add_settings_flags(model, classes["extract"], defaults={"batch_size": command.batch_size})
    add_settings_flags(parser.add_argument_group("your own ONNX model (--backbone onnx:PATH)"), classes["onnx"])


class Command(NamedTuple):
    """One subcommand: the API function, its help, where its own flags come from and which positionals it has."""

    function: str
    help: str
    stage: str | None = None          # the settings class whose fields become this command's own flags
    skip: tuple[str, ...] = ()        # fields of that class that are not flags (given otherwise)
    data: bool = True                 # takes --data
    common: bool = True               # takes the model and runtime flags
    batch_size: int | None = 16       # the --batch-size default (None: no such flag)
    input_size: int | None = None     # the --input-size default
    pointer: bool = False             # print the audit's pointer for --data
    tracking: bool = False            # takes --mlflow [URI] and --experiment (TrackingSettings)


STAGE_SKIP = ("data", "extract", "common", "rule")
KEYWORD_FLAGS = ("out", "out_dir", "run_name", "conformal", "method", "overwrite", "external", "format", "audit",
                 "target")
COMMANDS: dict[str, Command] = {
    "backbones": Command("backbone_table", "list the backbone registry and where weights were found", data=False,
                         common=False, batch_size=None),
    "extract": Command("extract", "embed a folder of images into the HDF5 cache", stage="engine"),
    "compare": Command("compare", "benchmark scikit-learn heads on cached embeddings", stage="compare", pointer=True,
                       tracking=True),
    "predict": Command("predict", "class probabilities for new images from a saved head", data=False),
    "finetune": Command("finetune_backbone", "the paper's frozen-body + dense-head Keras training", stage="finetune",
                        input_size=224, batch_size=None, pointer=True, tracking=True),
    "report": Command("report_runs", "fine-tuned models and heads side by side on the same test images", data=False,
                      common=False, batch_size=None),
    "audit": Command("audit_dataset", "duplicates, patient leakage and shortcuts in a dataset", stage="audit",
                     batch_size=None),
    "explain": Command("explain_images", "heatmaps of what a saved head or fine-tuned model looks at", data=False),
    "validate": Command("validate", "internal vs external validation: subgroups, calibration, conformal sets",
                        stage="validate", skip=("external",), tracking=True),
    "shift": Command("shift_check", "will it work on my X-rays? shift tests and label-free accuracy estimates for "
                                    "a target folder", stage="shift", skip=("target", "model"), tracking=True),
    "export": Command("export_embeddings", "cached embeddings as Parquet or .npy, readable by pandas, Spark and Ray"),
    "export-model": Command("export_model", "a saved head + backbone (or a fine-tuned model) as one ONNX file, "
                            "with its model card", data=False, batch_size=None),
}
OUT_HELP = {"export": "the Parquet file or npy folder to write", "export-model": "the .onnx file to write"}


def add_command_flags(p: argparse.ArgumentParser, name: str) -> None:
    """The few flags that are not settings fields: positionals, --model, --out of predict/explain/export."""
    if name in ("predict", "explain"):
        p.add_argument("images", type=Path, help="an image file or a folder of images")
    if name in ("predict", "explain", "export-model"):
        p.add_argument("--model", type=Path, required=True, help="a .joblib head saved by compare or validate "
                       "(--save), a finetune run folder" + ("" if name == "export-model" else ", an export-model file"))
    if name in ("predict", "explain", "export", "report", "export-model"):
        p.add_argument("--out", type=Path, required=name.startswith("export"),
                       default=Path("runs") / "side-by-side.md" if name == "report" else None,
                       help=OUT_HELP.get(name, "where to write (default: beside the model)"))
    if name in ("explain", "export"):
        p.add_argument("--overwrite", action="store_true", help="replace an earlier run's output in --out")
    if name == "predict":
        p.add_argument("--conformal", type=float, default=None, metavar="ALPHA", help="add a 'set' column: the "
                       "conformal prediction set at miscoverage ALPHA (validate --save heads of that --alpha)")
    if name == "explain":
        p.add_argument("--method", choices=("auto", "cam", "occlusion", "gradcam"), default="auto",
                       help="auto: exact CAM for linear heads, occlusion for other heads, Grad-CAM for fine-tuned")
    if name in ("compare", "validate", "shift"):
        p.add_argument("--out", dest="out_dir", type=Path, default=Path("runs"), help="folder for run folders")
        p.add_argument("--name", dest="run_name", default=None, help="run folder name (default: KIND-TIMESTAMP-...)")
    if name == "validate":
        p.add_argument("--external", type=Path, required=True, help="external dataset folder or CSV (never "
                       "trained or tuned on); its manifest's extra columns can be subgroups")
    if name == "shift":
        p.add_argument("--target", type=Path, required=True, help="the images to check (class folders only score "
                       "the estimates; a manifest.csv gives --subgroups)")
        p.add_argument("--model", type=Path, help="a .joblib head saved by compare or validate (--save): its "
                       "expected accuracy on the target (ATC, DoC), on its own backbone")
    if name == "export":
        p.add_argument("--format", choices=("parquet", "npy"), default="parquet",
                       help="parquet (one file, default) or npy (a folder)")
    if name == "export-model":
        p.add_argument("--audit", type=Path, help="audit folder of the training data for the model card "
                                                  "(default: the newest under runs/audit)")
    if name == "report":
        p.add_argument("runs", nargs="+", type=Path, help="finetune and compare run folders")
        p.add_argument("--head", default=None, help="the head beside the fine-tuned models (default: the chosen one)")
    if name == "backbones":   # where weights are found, at which size, and the user ONNX models of a cache
        add_settings_flags(p, api.BackboneSettings, only=("weights_dir", "input_size", "cache_dir"))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cxr-transfer", description=__doc__.split("\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)
    classes = api.settings_classes()
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help)
        add_command_flags(p, name)
        if command.common:
            add_common_flags(p, classes, command)
        if name == "export-model":   # the head's own backbone unless one is given: then it must be the head's
            p.set_defaults(backbone=None)
        if command.stage:
            defaults = {f.name: None for f in dataclasses.fields(classes["engine"]) if f.name != "name"}
            add_settings_flags(p.add_argument_group(f"{name} settings"), classes[command.stage],
                               skip=STAGE_SKIP + command.skip, aliases={"backbones": "--backbones"},
                               defaults=defaults if command.stage == "engine" else None)
        if command.tracking:
            add_settings_flags(p.add_argument_group("MLflow tracking (pip install \"cxr-transfer[mlflow]\")"),
                               classes["tracking"])
    return parser


def api_arguments(name: str, args: argparse.Namespace) -> tuple[list[Any], dict[str, Any]]:
    """The API call of a parsed command line: positionals and keywords, shared settings as ``common``."""
    command, values = COMMANDS[name], dict(vars(args))
    if name == "backbones":
        return [], {"weights_dir": args.weights_dir or api.default_location("weights"), "input_size": args.input_size,
                    "cache_dir": args.cache_dir}
    if name == "report":
        return [args.runs], {"out": args.out, "head": args.head}
    positionals = [args.images, args.model] if name in ("predict", "explain") else [args.model] \
        if name == "export-model" else [args.data or api.default_location("data")]
    keywords: dict[str, Any] = {key: values[key] for key in KEYWORD_FLAGS + (("model",) if name == "shift" else ())
                                if key in values}
    if command.stage == "engine":
        keywords["engine"] = engine_settings(args)
    elif command.stage:
        fields = dataclasses.fields(api.settings_classes()[command.stage])
        keywords.update({f.name: values[f.name] for f in fields if f.name in values and f.name not in STAGE_SKIP})
    if command.batch_size:
        keywords["batch_size"] = args.batch_size
    if command.tracking:
        keywords.update(mlflow=args.mlflow, experiment=args.experiment)
    backbones = api.register_onnx_backbones(values.get("backbones") or args.backbone or "vgg16", **{
        k: values[k] for k in ("channels", "preprocess", "mean", "std", "input_size", "cache_dir")})
    if command.data:   # predict and explain: the model's own backbone and precision, checked against these
        keywords["backbones" if "backbones" in values or name == "extract" else "backbone"] = backbones
    else:
        keywords.update(precision=args.precision,
                        **({"backbone": backbones} if name == "export-model" and args.backbone else {}))
    shared = {f.name: values[f.name] for f in dataclasses.fields(api.BackboneSettings) if f.name in values}
    keywords["common"] = api.BackboneSettings(**{**shared, "backbone": backbones.split(",")[0].strip() or "vgg16",
                                                 "weights_dir": args.weights_dir or api.default_location("weights"),
                                                 "precision": args.precision or "float32"})
    return positionals, keywords


def engine_settings(args: argparse.Namespace):
    """--engine and the Ray flags; Ray flags with the local engine are refused (they would do nothing)."""
    ray = {f.name: getattr(args, f.name) for f in dataclasses.fields(api.settings_classes()["engine"])
           if f.name != "name" and getattr(args, f.name, None) is not None}
    if args.name != "ray" and ray:
        given = ", ".join("--" + key.replace("_", "-") for key in ray)
        raise CxrError(f"{given} only apply to --engine ray; add --engine ray or leave them out")
    return api.settings_classes()["engine"](name=args.name, **ray)


def run(name: str, args: argparse.Namespace) -> int:
    """Call the command's API function and print its summary; the exit status of the result, else 0."""
    command = COMMANDS[name]
    positionals, keywords = api_arguments(name, args)
    try:
        result = getattr(api, command.function)(*positionals, **keywords)
    except Int8RefusedError as exc:   # the other backbones ran: report them, then the refusal (exit 2)
        print("\n".join(line for result in exc.results for line in result.summary_lines()))
        raise
    if hasattr(result, "summary_lines"):
        print("\n".join(result.summary_lines()))
    else:   # finetune: its run folder
        print(f"run folder: {result} (report.md, results.json, curves.png, confusion.png, model.keras, model.onnx)")
    if command.pointer and (pointer := api.audit_pointer(positionals[0])):
        print(pointer)
    return getattr(result, "exit_code", 0)


FLAGS = {"out_dir": "--out", "run_name": "--name", "weights": "--weights", "n_jobs": "--jobs", "engine": "--engine"}


def error_line(exc: CxrError) -> str:
    """The message with parameter names as flags: the leading ``param`` (``folds must ...`` -> ``--folds must ...``)
    and every parameter of an API function or settings field in backticks (`` `run_name` `` -> ``--name``)."""
    functions = [getattr(api, c.function) for c in COMMANDS.values()] + [api.register_onnx_backbones]
    flags = {p: "--" + p.replace("_", "-") for f in functions for p in inspect.signature(f).parameters} | FLAGS
    flags |= {f.name: flag_of(f) for cls in api.settings_classes().values() for f in dataclasses.fields(cls)
              if param_info(f)}
    text, parameter = str(exc), getattr(exc, "param", None)
    if parameter and text.startswith(parameter):
        text = flags.get(parameter, "--" + parameter.replace("_", "-")) + text[len(parameter):]
    return "error: " + re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: flags.get(m[1], m[0]), text)


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
        return run(args.command, args)
    except CxrError as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
