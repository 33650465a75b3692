"""``run_audit``: every check on one dataset, one report folder, and pointers for later runs.

Order: read the dataset (sha256 of every file) -> embed the full images (cached) -> duplicates ->
patient leakage -> acquisition shortcuts -> pixel shortcuts (two image masks, cached) -> findings ->
audit.md / audit.json / duplicates.png in ``out_dir`` (default ``runs/audit/<dataset cache id>/``).

``latest_audit_for(dataset)`` finds the newest audit.json under ``runs/audit/`` whose dataset fingerprint
equals the dataset's, or whose images include all of the dataset's (an audit of the whole set covers a
run on its train split); ``audit_pointer(dataset)`` turns it into the one line compare and finetune print.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_transfer.audit.acquisition import AcquisitionResult, acquisition_shortcuts
from cxr_transfer.audit.header_shortcuts import HeaderShortcutResult, header_shortcuts
from cxr_transfer.audit.leakage import LeakageResult, patient_leakage
from cxr_transfer.audit.pixel_shortcuts import PixelShortcutResult, pixel_shortcuts
from cxr_transfer.audit.report import AUDIT_JSON, write_report
from cxr_transfer.core.cache_keys import dataset_cache_id
from cxr_transfer.core.outputs import writable_folder
from cxr_transfer.core.params import FOLDS, SEED, check_params, param
from cxr_transfer.core.record import Stopwatch, run_record
from cxr_transfer.core.settings import BackboneSettings, UsesBackboneSettings
from cxr_transfer.extract.duplicates import DuplicateRule, DuplicateScan, find_duplicates, hash_cache_path
from cxr_transfer.extract.dataset import Dataset, load_dataset
from cxr_transfer.extract.pipeline import ExtractSettings, load_features

DEFAULT_RUNS_DIR = Path("runs")


@dataclass(frozen=True)
class AuditSettings(UsesBackboneSettings):
    """What to audit and how: the shared backbone settings plus the audit's own."""

    data: str | Path
    common: BackboneSettings = field(default_factory=BackboneSettings)
    out_dir: Path | None = param(None, help="report folder (default: runs/audit/<dataset id>/)", flag="--out")
    runs_dir: Path = param(DEFAULT_RUNS_DIR, help="where audits are kept and looked up")
    seed: int = param(0, SEED, "folds and heads")
    folds: int = param(5, FOLDS, "folds of the shortcut checks", cli=False)
    head: str = param("logreg", help="the head of the shortcut checks", cli=False)
    strict: bool = param(False, help="exit with status 1 when the audit finds anything")
    rule: DuplicateRule = field(default_factory=DuplicateRule)

    def __post_init__(self) -> None:
        check_params(self)

    def extract_settings(self) -> ExtractSettings:
        return ExtractSettings(common=self.common)

    def record(self) -> dict[str, Any]:
        return {"data": str(self.data), **self.common.record(), "out_dir": str(self.out_dir or ""),
                "seed": self.seed, "folds": self.folds, "head": self.head, "strict": self.strict,
                "rule": vars(self.rule)}


@dataclass
class AuditReport:
    """The audit's results; ``findings`` are the one-line problems (empty = nothing found)."""

    dataset: Dataset
    settings: AuditSettings
    duplicates: DuplicateScan
    leakage: LeakageResult
    acquisition: AcquisitionResult
    pixels: PixelShortcutResult
    header: HeaderShortcutResult
    findings: list[str]
    verdict: str
    timings: dict[str, float]
    payload: dict[str, Any]
    out_dir: Path
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """1 when the settings are strict and something was found, else 0."""
        return 1 if self.settings.strict and self.findings else 0

    def summary_lines(self) -> list[str]:
        """What the command line prints: skipped files, the verdict, each finding, the report's path."""
        return (self.dataset.skipped_summary() + [self.verdict] + [f"- {finding}" for finding in self.findings]
                + [f"report: {self.out_dir / 'audit.md'} ({self.timings['total']:.0f} s)"])


