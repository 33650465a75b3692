"""Reading datasets: class folders, split folders, CSV, manifest groups, stable order, clear errors."""
from pathlib import Path

import pytest

from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.hashing import sha256_file
from cxr_transfer.core.synthetic import write_class_tree
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
