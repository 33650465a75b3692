"""Reading datasets: class folders, split folders, CSV, manifest groups, stable order, clear errors."""
from pathlib import Path

import pytest

from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.hashing import sha256_file
from testkit.synthetic import write_class_tree
from cxr_transfer.extract.dataset import load_dataset


def test_class_folders(class_tree: Path):
    dataset = load_dataset(class_tree)
    assert dataset.class_names == ["covid", "normal", "pneumonia"]
    assert len(dataset) == 12 and set(dataset.splits) == {""}
    first = dataset.samples[0]
    assert first.sha256 == sha256_file(first.path)
    assert dataset.label_indices[:4] == [0, 0, 0, 0]


def test_split_folders_with_manifest_groups(tmp_path: Path):
    root = write_class_tree(tmp_path / "d", per_class=2, splits=("train", "test"))
    (root / "manifest.csv").write_text("path,split,label,sha256,patient_id,view\n"
                                       "train/covid/img_000.png,train,covid,x,p1,PA\n"
                                       "test/covid/img_001.png,test,covid,x,p1,PA\n")
    dataset = load_dataset(root)
    assert dataset.has_groups
    assert sorted(set(dataset.splits)) == ["test", "train"]
    groups = {dataset.relative(s): s.group for s in dataset.samples}
    assert groups["train/covid/img_000.png"] == "p1" and groups["test/covid/img_001.png"] == "p1"
    assert groups["train/normal/img_000.png"] == ""
    assert len(load_dataset(root, split="train")) == 6


def test_order_is_stable_and_sorted(class_tree: Path):
    a = [s.path for s in load_dataset(class_tree).samples]
    b = [s.path for s in load_dataset(class_tree).samples]
    assert a == b and a == sorted(a, key=lambda p: (p.parent.name, str(p)))


def test_csv_dataset(class_tree: Path):
    lines = ["path,label,split,group"]
    for i, path in enumerate(sorted(class_tree.rglob("*.png"))):
        lines.append(f"{path.relative_to(class_tree)},{path.parent.name},{'test' if i % 4 == 0 else 'train'},g{i // 2}")
    (class_tree / "list.csv").write_text("\n".join(lines) + "\n")
    dataset = load_dataset(class_tree / "list.csv")
    assert len(dataset) == 12 and dataset.has_groups
    assert {s.group for s in dataset.samples} >= {"g0", "g1"}


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file or folder"),
    ("empty", "no class folders"),
    ("noimages", "no images found"),
    ("badcsv", "needs the columns"),
    ("csvmissingfile", "do not exist"),
])
def test_clear_errors(tmp_path: Path, case, message):
    target = tmp_path / "x"
    if case == "empty":
        target.mkdir()
    elif case == "noimages":
        (target / "covid").mkdir(parents=True)
        (target / "covid" / "notes.txt").write_text("hello")
    elif case == "badcsv":
        target = tmp_path / "x.csv"
        target.write_text("file,class\na.png,covid\n")
    elif case == "csvmissingfile":
        target = tmp_path / "x.csv"
        target.write_text("path,label\nnope.png,covid\n")
    with pytest.raises(CxrError, match=message):
        load_dataset(target)


# --- issue 9: bad or odd inputs are named, counted or refused --------------------------------------------


def test_an_unreadable_file_is_skipped_and_counted(tmp_path: Path, monkeypatch):
    """Item 8: PermissionError (chmod 000 for a non-root user) on one file must not abort the run."""
    import cxr_transfer.extract.dataset as dataset_module

    root = write_class_tree(tmp_path / "d", per_class=3)
    locked = root / "normal" / "img_001.png"
    real = dataset_module.sha256_file

    def no_permission(path):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(dataset_module, "sha256_file", no_permission)
    dataset = load_dataset(root)
    assert len(dataset) == 8 and locked not in [s.path for s in dataset.samples]
    assert dataset.skipped == [("normal/img_001.png", "cannot be read (PermissionError: Permission denied)")]
    assert "1 file(s) or folder(s)" in dataset.skipped_summary()[0]