def default_out_dir(dataset: Dataset, runs_dir: Path = DEFAULT_RUNS_DIR) -> Path:
    return Path(runs_dir) / "audit" / dataset_cache_id(dataset.root)


def _findings(dup: DuplicateScan, leak: LeakageResult, acq: AcquisitionResult,
              pix: PixelShortcutResult, header: HeaderShortcutResult, has_groups: bool = False) -> list[str]:
    found = []
    if dup.exact:
        cross = sum(p.cross_split for p in dup.exact)
        found.append(f"{len(dup.exact)} exact duplicate pair(s) (same bytes), {cross} across splits")
    if dup.near:
        cross = sum(p.cross_split for p in dup.near)
        other = sum(not p.same_patient for p in dup.near)
        patients = f", {other} between different patient ids" if has_groups else ""
        found.append(f"{len(dup.near)} near-duplicate pair(s) in {len(dup.clusters())} cluster(s): {cross} across "
                     f"splits{patients}")
    if dup.unreadable:
        found.append(f"{len(dup.unreadable)} unreadable image(s)")
    if leak.checked and leak.leaked:
        found.append(f"{len(leak.leaked)} patient(s) in more than one split "
                     f"({sum(p.n_images for p in leak.leaked)} images)")
    if acq.shortcut:
        found.append(f"file properties alone predict the class: accuracy {acq.accuracy['mean']:.2f} "
                     f"vs chance {acq.chance:.2f}")
    if header.shortcut:
        found.append(f"DICOM header fields alone predict the class: accuracy {header.accuracy['mean']:.2f} vs chance "
                     f"{header.chance:.2f}, mostly from {', '.join(header.top_fields)}")
    if pix.separable_without_lungs:
        full = pix.scores.get("full")
        masked = ", ".join(f"{k} {v.accuracy['mean']:.2f}" for k, v in pix.scores.items() if k != "full")
        found.append(f"classes separable without the lungs: {masked}"
                     + (f" vs full {full.accuracy['mean']:.2f}" if full else "") + f" (chance {pix.chance:.2f})")
    return found


def _verdict(dup: DuplicateScan, leak: LeakageResult, acq: AcquisitionResult, pix: PixelShortcutResult,
             header: HeaderShortcutResult) -> str:
    parts = []
    if pix.separable_without_lungs or acq.shortcut or header.shortcut:
        text = "The classes can be told apart without looking at the disease:"
        reasons = []
        if acq.shortcut:
            reasons.append(f"file format, colour mode and size alone predict the class with "
                           f"{100 * acq.accuracy['mean']:.0f}% accuracy (chance {100 * acq.chance:.0f}%)")
        if header.shortcut:
            reasons.append(f"DICOM header fields ({', '.join(header.top_fields)}) alone predict the class with "
                           f"{100 * header.accuracy['mean']:.0f}% accuracy (chance {100 * header.chance:.0f}%)")
        if pix.separable_without_lungs:
            scores = pix.scores
            masked = " and ".join(f"{100 * scores[k].accuracy['mean']:.0f}% with {k.replace('-', ' ')}"
                                  for k in ("no-center", "border-only") if k in scores)
            full = f" ({100 * scores['full'].accuracy['mean']:.0f}% on full images)" if "full" in scores else ""
            reasons.append(f"with the lungs blacked out the classifier still reaches {masked}{full}")
        parts.append(text + " " + "; ".join(reasons) + ". High accuracy on this data is not evidence of "
                     "disease detection.")
    problems = []
    if dup.exact or dup.near:
        cross = sum(p.cross_split for p in dup.pairs)
        problems.append(f"{len(dup.exact)} exact and {len(dup.near)} near-duplicate image pairs "
                        f"({cross} across splits)")
    if leak.checked and leak.leaked:
        problems.append(f"{len(leak.leaked)} patients in more than one split")
    if problems:
        parts.append("The splits are not independent: " + ", ".join(problems)
                     + "; evaluate with patient-grouped folds and drop or merge duplicates.")
    unchecked = unchecked_shortcuts(acq, pix, header)
    checked = checked_shortcuts(acq, pix, header)
    if not parts:
        if not unchecked:
            ran = "duplicates, leakage or shortcuts"
        elif checked:     # e.g. duplicates, leakage, pixel or header-field shortcuts
            names = ["duplicates", "leakage", *checked]
            ran = ", ".join(names[:-1]) + f" or {names[-1]} shortcuts"
        else:
            ran = "duplicates or leakage"
        parts.append(f"No {ran} were found by these checks (which can only show problems, not prove their "
                     "absence).")
    if header.accuracy is not None and not header.shortcut:
        parts.append(f"A classifier on the header fields of the {header.n_dicom} DICOM files alone reaches "
                     f"{100 * header.accuracy['mean']:.0f}% accuracy (chance {100 * header.chance:.0f}%): no header "
                     "shortcut.")
    if unchecked:
        parts.append("Not checked: " + "; ".join(unchecked)
                     + (", so nothing is known about shortcuts." if not checked else "."))
    return " ".join(parts)


