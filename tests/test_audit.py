"""audit: duplicates, leakage, acquisition and pixel shortcuts, the report folder and the pointers.

Images are small synthetic radiographs (body, lungs with ribs, spine, a smooth random field) written to
tmp_path; embeddings use random VGG16 weights at 32 px, exported to ONNX once per session. One test also
edits a few real images from ../shared when that folder exists.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cxr_transfer.audit import AuditSettings, audit_pointer, latest_audit_for, run_audit
from cxr_transfer.audit.acquisition import acquisition_shortcuts
from cxr_transfer.extract.duplicates import (
    DuplicateRule,
    crop_hashes,
    find_duplicates,
    grey_for_hash,
    phash_distance,
    phash_distance_matrix,
)
from cxr_transfer.audit.leakage import patient_leakage
from cxr_transfer.audit.pixel_shortcuts import pixel_shortcuts
from cxr_transfer.extract.images import BORDER_ONLY, NO_CENTER, border_only, mask_center
from testkit.transforms import (
    combined,
    crop_5,
    crop_5_corner,
    equalise,
    reencode_jpeg,
    resize_half,
    save_grey,
    text_label,
)
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.pipeline import ExtractSettings, load_features

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL_DATA = SHARED / "data" / "covid19-xray"

BRIEF_EDITS = {"jpeg70": reencode_jpeg, "resize50": resize_half, "crop5": crop_5, "text": text_label,
               "equalise": equalise}
HASH_ALONE_EDITS = ("jpeg70", "resize50", "crop5", "equalise", "crop5corner")
"""Edits the threshold benchmark found within the pHash-alone threshold on real images (docs/audit-notes.md)."""


def radiograph(seed: int, height: int = 320, width: int = 288) -> np.ndarray:
    """A grey chest-X-ray-like image: body ellipse, two ribbed lungs, spine, smooth random density."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.full((height, width), 20.0, np.float32)
    cx, cy = width * rng.uniform(0.45, 0.55), height * rng.uniform(0.5, 0.6)
    image[((xx - cx) / (0.45 * width)) ** 2 + ((yy - cy) / (0.55 * height)) ** 2 < 1] = 150
    for side in (-1, 1):
        lx, ly = cx + side * width * rng.uniform(0.15, 0.22), cy - height * rng.uniform(0.02, 0.1)
        lung = ((xx - lx) / (width * rng.uniform(0.1, 0.15))) ** 2 + \
            ((yy - ly) / (height * rng.uniform(0.25, 0.32))) ** 2 < 1
        ribs = 25 * np.sin(yy / height * rng.uniform(25, 40) + rng.uniform(0, 6) + 0.01 * (xx - lx) ** 2 / width)
        image[lung] = 70 + ribs[lung]
    image[np.abs(xx - cx) < width * 0.035] += 60
    field = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), width / 12)
    image += 40 * field / (np.abs(field).max() + 1e-6) + rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One feature/ONNX cache for the session: the random VGG16 is exported once."""
    return tmp_path_factory.mktemp("features")


def tiny_settings(cache_dir: Path) -> ExtractSettings:
    return ExtractSettings.from_options(random_weights=True, input_size=32, cache_dir=cache_dir, progress=False, batch_size=32)


def hashes_of(grey: np.ndarray) -> np.ndarray:
    """crop_hashes of an in-memory image, decoded the way files are (256 px square)."""
    return crop_hashes(cv2.resize(grey, (256, 256), interpolation=cv2.INTER_AREA))


# ---------------------------------------------------------------- duplicates


def test_phash_distance_small_for_every_edit_and_large_between_different_images():
    rule = DuplicateRule()
    bases = [radiograph(seed) for seed in range(6)]
    hashes = [hashes_of(b) for b in bases]
    for base, base_hash in zip(bases, hashes):
        for name, edit in {**BRIEF_EDITS, "crop5corner": crop_5_corner, "combined": combined}.items():
            distance = phash_distance(base_hash, hashes_of(edit(base)))
            assert distance <= rule.phash_with_embedding, (name, distance)
            if name in HASH_ALONE_EDITS:  # found without any help from the embeddings
                assert distance <= rule.phash_alone, (name, distance)
        assert phash_distance(base_hash, base_hash) == 0
    different = [phash_distance(hashes[i], hashes[j]) for i in range(6) for j in range(i + 1, 6)]
    assert min(different) > rule.phash_with_embedding


def test_trimmed_crops_make_a_corner_crop_match():
    """Without the trimmed crops a 5% corner crop is far away; with them it is close."""
    base = radiograph(3)
    cropped = crop_5_corner(base)
    whole_only = phash_distance(hashes_of(base)[:1], hashes_of(cropped)[:1])
    with_crops = phash_distance(hashes_of(base), hashes_of(cropped))
    assert with_crops <= DuplicateRule().phash_alone < whole_only


def test_distance_matrix_matches_pairwise_and_is_symmetric():
    hashes = np.stack([hashes_of(radiograph(s)) for s in range(4)])
    matrix = phash_distance_matrix(hashes)
    assert (matrix == matrix.T).all() and (np.diag(matrix) == 0).all()
    for i in range(4):
        for j in range(4):
            assert matrix[i, j] == phash_distance(hashes[i], hashes[j])


def test_rule_needs_embedding_agreement_between_thresholds():
    rule = DuplicateRule(phash_alone=10, phash_with_embedding=40, cosine_min=0.9)
    phash = np.array([5, 30, 30, 50])
    cosine = np.array([0.0, 0.95, 0.5, 0.99])
    assert rule.flags(phash, cosine).tolist() == [True, True, False, False]
    assert rule.flags(phash, None).tolist() == [True, False, False, False]


def write_edited_dataset(root: Path) -> dict[str, str]:
    """train/: four distinct radiographs in two classes; test/: an exact copy and the five edits of one.

    Returns edited file (relative path) -> the original it was made from.
    """
    made = {}
    for seed in range(4):
        label = "covid" if seed % 2 else "normal"
        folder = root / "train" / label
        folder.mkdir(parents=True, exist_ok=True)
        save_grey(radiograph(seed), folder / f"img{seed}.png")
    source = root / "train" / "normal" / "img0.png"
    original = np.asarray(Image.open(source))
    test = root / "test" / "normal"
    test.mkdir(parents=True)
    shutil.copyfile(source, test / "copy.png")
    made["test/normal/copy.png"] = "train/normal/img0.png"
    for name, edit in BRIEF_EDITS.items():
        save_grey(edit(original), test / f"{name}.png")
        made[f"test/normal/{name}.png"] = "train/normal/img0.png"
    return made


def test_find_duplicates_finds_exact_copy_and_every_edit_across_splits(tmp_path, cache_dir):
    made = write_edited_dataset(tmp_path / "data")
    dataset = load_dataset(tmp_path / "data", keep_duplicates=True)   # as run_audit reads it
    features, _ = load_features(dataset, tiny_settings(cache_dir))
    embeddings = {s.sha256: features.embeddings[i] for i, s in enumerate(features.samples)}
    scan = find_duplicates(dataset, embeddings)
    found = {frozenset((p.a, p.b)): p for p in scan.pairs}
    for edited, original in made.items():
        pair = found.get(frozenset((edited, original)))
        assert pair is not None, f"{edited} not paired with {original}"
        assert pair.cross_split and pair.cosine is not None
    assert found[frozenset(("test/normal/copy.png", "train/normal/img0.png"))].kind == "exact"
    # the four distinct training images are never paired with each other
    distinct = [f"train/{'covid' if s % 2 else 'normal'}/img{s}.png" for s in range(4)]
    assert not [p for p in scan.pairs if p.a in distinct and p.b in distinct]
    assert scan.different_patient_stats()["flagged"] == len(scan.pairs)  # no patient ids: every pair counts


def test_hash_cache_is_reused_and_clusters_join_pairs(tmp_path, monkeypatch):
    import cxr_transfer.extract.duplicates as duplicates

    write_edited_dataset(tmp_path / "data")
    dataset = load_dataset(tmp_path / "data", keep_duplicates=True)   # as run_audit reads it
    cache = tmp_path / "hashes.npz"
    first = find_duplicates(dataset, cache_path=cache)
    assert cache.is_file()
    monkeypatch.setattr(duplicates, "hash_files", lambda paths, workers=2: [] if not paths else 1 / 0)
    second = find_duplicates(dataset, cache_path=cache)  # every hash from the cache: hash_files never runs
    assert [(p.a, p.b, p.phash_distance) for p in second.pairs] == [(p.a, p.b, p.phash_distance) for p in first.pairs]
    clusters = second.clusters()
    assert "train/normal/img0.png" in clusters[0] and "test/normal/copy.png" in clusters[0]
    assert len(clusters[0]) >= 4


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="../shared/data/covid19-xray not present")
def test_real_images_edits_found_and_different_patients_apart():
    """Three real images (one per class): every edit stays within the rule, the originals stay apart."""
    manifest = list(csv.DictReader(open(REAL_DATA / "manifest.csv")))
    picks = [next(r["path"] for r in manifest if r["label"] == label) for label in ("covid", "normal", "pneumonia")]
    rule = DuplicateRule()
    hashes = []
    for path in picks:
        grey = cv2.cvtColor(np.asarray(Image.open(REAL_DATA / path).convert("RGB")), cv2.COLOR_RGB2GRAY)
        base = crop_hashes(grey_for_hash(REAL_DATA / path))
        hashes.append(base)
        for name, edit in BRIEF_EDITS.items():
            distance = phash_distance(base, hashes_of(edit(grey)))
            assert distance <= (rule.phash_alone if name in HASH_ALONE_EDITS else rule.phash_with_embedding), \
                (path, name, distance)
    for i in range(3):
        for j in range(i + 1, 3):
            assert phash_distance(hashes[i], hashes[j]) > rule.phash_with_embedding


# ---------------------------------------------------------------- leakage


def write_manifest(root: Path, rows: list[tuple[str, str, str, str]]) -> None:
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "split", "label", "patient_id"])
        writer.writerows(rows)


def test_leakage_lists_patients_in_both_splits_with_their_images(tmp_path):
    rows = []
    for split, label, name, patient in [("train", "covid", "a.png", "p1"), ("test", "covid", "b.png", "p1"),
                                        ("train", "normal", "c.png", "p2"), ("test", "normal", "d.png", "p3"),
                                        ("train", "normal", "e.png", "p2")]:
        folder = tmp_path / split / label
        folder.mkdir(parents=True, exist_ok=True)
        save_grey(radiograph(len(rows), 64, 64), folder / name)
        rows.append((f"{split}/{label}/{name}", split, label, patient))
    write_manifest(tmp_path, rows)
    result = patient_leakage(load_dataset(tmp_path))
    assert result.checked and result.n_patients == 3 and result.multi_image_patients == 2
    assert [p.group for p in result.leaked] == ["p1"]
    assert result.leaked[0].images == {"test": ["test/covid/b.png"], "train": ["train/covid/a.png"]}


def test_leakage_not_checked_without_patient_ids(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "covid").mkdir(parents=True)
        save_grey(radiograph(1, 64, 64), tmp_path / split / "covid" / "x.png")
    result = patient_leakage(load_dataset(tmp_path))
    assert not result.checked and result.leaked == []


# ---------------------------------------------------------------- acquisition


def write_property_dataset(root: Path, shortcut: bool) -> None:
    """Two classes of 12 images; with ``shortcut`` they differ in format, mode and size, else they do not."""
    rng = np.random.default_rng(0)
    for label in ("covid", "normal"):
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(12):
            height, width = 96 + int(rng.integers(0, 40)), 96 + int(rng.integers(0, 40))
            grey = radiograph(100 * (label == "covid") + i, height, width)
            if shortcut and label == "covid":
                Image.fromarray(np.stack([grey] * 3, axis=2)).resize((300, 240)).save(folder / f"{i}.png")
            else:
                Image.fromarray(grey).save(folder / f"{i}.jpg", quality=90)


def test_acquisition_flags_classes_that_differ_in_file_properties(tmp_path):
    write_property_dataset(tmp_path, shortcut=True)
    result = acquisition_shortcuts(load_dataset(tmp_path), seed=0, folds=4)
    assert result.summary["covid"]["format"] == {"PNG": 12} and result.summary["normal"]["mode"] == {"L": 12}
    assert result.shortcut and result.accuracy["mean"] > 0.9


def test_acquisition_quiet_when_properties_are_alike(tmp_path):
    write_property_dataset(tmp_path, shortcut=False)
    result = acquisition_shortcuts(load_dataset(tmp_path), seed=0, folds=4)
    assert result.accuracy is not None and not result.shortcut


# ---------------------------------------------------------------- pixel shortcuts


def test_masks_zero_the_right_regions():
    image = np.full((100, 100, 3), 200, np.uint8)
    center = mask_center(image)
    assert center[50, 50].sum() == 0 and center[5, 50].sum() > 0 and (center == 0).mean() == pytest.approx(0.64)
    border = border_only(image)
    assert border[50, 50].sum() == 0 and border[2, 50].sum() > 0 and border[50, 97].sum() > 0
    assert (border > 0).mean() == pytest.approx(1 - 0.9 ** 2)
    assert image.min() == 200  # the input is not modified
    assert NO_CENTER.name != BORDER_ONLY.name


def test_pixel_shortcuts_detect_a_class_difference_in_the_border(tmp_path, cache_dir):
    """Classes differ only in a bright frame (like a scanner's collimation): still separable with no centre."""
    for label, frame in (("covid", 255), ("normal", 0)):
        folder = tmp_path / label
        folder.mkdir(parents=True)
        for i in range(10):
            grey = radiograph(1000 + 10 * (label == "covid") + i, 128, 128)
            grey[:8, :] = grey[-8:, :] = frame
            grey[:, :8] = grey[:, -8:] = frame
            save_grey(grey, folder / f"{i}.png")
    result = pixel_shortcuts(load_dataset(tmp_path), tiny_settings(cache_dir), folds=5, seed=0)
    assert set(result.scores) == {"full", "no-center", "border-only"}
    assert result.scores["border-only"].accuracy["mean"] > 0.9
    assert result.separable_without_lungs


# ---------------------------------------------------------------- end to end


def write_audit_dataset(root: Path) -> None:
    """train/test with a manifest: 6 patients per class, patient n1 in both splits, one cross-split copy."""
    rows = []
    for label, offset in (("covid", 0), ("normal", 50)):
        for i in range(8):
            split = "train" if i < 6 else "test"
            patient = f"{label[0]}{i % 6}" if i != 7 else f"{label[0]}9"
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            grey = radiograph(offset + i, 160, 144)
            if label == "covid":  # covid as RGB PNG, normal as grey JPEG: an acquisition shortcut
                Image.fromarray(np.stack([grey] * 3, 2)).save(folder / f"{i}.png")
                name = f"{i}.png"
            else:
                Image.fromarray(grey).save(folder / f"{i}.jpg", quality=90)
                name = f"{i}.jpg"
            rows.append((f"{split}/{label}/{name}", split, label, patient))
    source = root / "train" / "normal" / "0.jpg"
    save_grey(resize_half(np.asarray(Image.open(source))), root / "test" / "normal" / "small.png")
    rows.append(("test/normal/small.png", "test", "normal", "n8"))
    write_manifest(root, rows)


def test_run_audit_writes_report_and_pointer(tmp_path, cache_dir):
    write_audit_dataset(tmp_path / "data")
    runs = tmp_path / "runs"
    settings = AuditSettings.from_options(data=tmp_path / "data", random_weights=True, input_size=32, cache_dir=cache_dir,
                             runs_dir=runs, folds=3, strict=True, progress=False)
    report = run_audit(settings)
    assert report.out_dir.parent == runs / "audit"
    assert {p.name for p in report.out_dir.iterdir()} >= {"audit.md", "audit.json", "duplicates.png"}
    markdown = (report.out_dir / "audit.md").read_text().splitlines()
    assert markdown[0].startswith("# Dataset audit") and markdown[2].startswith("**Verdict.**")
    payload = json.loads((report.out_dir / "audit.json").read_text())
    near = [(p["a"], p["b"]) for p in payload["duplicates"]["pairs"] if p["kind"] == "near"]
    assert ("test/normal/small.png", "train/normal/0.jpg") in near or \
        ("train/normal/0.jpg", "test/normal/small.png") in near
    assert [p["group"] for p in payload["leakage"]["leaked"]] == ["c0", "n0"]  # i=6 reuses patient 0
    assert payload["acquisition"]["shortcut"]
    assert any("near-duplicate" in f for f in report.findings)
    stages = ["read_dataset", "embed_full", "duplicates", "leakage_acquisition", "pixel_shortcuts"]
    assert list(payload["timings"]) == [*stages, "total_before_report"]      # written before the report's own time
    assert list(report.timings) == [*stages, "total_before_report", "total"]
    laps = sum(report.timings[stage] for stage in stages)
    assert report.timings["total"] >= report.timings["total_before_report"] >= laps - 0.05
    assert any("more than one split" in f for f in report.findings)
    assert report.exit_code == 1
    dataset = load_dataset(tmp_path / "data")
    assert latest_audit_for(dataset, runs) == report.out_dir
    assert latest_audit_for(dataset.subset("train"), runs) == report.out_dir  # a superset's audit covers it
    pointer = audit_pointer(dataset, runs)
    assert pointer and str(report.out_dir / "audit.md") in pointer and "finding" in pointer


def test_no_pointer_for_other_data(tmp_path):
    folder = tmp_path / "other" / "covid"
    folder.mkdir(parents=True)
    save_grey(radiograph(7, 64, 64), folder / "x.png")
    dataset = load_dataset(tmp_path / "other")
    assert latest_audit_for(dataset, tmp_path / "runs") is None
    assert audit_pointer(dataset, tmp_path / "runs") is None


def test_cli_audit_exits_2_on_a_bad_path(tmp_path, capsys):
    from cxr_transfer.cli import main

    assert main(["audit", "--data", str(tmp_path / "missing"), "--random-weights", "--no-progress"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_findings_speak_of_patient_ids_only_when_there_are_ids_and_name_unrun_checks():
    """Issue 9, item 12: 'between different patient ids' without ids; 'nothing found' without having checked."""
    import numpy as np

    from cxr_transfer.audit.acquisition import AcquisitionResult
    from cxr_transfer.extract.duplicates import DuplicatePair, DuplicateRule, DuplicateScan
    from cxr_transfer.audit.header_shortcuts import HeaderShortcutResult
    from cxr_transfer.audit.leakage import LeakageResult
    from cxr_transfer.audit.pixel_shortcuts import PixelShortcutResult
    from cxr_transfer.audit.run import _findings, _verdict

    pair = DuplicatePair("near", "covid/a.png", "covid/b.png", "covid", "covid", "", "", "", "", 3, 0.99)
    dup = DuplicateScan([pair], [], np.zeros((0, 0)), None, [], DuplicateRule())
    leak = LeakageResult(False, "no patient ids", 0, [], 0, [])
    skipped = "no cross-validation: only one class ('covid', 5 images); need at least two classes to split"
    acq = AcquisitionResult({}, [], None, None, {}, 1.0, {}, False, skipped)
    pix = PixelShortcutResult("logreg", 5, False, 1.0, {}, skipped)
    header = HeaderShortcutResult(n_dicom=0, n_images=5)
    assert "patient ids" not in " ".join(_findings(dup, leak, acq, pix, header, has_groups=False))
    assert "1 between different patient ids" in " ".join(_findings(dup, leak, acq, pix, header, has_groups=True))
    verdict = _verdict(DuplicateScan([], [], np.zeros((0, 0)), None, [], DuplicateRule()), leak, acq, pix, header)
    assert "Not checked: acquisition shortcuts (no cross-validation: only one class ('covid'" in verdict
    assert "No duplicates or leakage were found" in verdict and "or shortcuts were found" not in verdict
