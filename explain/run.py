"""``cxr-transfer explain``: heatmaps and border shares for a folder of images, and sheets for reports.

``run_explain(images, model)`` writes, per readable image, ``<name>.png`` (the X-ray with the evidence
for the predicted class over it) and one row of ``explain.csv``:

    path, sha256, predicted, probability, method, center_share, middle_share, border_share, png

The shares split the positive evidence between the audit's regions (``regions.py``): ``center`` (the central
box of 80 % of each side), ``border`` (the outer frame 5 % of the side wide) and ``middle`` (the ring between
them); each lies in [0, 1] and the three sum to 1 (empty when a map has no positive evidence).
``explanation_sheet(paths, model, out_png)`` explains a given list of images on one PNG, for reports
(``validate --explain N``), and ``mean_shares`` averages the shares per class.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr_transfer.classify.predict import unlabeled_dataset
from cxr_transfer.classify.saved_model import finetuned_model_json, read_head_info, refuse_incomplete_run
from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.io import printable
from cxr_transfer.core.outputs import writable_folder
from cxr_transfer.explain.explainers import Explainer, load_explainer
from cxr_transfer.explain.overlay import write_overlay, write_sheet
from cxr_transfer.explain.regions import REGIONS, evidence_shares
from cxr_transfer.extract.dataset import Dataset, Sample, hash_samples
from cxr_transfer.extract.images import decoded_batches, read_rgb
from cxr_transfer.extract.pipeline import ExtractSettings, named_samples

log = logging.getLogger(__name__)

CSV_NAME = "explain.csv"
CSV_COLUMNS = ["path", "sha256", "predicted", "probability", "method", *(f"{r}_share" for r in REGIONS), "png"]


@dataclass
class Explanation:
    """One image's explanation: prediction, signed heatmap (the method's own resolution) and region shares."""

    path: str
    sha256: str
    predicted: str
    probability: float
    method: str
    heatmap: np.ndarray
    shares: dict[str, float]
    png: Path | None = None

    def row(self) -> list[str]:
        shares = ["" if math.isnan(self.shares[r]) else f"{self.shares[r]:.4f}" for r in REGIONS]
        return [self.path, self.sha256, self.predicted, f"{self.probability:.6f}", self.method, *shares,
                self.png.name if self.png else ""]


@dataclass
class ExplainResult:
    """What ``run_explain`` wrote: the folder, the CSV, one Explanation per readable image, skipped files."""

    out_dir: Path
    csv_path: Path
    method: str
    explanations: list[Explanation]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def summary_lines(self) -> list[str]:
        """What the command line prints: skipped files, the border share per predicted class, the folder."""
        return ([f"skipped {path}: {reason.split(': ', 1)[-1]}" for path, reason in self.skipped]
                + summary_lines(self.explanations)
                + [f"{self.method}: {len(self.explanations)} heatmaps in {self.out_dir} ({self.csv_path.name})"])


def mean_shares(explanations: Sequence[Explanation], labels: Sequence[str] | None = None,
                region: str = "border") -> dict[str, tuple[float, int]]:
    """Per class: (mean share of ``region``, images counted); classes are ``labels`` (e.g. the true ones)
    or, by default, the predicted ones. Images without positive evidence are left out of the mean."""
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r} instead")
    if labels is not None and len(labels) != len(explanations):
        raise ValueError(f"labels must have one entry per explanation ({len(explanations)}), got {len(labels)} "
                         f"instead")
    values: dict[str, list[float]] = defaultdict(list)
    for i, item in enumerate(explanations):
        if not math.isnan(item.shares[region]):
            values[labels[i] if labels is not None else item.predicted].append(item.shares[region])
    return {name: (float(np.mean(v)), len(v)) for name, v in sorted(values.items())}


def iter_explanations(dataset: Dataset, explainer: Explainer, settings: ExtractSettings,
                       skipped: list[tuple[str, str]]) -> Iterator[tuple[Explanation, Sample]]:
    """Explain the dataset's images batch by batch, in order; unreadable ones are added to ``skipped``, and so
    are files whose name is not valid UTF-8, with predict's reason (``extract.pipeline.named_samples``)."""

    samples, problems = named_samples(dataset)
    skipped += [(printable(dataset.relative(s)), reason) for s, reason in problems]
    for good, batch, bad in decoded_batches(samples, explainer.input_size, settings.batch_size,
                                            settings.decode_workers):
        skipped += [(dataset.relative(s), reason) for s, reason in bad]
        if not good:
            continue
        maps, proba = explainer.explain(batch)
        for sample, heatmap, p in zip(good, maps, proba):
            k = int(np.argmax(p))
            yield Explanation(dataset.relative(sample), sample.sha256, explainer.class_names[k], float(p[k]),
                              explainer.method, heatmap, evidence_shares(heatmap, explainer.input_size)), sample


