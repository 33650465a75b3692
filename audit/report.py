"""Write an audit into its folder: audit.md (verdict first), audit.json, duplicates.png (pairs side by side)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cxr_transfer.core.plotting import subplots
from cxr_transfer.core.record import write_json
from cxr_transfer.core.tables import mean_std
from cxr_transfer.extract.images import ImageDecodeError, read_rgb

AUDIT_JSON = "audit.json"
AUDIT_MD = "audit.md"
SHEET_PNG = "duplicates.png"
SHEET_CAP = 40
"""At most this many pairs are drawn on the sheet (the JSON lists all of them)."""
MD_PAIR_ROWS = 60


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _acc(summary: dict | None) -> str:
    if not summary:
        return "n/a"
    return mean_std(summary, digits=1, scale=100, suffix="%")


def write_sheet(pairs: list[dict], root: Path, path: Path, cap: int = SHEET_CAP) -> tuple[int, bool]:
    """Draw up to ``cap`` pairs, two pairs per row; returns (pairs drawn, capped?). Nothing when no pairs."""
    if not pairs:
        return 0, False
    shown = pairs[:cap]
    per_row = 2
    rows = (len(shown) + per_row - 1) // per_row
    fig, axes = subplots(rows, 2 * per_row, figsize=(4 * 2.6, rows * 3.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, pair in enumerate(shown):
        row, col = divmod(k, per_row)
        score = f"{pair['kind']} pHash {pair['phash_distance']}" + (
            f" cos {pair['cosine']:.3f}" if pair.get("cosine") is not None else "")
        for side, key in enumerate(("a", "b")):
            ax = axes[row, 2 * col + side]
            try:
                image = _thumbnail(root / pair[key])
                ax.imshow(image, cmap="gray", vmin=0, vmax=255)
            except ImageDecodeError:
                ax.text(0.5, 0.5, "unreadable", ha="center", transform=ax.transAxes)
            name = pair[key] if len(pair[key]) <= 34 else "..." + pair[key][-31:]
            meta = f"{pair['label_' + key]}/{pair['split_' + key]} {pair['group_' + key][:22]}"
            ax.set_title(f"{name}\n{meta}" + (f"\n#{k + 1} {score}" if side == 0 else "\n"), fontsize=6.5)
    title = f"duplicate pairs: {len(shown)} of {len(pairs)}" + (" (capped)" if len(pairs) > cap else "")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return len(shown), len(pairs) > cap


def _thumbnail(path: Path, side: int = 256) -> np.ndarray:
    """The image decoded by the library's rule, shrunk to ``side`` px on its long edge (aspect kept)."""
    import cv2

    rgb = read_rgb(path)
    height, width = rgb.shape[:2]
    scale = side / max(height, width)
    if scale < 1:
        rgb = cv2.resize(rgb, (max(1, round(width * scale)), max(1, round(height * scale))),
                         interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def _pair_table(pairs: list[dict]) -> list[str]:
    lines = ["| # | kind | image a | image b | pHash | cosine | across splits | patients |",
             "|---|---|---|---|---|---|---|---|"]
    for k, p in enumerate(pairs[:MD_PAIR_ROWS], start=1):
        patients = "same" if p["same_patient"] else f"{p['group_a'] or '?'} / {p['group_b'] or '?'}"
        cos = "n/a" if p["cosine"] is None else f"{p['cosine']:.3f}"
        lines.append(f"| {k} | {p['kind']} | {p['a']} | {p['b']} | {p['phash_distance']} | {cos} | "
                     f"{'yes' if p['cross_split'] else 'no'} | {patients} |")
    if len(pairs) > MD_PAIR_ROWS:
        lines.append(f"\n({len(pairs) - MD_PAIR_ROWS} more pairs in audit.json)")
    return lines


def _header_section(head: dict | None) -> list[str]:
    """Section 3b: the DICOM header-field classifier (only when the dataset has DICOM files)."""
    if not head or not head["n_dicom"]:
        return []
    out = ["## 3b. Header shortcuts (DICOM header fields, no pixels)", "",
           f"{head['n_dicom']} of {head['n_images']} images are DICOM. Values per class of each header field "
           f"(no patient-identifying field is read):", "", "| field | " + " | ".join(
               next(iter(head["values"].values()), {}).keys()) + " |",
           "|---|" + "---|" * len(next(iter(head["values"].values()), {}))]
    for name, per_class in head["values"].items():
        cells = [", ".join(f"{k} {v}" for k, v in list(counts.items())[:4]) + (" ..." if len(counts) > 4 else "")
                 for counts in per_class.values()]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out.append("")
    if head["unreadable"]:
        out += [f"Headers not readable: {len(head['unreadable'])} (listed in audit.json).", ""]
    if head["accuracy"] is None:
        out += [f"Classifier: {head['skipped']}", ""]
        return out
    out += [f"Random forest on header fields alone, {'patient-grouped ' if head['grouped'] else ''}5-fold CV: "
            f"accuracy {_acc(head['accuracy'])} (chance {_pct(head['chance'])}, shortcut threshold chance + "
            f"{head['margin']:.0%}), balanced accuracy {_pct(head['balanced_accuracy'])}; recall "
            + ", ".join(f"{k} {_pct(v)}" for k, v in head["per_class_recall"].items())
            + ". Share of the signal per field: "
            + (", ".join(f"{k} {100 * v:.0f}%" for k, v in head["field_importance"].items() if v >= 0.01)
               or "none (no field differs between the classes in a way the forest could use)") + ".", ""]
    if head["shortcut"]:
        out += [f"**The header tells the classes apart**, mostly through {', '.join(head['top_fields'])}: a model "
                "can learn the scanner or protocol instead of the disease; evaluate on data where these fields "
                "do not follow the class.", ""]
    return out


def markdown(payload: dict[str, Any]) -> str:
    """audit.md from the audit.json payload."""
    data, dup, leak = payload["dataset"], payload["duplicates"], payload["leakage"]
    acq, pix = payload["acquisition"], payload["pixel_shortcuts"]
    out = [f"# Dataset audit: {data['root']}", "", f"**Verdict.** {payload['verdict']}", ""]
    out += ["## Findings", ""] + ([f"- {f}" for f in payload["findings"]] or ["- none"]) + [""]
    counts = ", ".join(f"{split or '(no split)'}: " + ", ".join(f"{k} {v}" for k, v in labels.items())
                       for split, labels in data["counts"].items())
    out += [f"{data['n_images']} images ({counts}); fingerprint `{data['fingerprint'][:16]}`; "
            f"backbone {payload['settings']['backbone']} ({payload['weights']}).", ""]

    rule = dup["rule"]
    stats = dup["different_patient_pairs"]
    out += ["## 1. Duplicates", "",
            f"Exact (same sha256): {dup['n_exact']} pairs. Near duplicates: {dup['n_near']} pairs "
            f"({dup['n_near_cross_split']} across splits, "
            + (f"{dup['n_near_different_patient']} between different patient ids, " if data.get("has_groups") else "")
            + f"{dup['n_near_cross_label']} with different labels).",
            "",
            f"Rule: pHash distance (256-bit pHash of the equalised grey image, best of 81 trimmed crops) "
            f"<= {rule['phash_alone']}, or <= {rule['phash_with_embedding']} with embedding cosine >= "
            f"{rule['cosine_min']}. Over the {stats['pairs']} pairs of "
            f"{'different patients' if stats['by_patient_id'] else 'different files'} it flags "
            f"{stats['flagged']} ({100 * stats['rate']:.3f}%): each is a true duplicate or a false alarm; "
            f"look at the sheet.", ""]
    if dup["pairs"]:
        sheet = f"Sheet: `{SHEET_PNG}` ({dup['sheet_pairs']} pairs" + (
            f", capped at {SHEET_CAP} of {len(dup['pairs'])})." if dup["sheet_capped"] else ").")
        out += [sheet, ""] + _pair_table(dup["pairs"]) + [""]
    multi = [c for c in dup["clusters"] if len(c) > 2]
    if multi:
        out += ["Clusters of more than two images (one radiograph, several files): "
                + "; ".join(", ".join(c) for c in multi) + ".", ""]
    if dup["borderline"]:
        out += ["Borderline pairs, not flagged (just outside the rule; check by eye):", ""]
        out += [f"- {b['a']} / {b['b']}: pHash {b['phash_distance']}, cosine {b['cosine']:.3f}"
                + ("" if not b["group_a"] else f" (patients {b['group_a']} / {b['group_b']})")
                for b in dup["borderline"]] + [""]
    if dup["unreadable"]:
        out += [f"Unreadable images: {len(dup['unreadable'])} (listed in audit.json).", ""]

    out += ["## 2. Patient leakage", ""]
    if not leak["checked"]:
        out += [f"Not checked: {leak['reason']}.", ""]
    else:
        out += [f"{leak['n_leaked']} of {leak['n_patients']} patients have images in more than one split; "
                f"{leak['multi_image_patients']} patients have several images (use grouped CV)."
                + (f" Patients with mixed labels: {', '.join(leak['mixed_label_patients'])}."
                   if leak["mixed_label_patients"] else ""), ""]
        if leak["leaked"]:
            out += ["| patient | label | images per split |", "|---|---|---|"]
            for p in leak["leaked"]:
                sides = "; ".join(f"{split}: {', '.join(Path(x).name for x in paths)}"
                                  for split, paths in p["images"].items())
                out.append(f"| {p['group']} | {', '.join(p['labels'])} | {sides} |")
            out.append("")

    out += ["## 3. Acquisition shortcuts (file properties, no pixels)", "",
            "| class | n | format | mode | width median (min-max) | height median (min-max) | file KiB median |",
            "|---|---|---|---|---|---|---|"]
    for name, s in acq["summary"].items():
        fmt = ", ".join(f"{k} {v}" for k, v in s["format"].items())
        mode = ", ".join(f"{k} {v}" for k, v in s["mode"].items())
        out.append(f"| {name} | {s['n']} | {fmt} | {mode} | {s['width']['median']:.0f} ({s['width']['min']:.0f}-"
                   f"{s['width']['max']:.0f}) | {s['height']['median']:.0f} ({s['height']['min']:.0f}-"
                   f"{s['height']['max']:.0f}) | {s['file_kib']['median']:.0f} |")
    out.append("")
    head = payload.get("header_shortcuts") or {}
    if acq["accuracy"] is None and head.get("n_dicom") and not acq["summary"]:
        out += ["Classifier: not run; Pillow reads no DICOM file (their header fields are in section 3b).", ""]
    elif acq["accuracy"] is None:
        out += [f"Classifier: {acq['skipped']}", ""]
    else:
        out += [f"Random forest on file properties alone, {'patient-grouped ' if acq['grouped'] else ''}5-fold CV: "
                f"accuracy {_acc(acq['accuracy'])} (chance {_pct(acq['chance'])}, shortcut threshold chance + "
                f"{acq['margin']:.0%}), balanced accuracy {_pct(acq['balanced_accuracy'])}; recall "
                + ", ".join(f"{k} {_pct(v)}" for k, v in acq["per_class_recall"].items())
                + ". Most used properties: " + ", ".join(f"{k} ({v:.2f})" for k, v in acq["importances"].items())
                + ".", ""]

    out += _header_section(payload.get("header_shortcuts"))
    out += ["## 4. Pixel shortcuts (lungs removed)", ""]
    if pix["skipped"]:
        out += [pix["skipped"], ""]
    out += [f"{pix['head']} on {payload['settings']['backbone']} embeddings, "
            f"{'patient-grouped ' if pix['grouped'] else ''}{pix['folds']}-fold CV; chance {_pct(pix['chance'])}. "
            f"no-center: central {pix['center_fraction']:.0%} x {pix['center_fraction']:.0%} box set to 0; "
            f"border-only: all but a {pix['border_fraction']:.0%} frame set to 0.", "",
            "| mask | accuracy (mean ± std over folds) | balanced accuracy | recall per class |", "|---|---|---|---|"]
    for name, s in pix["scores"].items():
        recall = ", ".join(f"{k} {_pct(v)}" for k, v in s["per_class_recall"].items())
        out.append(f"| {name} | {_acc(s['accuracy'])} | {_pct(s['balanced_accuracy'])} | {recall} |")
    out.append("")
    if pix["separable_without_lungs"]:
        out += ["**The classes stay separable without the lungs**: the masked images are classified far above "
                "chance, so the model can rely on what lies outside the chest.", ""]

    timings = payload["timings"]
    out += ["## Run", "", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + ".", "",
            f"Created {payload['record']['created']}; settings: `{payload['settings']}`.", ""]
    return "\n".join(out)


def write_report(payload: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write audit.json, audit.md and the duplicate sheet from the audit's payload; returns their paths (the
    sheet only when there are pairs). ``payload`` gains the sheet's pair count."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = payload["duplicates"]["pairs"]
    sheet = out_dir / SHEET_PNG
    if sheet.exists():
        sheet.unlink()
    drawn, capped = write_sheet(pairs, Path(payload["dataset"]["root"]), sheet)
    payload["duplicates"]["sheet_pairs"] = drawn
    payload["duplicates"]["sheet_capped"] = capped
    paths = {"json": write_json(out_dir / AUDIT_JSON, payload)}
    md = out_dir / AUDIT_MD
    md.write_text(markdown(payload), encoding="utf-8", errors="backslashreplace")
    paths["md"] = md
    if drawn:
        paths["sheet"] = sheet
    return paths
