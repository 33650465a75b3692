"""The results schema shared by compare and finetune, so ``report_runs`` can put runs side by side.

A run folder holds ``results.json``:

    {"kind": "compare" | "finetune", "class_names": [...], "record": {run record},
     "evaluations": [Evaluation, ...],      # one per (backbone, model, protocol, repeat, fold)
     "summary": [...]}                      # mean/std/95% interval per (backbone, model, protocol)

An evaluation's ``test_fingerprint`` is the sha256 over the sorted sha256 of its test images: two runs
compare on the same images exactly when their fingerprints are equal.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.hashing import sha256_strings
from cxr_transfer.core.io import cannot_write_error
from cxr_transfer.core.outputs import check_run_name, incomplete_run, new_run_dir, run_in_progress, writable_folder
from cxr_transfer.core.record import write_json

RESULTS_FILE = "results.json"


@dataclass
class Evaluation:
    """One model evaluated on one test set."""

    backbone: str
    model: str                 # head name ("logreg", ...) or "finetune" / "finetune-fast"
    protocol: str              # "paper" | "cv" | "holdout"
    repeat: int
    fold: int
    n_train: int
    n_test: int
    test_fingerprint: str
    metrics: dict[str, Any]    # classify.metrics.classification_metrics output
    fit_seconds: float
    predict_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def images_fingerprint(test_sha256: Iterable[str]) -> str:
    """Identity of a test set: sha256 over its images' sorted sha256."""
    return sha256_strings(sorted(test_sha256))


def save_results(run_dir: str | Path, kind: str, class_names: Sequence[str], record: dict[str, Any],
                 evaluations: Sequence[Evaluation], summary: list[dict[str, Any]]) -> Path:
    """Write results.json into run_dir (atomic)."""
    return write_json(Path(run_dir) / RESULTS_FILE, {
        "kind": kind, "class_names": list(class_names), "record": record,
        "evaluations": [asdict(e) for e in evaluations], "summary": summary})


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """Read a run folder's results.json, with evaluations as Evaluation objects."""
    path = Path(run_dir) / RESULTS_FILE
    incomplete = incomplete_run(run_dir)
    if incomplete:
        raise CxrError(incomplete)
    if not path.is_file():
        raise CxrError(f"{run_dir}: not a cxr-transfer run folder (no {RESULTS_FILE})")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CxrError(f"{path}: not a readable results file ({type(exc).__name__}: {exc})") from None
    if isinstance(payload, dict) and payload.get("kind") == "validate":
        raise CxrError(f"{run_dir}: a validate run (internal vs external accuracy), which report does not put "
                       f"side by side; read its report.md, or give compare and finetune run folders")
    try:
        payload["evaluations"] = [Evaluation(**e) for e in payload["evaluations"]]
    except (ValueError, TypeError, KeyError) as exc:
        raise CxrError(f"{path}: not a readable results file ({type(exc).__name__}: {exc})") from None
    return payload


def run_folder_error(run_dir: Path, exc: OSError) -> CxrError:
    """The one message for a run folder that could not be written (``core.outputs.run_in_progress`` has
    removed it): a full disk under --out, or why the folder refused the write."""
    return cannot_write_error(Path(run_dir).parent, exc, "output folder", flag="`out_dir`",
                              kept=f"the unfinished run folder {Path(run_dir).name} is removed")


@contextmanager
def writing_run_folder(out_dir: str | Path, prefix: str, run_name: str | None, kind: str) -> Iterator[Path]:
    """A new run folder under ``out_dir`` (``run_name``, else ``<prefix>-<time>-<random>``), written inside
    ``run_in_progress`` (a run killed before its end is seen as incomplete); a write that fails (a full disk,
    a read-only folder) removes the folder and raises the one ``run_folder_error`` line."""
    run_dir = new_run_dir(out_dir, prefix, run_name)
    try:
        with run_in_progress(run_dir, kind):
            yield run_dir
    except OSError as exc:
        raise run_folder_error(run_dir, exc) from None


def evaluate_then_write(evaluate: Callable[[Any], Any], write: Callable[[Any, Any, Any], Path], settings: Any,
                        out_dir: str | Path, run_name: str | None = None) -> Any:
    """``evaluate(settings)``, then ``write(result, out_dir, run_name)``: compare's and validate's run with a
    folder. ``out_dir`` and ``run_name`` are checked first, so a folder that cannot be written fails before any
    computing, not after it."""
    writable_folder(out_dir, "`out`")
    if run_name:
        check_run_name(out_dir, run_name)
    result = evaluate(settings)
    write(result, out_dir, run_name)
    return result