def summary_lines(explanations: Sequence[Explanation], region: str = "border") -> list[str]:
    """One line per predicted class: every image explained, and the mean share of ``region`` over those with
    positive evidence (a map without any has no shares; how many is said separately)."""
    counts: dict[str, int] = defaultdict(int)
    for item in explanations:
        counts[item.predicted] += 1
    means = mean_shares(explanations, region=region)
    lines = []
    for name, total in sorted(counts.items()):
        if name not in means:
            lines.append(f"predicted {name}: {total} images, none with positive evidence (no {region} share)")
            continue
        share, with_evidence = means[name]
        text = f"predicted {name}: {total} images, mean {region} share {share:.1%}"
        if with_evidence < total:
            text += f" over the {with_evidence} with positive evidence ({total - with_evidence} without)"
        lines.append(text)
    return lines


def _title(item: Explanation, caption: str = "") -> str:
    border = "n/a" if math.isnan(item.shares["border"]) else f"{item.shares['border']:.0%}"
    head = f"{caption}\n" if caption else f"{printable(Path(item.path).name)[:40]}\n"
    return f"{head}{item.predicted} p={item.probability:.2f} ({item.method}), border {border}"


def _png_name(relative: str, used: set[str]) -> str:
    stem = relative.replace("\\", "/").rsplit(".", 1)[0].replace("/", "__") or "image"
    name, n = f"{stem}.png", 1
    while name in used:
        n += 1
        name = f"{stem}-{n}.png"
    used.add(name)
    return name


def default_out_dir(model: str | Path) -> Path:
    """Beside a saved head (``NAME-explain/``) or inside a fine-tuned run folder (``explain/``)."""

    finetuned = finetuned_model_json(model)
    if finetuned is not None:
        return finetuned.parent / "explain"
    return Path(model).with_name(Path(model).stem + "-explain")


def _earlier_run_files(out: Path) -> list[Path]:
    """explain.csv in ``out`` and the PNGs it lists (plain names in ``out`` only), when there is one."""
    csv_path = out / CSV_NAME
    if not csv_path.is_file():
        return []
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            names = [row.get("png") or "" for row in csv.DictReader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error):
        names = []
    pngs = [out / n for n in names if n.endswith(".png") and "/" not in n and "\\" not in n and (out / n).is_file()]
    return [csv_path, *dict.fromkeys(pngs)]


def prepare_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    """The output folder of an explain run, created and proved writable (``core.outputs.writable_folder``).

    A folder that already holds files is refused (an earlier run's explain.csv would be replaced and its PNGs
    left among the new ones) unless ``overwrite``: then the earlier explain run there (its explain.csv and
    the PNGs it lists) is removed, and any other file is left alone. CxrError naming the folder otherwise.
    """

    out = writable_folder(out, "output")
    entries = list(out.iterdir())
    if not entries:
        return out
    earlier = _earlier_run_files(out)
    if not overwrite:
        if earlier:
            raise CxrError(f"{out}: the output folder already holds an explain run ({CSV_NAME} and "
                           f"{len(earlier) - 1} PNGs); give another output folder, or overwrite=True "
                           f"(`overwrite`) to replace that run")
        raise CxrError(f"{out}: the output folder is not empty ({len(entries)} entries, no {CSV_NAME}); give an "
                       f"empty or new folder, or overwrite=True (`overwrite`) to write beside them")
    for path in earlier:
        path.unlink(missing_ok=True)
    return out