def checked_shortcuts(acq: AcquisitionResult, pix: PixelShortcutResult,
                      header: HeaderShortcutResult | None = None) -> list[str]:
    """The shortcut checks that ran (file-property, header-field, pixel), whatever they found."""
    ran = [("file-property", acq.accuracy is not None), ("pixel", bool(pix.scores)),
           ("header-field", header is not None and header.accuracy is not None)]
    return [name for name, done in ran if done]


def unchecked_shortcuts(acq: AcquisitionResult, pix: PixelShortcutResult,
                        header: HeaderShortcutResult | None = None) -> list[str]:
    """The shortcut checks that could not run (e.g. one class: nothing to tell apart), with the reason.

    The header-field check counts only when the dataset has DICOM files (without them it does not apply)."""
    missing = []
    if acq.accuracy is None:
        missing.append(f"acquisition shortcuts ({acq.skipped or 'no cross-validation'})")
    if header is not None and header.n_dicom and header.accuracy is None:
        missing.append(f"DICOM header shortcuts ({header.skipped or 'no cross-validation'})")
    if not pix.scores:
        missing.append(f"pixel shortcuts ({pix.skipped or 'no cross-validation'})")
    return missing


def _payload(dataset: Dataset, settings: AuditSettings, dup: DuplicateScan, leak: LeakageResult,
             acq: AcquisitionResult, pix: PixelShortcutResult, header: HeaderShortcutResult, findings: list[str],
             verdict: str, timings: dict[str, float], weights: str) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = {}
    for sample in dataset.samples:
        counts.setdefault(sample.split, Counter())[sample.label] += 1
    pairs = [p.to_dict() for p in dup.pairs]
    return {
        "kind": "audit",
        "record": run_record("audit", settings.record(), dataset_fingerprint=dataset.fingerprint),
        "settings": settings.record(),
        "weights": weights,
        "dataset": {"root": str(dataset.root), "fingerprint": dataset.fingerprint,
                    "cache_id": dataset_cache_id(dataset.root), "n_images": len(dataset),
                    "left_out": dataset.skipped,
                    "class_names": dataset.class_names, "has_groups": dataset.has_groups,
                    "counts": {k: dict(sorted(v.items())) for k, v in sorted(counts.items())},
                    "sha256": sorted({s.sha256 for s in dataset.samples})},
        "verdict": verdict,
        "findings": findings,
        "duplicates": {"rule": vars(dup.rule), "n_exact": len(dup.exact), "n_near": len(dup.near),
                       "n_near_cross_split": sum(p.cross_split for p in dup.near),
                       "n_near_different_patient": sum(not p.same_patient for p in dup.near),
                       "n_near_cross_label": sum(p.cross_label for p in dup.near),
                       "different_patient_pairs": dup.different_patient_stats(),
                       "clusters": dup.clusters(), "borderline": dup.borderline(),
                       "unreadable": dup.unreadable, "pairs": pairs},
        "leakage": leak.to_dict(),
        "acquisition": acq.to_dict(),
        "header_shortcuts": header.to_dict(),
        "pixel_shortcuts": pix.to_dict(),
        "timings": timings,
    }


