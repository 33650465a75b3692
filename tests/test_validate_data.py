"""validate's data handling: EXT's extra columns from the one dataset loader (BOM, CSV outside its folder),
manifest paths normalised before matching, TRAIN/EXT overlap (bytes, near duplicates, patient ids) and
skipped images named in the summary and report (reliability-2026-12: H1, H2, M3, M4)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from cxr_transfer.classify.protocols import resolve_groups
from cxr_transfer.validation.run import ValidateSettings, run_validate
from cxr_transfer.core.errors import CxrError
from testkit.synthetic import write_class_tree
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.pipeline import ExtractSettings

BOM = "\ufeff"


def _manifest(root: Path, header: str, row, bom: bool = False, name: str = "manifest.csv") -> Path:
    """Write ROOT/name with one row per image (``row(relative path) -> str``), optionally with a BOM."""
    lines = [header] + [row(p.relative_to(root).as_posix()) for p in sorted(root.rglob("*.png"))]
    path = root / name
    path.write_text((BOM if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def _train_tree(root: Path) -> Path:
    """TRAIN: train/<class>/ with 12 images per class, two images per patient."""
    write_class_tree(root, per_class=12, splits=("train",))
    _manifest(root, "path,patient_id", lambda rel: f"{rel},p-{rel.split('/')[1]}-{int(rel[-7:-4]) // 2}")
    return root


def _ext_tree(root: Path, bom: bool = False) -> Path:
    """EXT: 3 images per class, manifest path,label,source,patient_id (source s-0 / s-1 by image number)."""
    write_class_tree(root, per_class=3, seed=500)
    _manifest(root, "path,label,source,patient_id",
              lambda rel: f"{rel},{rel.split('/')[0]},s-{int(rel[-7:-4]) % 2},e-{rel.split('/')[0]}-{rel[-7:-4]}",
              bom=bom)
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vdata")


@pytest.fixture(scope="module")
def tr(base) -> Path:
    return _train_tree(base / "tr")


@pytest.fixture(scope="module")
def ext_bom(base) -> Path:
    return _ext_tree(base / "ext_bom", bom=True)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("features")


def _settings(train: Path, external: Path, cache_dir: Path, **options) -> ValidateSettings:
    extract = ExtractSettings.from_options(backbone="mobilenetv2", random_weights=True, input_size=32,
                                           progress=False, cache_dir=cache_dir)
    return ValidateSettings(data=train, external=external, extract=extract, backbones="mobilenetv2",
                            heads="logreg", folds=3, n_boot=100, n_jobs=1, **options)


CLI_COMMON = ["--backbone", "mobilenetv2", "--random-weights", "--input-size", "32", "--no-progress", "--heads",
              "logreg", "--folds", "3", "--n-boot", "100", "--jobs", "1"]


# ------------------------------------------------------------------------------------- H1: one loader for columns


def test_loader_keeps_manifest_columns_of_a_bom_manifest(ext_bom):
    dataset = load_dataset(ext_bom)
    assert dataset.columns == ["label", "source", "patient_id"]
    assert {s.column("source") for s in dataset.samples} == {"s-0", "s-1"}
    first = dataset.samples[0]
    assert dataset.relative(first) == "covid/img_000.png" and first.column("source") == "s-0"
    assert first.column("age_group") is None and first.group == "e-covid-000"


def test_loader_keeps_columns_of_a_csv_outside_its_folder(ext_bom, base):
    folder = base / "ext_csv"
    folder.mkdir()
    rows = [f"../{ext_bom.name}/{p.relative_to(ext_bom).as_posix()},{p.parent.name},csv-{p.stem[-1]}"
            for p in sorted(ext_bom.rglob("*.png"))]
    (folder / "list.csv").write_text("path,label,source\n" + "\n".join(rows) + "\n")
    dataset = load_dataset(folder / "list.csv")
    assert dataset.columns == ["label", "source"]
    assert [s.column("source") for s in dataset.samples][:3] == ["csv-0", "csv-1", "csv-2"]


def test_validate_subgroups_of_a_bom_manifest_and_of_a_csv_outside_its_folder(tr, ext_bom, base, cache_dir,
                                                                              tmp_path):
    run = run_validate(_settings(tr, ext_bom, cache_dir, subgroups="source"), tmp_path, "bom")
    (model,) = run.models
    assert {r["value"] for r in model.subgroups["source"]} == {"s-0", "s-1"}
    assert sum(r["n"] for r in model.subgroups["source"] if r["class"] == "all") == 9
    if not (base / "ext_csv" / "list.csv").is_file():
        test_loader_keeps_columns_of_a_csv_outside_its_folder(ext_bom, base)
    run = run_validate(_settings(tr, base / "ext_csv" / "list.csv", cache_dir, subgroups="source"), tmp_path, "csv")
    (model,) = run.models
    assert {r["value"] for r in model.subgroups["source"]} == {"csv-0", "csv-1", "csv-2"}
    predictions = (run.run_dir / "external_predictions.csv").read_text()
    assert "(missing)" not in predictions and "csv-2" in predictions


# ------------------------------------------------------------------------------------- M4: manifest paths normalised


def test_manifest_paths_are_normalised_before_matching(tmp_path):
    root = write_class_tree(tmp_path / "d", per_class=3, splits=("train",))
    styles = [lambda rel: f"./{rel}", lambda rel: rel.replace("/", "\\"), lambda rel: rel.replace("/", "//"),
              lambda rel: f"train/../{rel}"]
    counter = iter(range(100))
    _manifest(root, "path,patient_id", lambda rel: f"{styles[next(counter) % 4](rel)},p{rel[-7:-4]}")
    dataset = load_dataset(root)
    assert dataset.has_groups and all(dataset.groups)
    assert dataset.manifest_unmatched == []
    assert resolve_groups(dataset, "patient_id", merge_duplicates=False) is not None


def test_an_unmatched_manifest_says_which_rows_match_no_image(tmp_path):
    root = write_class_tree(tmp_path / "d", per_class=2, splits=("train",))
    _manifest(root, "path,patient_id", lambda rel: f"data/{rel},p{rel[-7:-4]}")
    dataset = load_dataset(root)
    assert dataset.manifest_unmatched[0] == "data/train/covid/img_000.png"
    with pytest.raises(CxrError) as caught:
        resolve_groups(dataset, "patient_id", merge_duplicates=False)
    message = str(caught.value)
    assert "6 row(s) of manifest.csv match no image" in message and "data/train/covid/img_000.png" in message
    assert "relative to" in message


def test_validate_with_dot_path_manifests_groups_train_and_ext_by_patient(tr, base, cache_dir, tmp_path):
    tr_dot = base / "tr_dot"
    shutil.copytree(tr, tr_dot)
    _manifest(tr_dot, "path,patient_id", lambda rel: f"./{rel},p-{rel.split('/')[1]}-{int(rel[-7:-4]) // 2}")
    ext_dot = _ext_tree(base / "ext_dot")
    _manifest(ext_dot, "path,label,source,patient_id",
              lambda rel: f".\\{rel.replace('/', chr(92))},{rel.split('/')[0]},s,e-{rel[-7:-4]}")
    run = run_validate(_settings(tr_dot, ext_dot, cache_dir), tmp_path, "dot")
    record = json.loads((run.run_dir / "record.json").read_text())
    assert record["grouping"].startswith("patient_id")
    assert record["external_clusters"] == "patients"


# ------------------------------------------------------------------------------------- H2 + M3: overlap, skipped


def test_cli_refuses_ext_that_is_train(tr, cache_dir, tmp_path, run_cli):
    done = run_cli("validate", "--data", tr, "--external", tr, *CLI_COMMON, "--cache-dir", cache_dir,
                   "--out", tmp_path, "--name", "same")
    assert done.returncode == 2
    line = done.error_line()
    assert "every one of the 36 images of EXT" in line and "TRAIN" in line
    assert not (tmp_path / "same").exists()


@pytest.fixture(scope="module")
def ext_mixed(tr, base) -> Path:
    """EXT with 2 byte copies of TRAIN images, 1 resized JPEG of a TRAIN image, 1 image of a TRAIN patient,
    a truncated JPEG, a text file named .png, and an image outside any class folder."""
    root = _ext_tree(base / "ext_mixed")
    shutil.copy(tr / "train" / "covid" / "img_000.png", root / "covid" / "copy_a.png")
    shutil.copy(tr / "train" / "normal" / "img_003.png", root / "normal" / "copy_b.png")
    Image.open(tr / "train" / "pneumonia" / "img_005.png").convert("RGB").resize((64, 64)).save(
        root / "pneumonia" / "near.jpg", quality=90)
    rows = (root / "manifest.csv").read_text().splitlines()
    rows = [r.replace("e-normal-001", "p-normal-3") for r in rows]   # normal/img_001 shares TRAIN patient
    rows += ["covid/copy_a.png,covid,s-0,e-copy-a", "normal/copy_b.png,normal,s-1,e-copy-b",
             "pneumonia/near.jpg,pneumonia,s-0,e-near"]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    good = (tr / "train" / "covid" / "img_001.png").read_bytes()
    Image.open(tr / "train" / "covid" / "img_002.png").convert("RGB").save(root / "covid" / "trunc.jpg")
    data = (root / "covid" / "trunc.jpg").read_bytes()
    (root / "covid" / "trunc.jpg").write_bytes(data[: len(data) // 3])
    (root / "normal" / "notes.png").write_text("not an image")
    (root / "stray.png").write_bytes(good)
    return root


def test_cli_flags_overlap_excludes_it_and_names_skipped_images(tr, ext_mixed, cache_dir, tmp_path, run_cli):
    bad_train = tr.parent / "tr_bad"
    if not bad_train.exists():
        shutil.copytree(tr, bad_train)
        (bad_train / "train" / "normal" / "broken.png").write_text("not an image either")
        with open(bad_train / "manifest.csv", "a") as handle:
            handle.write("train/normal/broken.png,p-broken\n")
    done = run_cli("validate", "--data", bad_train, "--external", ext_mixed, *CLI_COMMON, "--cache-dir", cache_dir,
                   "--out", tmp_path, "--name", "mixed")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    warning = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "4 of 12 external images overlap TRAIN" in warning[0]
    assert "left out of the external metrics" in warning[0]
    # M3: skipped images named and counted, for EXT and for TRAIN
    for name in ("covid/trunc.jpg", "normal/notes.png", "stray.png", "train/normal/broken.png"):
        assert name in out, name
    assert "EXT: 3 file(s) skipped" in out and "TRAIN: 1 file(s) skipped" in out
    run_dir = tmp_path / "mixed"
    results = json.loads((run_dir / "results.json").read_text())
    overlap = results["overlap"]
    assert overlap["identical"]["n"] == 2
    assert {p["external"] for p in overlap["identical"]["pairs"]} == {"covid/copy_a.png", "normal/copy_b.png"}
    assert {p["train"] for p in overlap["identical"]["pairs"]} == {"train/covid/img_000.png",
                                                                   "train/normal/img_003.png"}
    assert overlap["near_duplicate"]["n"] == 1
    assert overlap["near_duplicate"]["pairs"][0]["external"] == "pneumonia/near.jpg"
    assert overlap["near_duplicate"]["pairs"][0]["train"] == "train/pneumonia/img_005.png"
    assert overlap["shared_patients"]["patient_ids"] == ["p-normal-3"]
    assert overlap["shared_patients"]["n_external_images"] == 1 and overlap["shared_patients"]["n_train_images"] == 2
    assert overlap["excluded"]["n"] == 4 and overlap["n_external_evaluated"] == 8
    assert "normal/img_001.png" in overlap["excluded"]["images"]
    (model,) = results["models"]
    assert model["external"]["n"] == 8
    report = (run_dir / "report.md").read_text()
    assert "## Overlap with TRAIN" in report and "normal/copy_b.png" in report and "p-normal-3" in report
    assert "left out of the external metrics" in report
    assert "## Skipped images" in report and "covid/trunc.jpg" in report and "train/normal/broken.png" in report
    predicted = (run_dir / "external_predictions.csv").read_text()
    assert "copy_a.png" not in predicted and len(predicted.strip().splitlines()) == 9


def test_manifest_matches_nfd_paths_and_strips_spaces_around_values(tmp_path):
    """A manifest saved on macOS writes 'Müller' in NFD; the file on disk is NFC. A patient id typed as
    ' p7 ' is patient 'p7' (it slipped past validate's overlap check before)."""
    import unicodedata

    from cxr_transfer.extract.dataset import load_dataset

    root = write_class_tree(tmp_path / "d", per_class=2)
    original = next((root / "covid").glob("*.png"))
    named = original.with_name(unicodedata.normalize("NFC", "Müller 환자.png"))
    original.rename(named)
    rows = ["path,patient_id,source"]
    for image in sorted(root.rglob("*.png")):
        relative = image.relative_to(root).as_posix()
        rows.append(f"{unicodedata.normalize('NFD', relative)}, p-{image.stem} , site a ")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    dataset = load_dataset(root)
    assert not dataset.manifest_unmatched
    by_name = {s.path.name: s for s in dataset.samples}
    assert by_name[named.name].group == f"p-{named.stem}"
    assert all(s.group == f"p-{s.path.stem}" and s.column("source") == "site a" for s in dataset.samples)