def run_explain(images: str | Path, model: str | Path, settings: ExtractSettings | None = None,
                   out_dir: str | Path | None = None, method: str = "auto", pngs: bool = True,
                   precision: str | None = None, overwrite: bool = False) -> ExplainResult:
    """Explain every image under a folder (or one file) with a saved head or a fine-tuned model.

    method: auto (cam for linear heads, occlusion for other heads, gradcam for fine-tuned models), cam,
    occlusion or gradcam. Writes ``explain.csv`` and, with ``pngs``, one overlay PNG per image into out_dir
    (default ``default_out_dir(model)``). Unreadable files are skipped and listed, like predict. ``precision``
    other than the one the head was trained on is refused. The output folder is checked before the model is
    loaded (``prepare_out_dir``: a folder holding files is refused unless ``overwrite``).
    """

    settings = settings or ExtractSettings()
    if finetuned_model_json(model) is None:
        refuse_incomplete_run(model)
        read_head_info(model)       # the model's plain-data description, before any folder is made
    out = Path(out_dir).expanduser() if out_dir is not None else default_out_dir(model)
    created = not out.exists()
    out = prepare_out_dir(out, overwrite)
    try:
        explainer = load_explainer(model, settings, method, precision)
        dataset = unlabeled_dataset(images, [])
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()              # a refused model or image folder leaves no empty output folder behind
        raise
    skipped: list[tuple[str, str]] = []
    explanations: list[Explanation] = []
    used: set[str] = set()
    csv_path = out / CSV_NAME
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for item, sample in iter_explanations(dataset, explainer, settings, skipped):
            if pngs:
                item.png = write_overlay(out / _png_name(item.path, used), read_rgb(sample.path), item.heatmap,
                                         _title(item))
            writer.writerow(item.row())
            explanations.append(item)
    if not explanations:
        raise CxrError(f"{images}: none of the {len(dataset)} images could be read")
    return ExplainResult(out, csv_path, explainer.method, explanations, skipped, explainer.details)


def explanation_sheet(paths: Sequence[str | Path], model: str | Path, out_png: str | Path, *,
                      captions: Sequence[str] | None = None, columns: int = 4, method: str = "auto",
                      settings: ExtractSettings | None = None,
                      own_run: bool = False) -> tuple[Path, list[Explanation]]:
    """Explain the given image files with ``model`` and draw them on one PNG, in the order given.

    captions: one line per image shown above its prediction (e.g. "true pneumonia, source kaggle"); default
    the file name. Returns the PNG and the explanations (same order; unreadable files raise CxrError).
    """

    files = [Path(p).expanduser().resolve() for p in paths]
    if not files:
        raise ValueError("paths must name at least one image")
    if captions is not None and len(captions) != len(files):
        raise ValueError(f"captions must have one entry per image ({len(files)}), got {len(captions)} instead")
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise CxrError(f"{missing[0]}: no such file ({len(missing)} of {len(files)} missing)")
    settings = settings or ExtractSettings()
    explainer = load_explainer(model, settings, method, own_run=own_run)
    root = Path(os.path.commonpath([p.parent for p in files]))
    dataset = Dataset(root, hash_samples([Sample(p, "") for p in files]), ["?"])
    skipped: list[tuple[str, str]] = []
    pairs = list(iter_explanations(dataset, explainer, settings, skipped))
    if skipped:
        raise CxrError(f"{skipped[0][1]} ({len(skipped)} of {len(files)} images unreadable)")
    explanations = [item for item, _ in pairs]
    titles = [_title(item, captions[i] if captions is not None else "") for i, item in enumerate(explanations)]
    out = write_sheet(out_png, [read_rgb(sample.path) for _, sample in pairs], [e.heatmap for e in explanations],
                      titles, columns)
    return out, explanations