def run_audit(settings: AuditSettings) -> AuditReport:
    """Run every check on ``settings.data`` and write the report folder (module docstring)."""
    watch = Stopwatch()
    out_dir = writable_folder(settings.out_dir, "`out`") if settings.out_dir else None
    dataset = load_dataset(settings.data, keep_duplicates=True)   # the audit reports repeated images
    out_dir = out_dir or writable_folder(default_out_dir(dataset, settings.runs_dir), "audit")
    watch.lap("read_dataset")
    extract = settings.extract_settings()
    full, result = load_features(dataset, extract)
    watch.lap("embed_full")
    embeddings = {s.sha256: full.embeddings[i] for i, s in enumerate(full.samples)}
    hash_cache = hash_cache_path(dataset, settings.cache_dir)
    duplicates = find_duplicates(dataset, embeddings, settings.rule, cache_path=hash_cache)
    watch.lap("duplicates")
    leakage = patient_leakage(dataset)
    acquisition = acquisition_shortcuts(dataset, settings.seed, settings.folds)
    header = header_shortcuts(dataset, settings.seed, settings.folds)
    watch.lap("leakage_acquisition")
    pixels = pixel_shortcuts(dataset, extract, settings.head, settings.folds, settings.seed, full=full)
    watch.lap("pixel_shortcuts")
    watch.total("total_before_report")
    findings = _findings(duplicates, leakage, acquisition, pixels, header, dataset.has_groups)
    verdict = _verdict(duplicates, leakage, acquisition, pixels, header)
    timings = watch.timings
    payload = _payload(dataset, settings, duplicates, leakage, acquisition, pixels, header, findings, verdict,
                       timings, result.weights.describe())
    report = AuditReport(dataset, settings, duplicates, leakage, acquisition, pixels, header, findings, verdict,
                         timings, payload, out_dir)
    report.paths = write_report(report.payload, out_dir)
    watch.total("total")
    return report


def _audits_under(runs_dir: Path) -> list[Path]:
    base = Path(runs_dir) / "audit"
    return sorted(base.glob(f"**/{AUDIT_JSON}")) if base.is_dir() else []


def latest_audit_for(dataset: Dataset, runs_dir: str | Path = DEFAULT_RUNS_DIR) -> Path | None:
    """The newest audit folder for this data: same fingerprint, or an audit covering all of its images."""
    best: tuple[int, str, Path] | None = None
    wanted = {s.sha256 for s in dataset.samples}
    for path in _audits_under(Path(runs_dir)):
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            data = payload["dataset"]
            created = payload["record"]["created"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if data.get("fingerprint") == dataset.fingerprint:
            rank = 1
        elif wanted and wanted <= set(data.get("sha256", [])):
            rank = 0
        else:
            continue
        if best is None or (rank, created) > best[:2]:
            best = (rank, created, path.parent)
    return best[2] if best else None


def audit_pointer(dataset: Dataset, runs_dir: str | Path = DEFAULT_RUNS_DIR) -> str | None:
    """One line for compare/finetune to print when an audit of this data exists, else None."""
    folder = latest_audit_for(dataset, runs_dir)
    if folder is None:
        return None
    try:
        payload = json.loads((folder / AUDIT_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    findings = payload.get("findings", [])
    scope = "this data" if payload["dataset"].get("fingerprint") == dataset.fingerprint else "a superset of this data"
    summary = f"{len(findings)} finding(s), e.g. {findings[0]}" if findings else "no findings"
    return f"audit of {scope} ({payload['record']['created'][:10]}): {summary} -> {folder / 'audit.md'}"
