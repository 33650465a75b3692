"""Find the images of a dataset, their labels, splits and patient groups, in a stable order.

Three layouts are read (README, "Datasets"):
- ``ROOT/<class>/<image>``                      labels from folder names, no split;
- ``ROOT/<split>/<class>/<image>``              split folders (train/, test/, val/, ...);
- a CSV file with columns ``path,label[,split][,group]`` (paths relative to the CSV's folder).
A ``manifest.csv`` beside the class or split folders (as in the paper's dataset) supplies the group column
(``patient_id``) when present. Rows are sorted by (split, label, path) so every run sees the same order.
The sha256 of a file's bytes is its identity: caches, audits and predictions key on it.
"""
from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.hashing import sha256_file, sha256_strings
from cxr_transfer.extract.dicom import fill_dicom_groups
from cxr_transfer.extract.images import IMAGE_SUFFIXES, is_image_file

SPLIT_NAMES = ("train", "val", "valid", "validation", "test")
MANIFEST_NAME = "manifest.csv"
GROUP_COLUMNS = ("group", "patient_id")


@dataclass(frozen=True)
class Sample:
    """One image: where it is, what it shows, which split and patient it belongs to, and its hash."""

    path: Path
    label: str
    split: str = ""
    group: str = ""
    sha256: str = ""


@dataclass
class Dataset:
    """An ordered list of samples plus the class names (sorted, the one source of label order)."""

    root: Path
    samples: list[Sample]
    class_names: list[str] = field(default_factory=list)
    has_groups: bool = False

    def __post_init__(self) -> None:
        if not self.class_names:
            self.class_names = sorted({s.label for s in self.samples})

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.samples]

    @property
    def label_indices(self) -> list[int]:
        index = {name: i for i, name in enumerate(self.class_names)}
        return [index[s.label] for s in self.samples]

    @property
    def splits(self) -> list[str]:
        return [s.split for s in self.samples]

    @property
    def groups(self) -> list[str]:
        return [s.group for s in self.samples]

    @property
    def fingerprint(self) -> str:
        """sha256 over the ordered (sha256, label, split) of every sample: the data's identity in records."""
        return sha256_strings([f"{s.sha256}\t{s.label}\t{s.split}" for s in self.samples])

    def relative(self, sample: Sample) -> str:
        try:
            return str(sample.path.relative_to(self.root))
        except ValueError:
            return str(sample.path)

    def subset(self, split: str) -> "Dataset":
        """The samples of one split, with the same class names."""
        return Dataset(self.root, [s for s in self.samples if s.split == split], list(self.class_names),
                       self.has_groups)


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p) and not p.name.startswith("."))


def _read_group_manifest(root: Path) -> dict[str, str]:
    """Map of relative path -> patient group from manifest.csv, when there is one with a group column."""
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        return {}
    with open(manifest, newline="") as handle:
        reader = csv.DictReader(handle)
        column = next((c for c in GROUP_COLUMNS if c in (reader.fieldnames or [])), None)
        if column is None or "path" not in (reader.fieldnames or []):
            return {}
        return {row["path"]: row[column] for row in reader if row.get(column)}


def _from_folders(root: Path) -> tuple[list[Sample], bool]:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise CxrError(f"{root}: no class folders found (expected {root}/<class>/<image> "
                       f"or {root}/<split>/<class>/<image>)")
    split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_NAMES]
    groups = _read_group_manifest(root)
    rows: list[tuple[Path, str, str]] = []
    if split_dirs:
        for split_dir in split_dirs:
            for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                rows += [(p, class_dir.name, split_dir.name.lower()) for p in _images_under(class_dir)]
    else:
        for class_dir in subdirs:
            rows += [(p, class_dir.name, "") for p in _images_under(class_dir)]
    samples = [Sample(path, label, split, groups.get(path.relative_to(root).as_posix(), ""))
               for path, label, split in rows]
    return samples, bool(groups)


def _from_csv(csv_path: Path) -> tuple[list[Sample], bool]:
    base = csv_path.parent
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        if "path" not in fields or "label" not in fields:
            raise CxrError(f"{csv_path}: a dataset CSV needs the columns path,label[,split][,group]; "
                           f"found {','.join(fields) or 'none'}")
        group_column = next((c for c in GROUP_COLUMNS if c in fields), None)
        samples = []
        for line, row in enumerate(reader, start=2):
            if not row.get("path") or not row.get("label"):
                raise CxrError(f"{csv_path}:{line}: empty path or label")
            path = Path(row["path"])
            samples.append(Sample(path if path.is_absolute() else base / path, row["label"],
                                  (row.get("split") or "").lower(),
                                  row.get(group_column, "") if group_column else ""))
    missing = [s.path for s in samples if not s.path.is_file()]
    if missing:
        raise CxrError(f"{csv_path}: {len(missing)} listed file(s) do not exist, first: {missing[0]}")
    return samples, group_column is not None


def hash_samples(samples: list[Sample], workers: int = 4) -> list[Sample]:
    """Return the samples with sha256 filled in (files read in parallel threads)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(lambda s: sha256_file(s.path), samples))
    return [Sample(s.path, s.label, s.split, s.group, d) for s, d in zip(samples, digests)]


def load_dataset(source: str | Path, split: str | None = None) -> Dataset:
    """Read a dataset folder or CSV (module docstring), hash every file and return it in stable order.

    split: keep only that split (e.g. "train"). Raises CxrError for a missing path or no images.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise CxrError(f"{source}: no such file or folder")
    source = source.resolve()
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise CxrError(f"{source}: give a folder of class subfolders or a .csv file with path,label columns")
        samples, has_groups = _from_csv(source)
        root = source.parent
    else:
        samples, has_groups = _from_folders(source)
        root = source
    if not has_groups:  # DICOM hook (extract/dicom.py): group = salted hash of the PatientID, never the id
        samples, has_groups = fill_dicom_groups(samples)
    if split is not None:
        samples = [s for s in samples if s.split == split]
    if not samples:
        where = f" in split '{split}'" if split else ""
        raise CxrError(f"{source}: no images found{where} (readable suffixes: {' '.join(IMAGE_SUFFIXES)})")
    samples.sort(key=lambda s: (s.split, s.label, str(s.path)))
    return Dataset(root, hash_samples(samples), has_groups=has_groups)


def images_in_folder(folder: str | Path) -> list[Path]:
    """Every image file under a folder, sorted (for predict on unlabeled images)."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise CxrError(f"{folder}: no such file or folder")
    folder = folder.resolve()
    paths = [folder] if folder.is_file() else _images_under(folder)
    if not paths:
        raise CxrError(f"{folder}: no images found (readable suffixes: {' '.join(IMAGE_SUFFIXES)})")
    return paths