def test_an_unreadable_subfolder_is_named(tmp_path: Path, monkeypatch):
    """Item 14: a class subfolder that cannot be listed is named in the summary, not silently ignored."""
    import os

    root = write_class_tree(tmp_path / "d", per_class=2)
    (root / "covid" / "more").mkdir()
    hidden = str(root / "covid" / "more")
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == hidden:
            raise PermissionError(13, "Permission denied", hidden)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    dataset = load_dataset(root)
    assert ("covid/more", "folder cannot be listed (Permission denied)") in dataset.skipped
    assert len(dataset) == 6


def test_links_and_non_split_folders_are_named(tmp_path: Path):
    """Item 14: dangling and looping links, a folder beside train/ and a loose image are counted."""
    root = write_class_tree(tmp_path / "d", per_class=2, splits=("train", "test"))
    (root / "extra" / "covid").mkdir(parents=True)
    (root / "train" / "covid" / "gone.png").symlink_to(tmp_path / "missing.png")
    (root / "train" / "covid" / "loop.png").symlink_to(root / "train" / "covid" / "loop.png")
    (root / "train" / "normal" / "back").symlink_to(root / "train" / "normal")
    (root / "train" / "loose.png").write_bytes((root / "test" / "covid" / "img_000.png").read_bytes())
    dataset = load_dataset(root)
    reasons = dict(dataset.skipped)
    assert reasons["extra"].startswith("folder beside the split folders is not a split")
    assert reasons["train/covid/gone.png"].startswith("dangling symbolic link")
    assert reasons["train/covid/loop.png"] == "symbolic link loop"
    assert reasons["train/normal/back"] == "symbolic link loop (folder already read)"
    assert reasons["train/loose.png"].startswith("image outside any class folder")
    assert len(dataset) == 3 * 2 * 2


def test_the_same_image_twice_is_kept_once_on_the_train_side(tmp_path: Path):
    """Item 10: copies of one image (same sha256) must not land on both sides of a split."""
    root = write_class_tree(tmp_path / "d", per_class=3, splits=("train", "test"))
    copy = root / "test" / "covid" / "copy.png"
    copy.write_bytes((root / "train" / "covid" / "img_000.png").read_bytes())
    dataset = load_dataset(root)
    assert len(dataset) == 18 and copy not in [s.path for s in dataset.samples]
    assert dataset.skipped[0][0] == "test/covid/copy.png" and "train/covid/img_000.png" in dataset.skipped[0][1]
    assert len(load_dataset(root, keep_duplicates=True)) == 19   # the audit still sees both


def test_a_csv_listing_one_file_twice(tmp_path: Path):
    root = write_class_tree(tmp_path / "d", classes=("covid", "normal"), per_class=2)
    lines = ["path,label", "covid/img_000.png,covid", "covid/img_000.png,covid", "covid/img_001.png,covid",
             "normal/img_000.png,normal", "normal/img_001.png,normal"]
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    assert len(load_dataset(root / "list.csv")) == 4
    (root / "list.csv").write_text("\n".join(lines + ["covid/img_001.png,normal"]) + "\n")
    with pytest.raises(CxrError, match="two labels: covid/img_001.png is 'covid' and covid/img_001.png is 'normal'"):
        load_dataset(root / "list.csv")


def test_csv_encodings(tmp_path: Path):
    """Items 11-12: a UTF-8 BOM is accepted; Latin-1 and random bytes are refused with one message."""
    root = write_class_tree(tmp_path / "d", classes=("covid", "normal"), per_class=2)
    text = "path,label\ncovid/img_000.png,covid\nnormal/img_000.png,normal\n"
    (root / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_dataset(root / "bom.csv").class_names == ["covid", "normal"]
    (root / "latin.csv").write_bytes(text.replace("normal,", "normal,").encode() + "x.png,röntgen\n".encode("latin-1"))
    with pytest.raises(CxrError, match="not UTF-8 text"):
        load_dataset(root / "latin.csv")
    (root / "nul.csv").write_bytes(b"path,label\n\0\0\0,x\n")
    with pytest.raises(CxrError, match="not a readable CSV"):
        load_dataset(root / "nul.csv")
    (root / "manifest.csv").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CxrError, match="manifest.csv: not UTF-8 text"):
        load_dataset(root)
