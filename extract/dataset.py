"""Find the images of a dataset, their labels, splits and patient groups, in a stable order.

Three layouts are read (README, "Datasets"):
- ``ROOT/<class>/<image>``                      labels from folder names, no split;
- ``ROOT/<split>/<class>/<image>``              split folders (train/, test/, val/, ...);
- a CSV file with columns ``path,label[,split][,group]`` (paths relative to the CSV's folder).
A ``manifest.csv`` beside the class or split folders (as in the paper's dataset) supplies the group column
(``patient_id``) when present. Its paths are relative to its folder and normalised before matching (``./``,
backslashes, repeated separators, ``a/../``, and Unicode NFC on both sides, since macOS writes names in NFD);
its rows that match no image are listed in
``Dataset.manifest_unmatched``. Every other column of the manifest or CSV (``source``, ``age_group``, ...) is
kept per sample (``Sample.column``), so every command reads the same values. Group and column values are
stripped of surrounding spaces (``' p1 '`` is patient ``p1``, as a spreadsheet shows it).
Rows are sorted by (split, label, path) so every run sees the same order.
The sha256 of a file's bytes is its identity: caches, audits and predictions key on it.

Nothing is dropped silently: files that cannot be read, broken or looping symbolic links, folders that cannot
be listed, folders beside the split folders that are not splits, images outside any class folder and repeated
copies of one image are left out and listed in ``Dataset.skipped`` (path, reason). The same bytes listed
twice under one label are kept once (the train/ copy first, so no copy lands on both sides of a split); under
two labels they are refused with both paths named. CSV files are read as UTF-8 (a byte-order mark is fine).
"""
from __future__ import annotations

import csv
import errno
import io
import logging
import os
import posixpath
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.hashing import sha256_file, sha256_strings
from cxr_transfer.core.io import printable, utf8_problem
from cxr_transfer.extract.dicom import fill_dicom_groups
from cxr_transfer.extract.images import IMAGE_SUFFIXES, is_image_file

log = logging.getLogger(__name__)

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
    extra: tuple[tuple[str, str], ...] = ()   # the manifest's or CSV's columns (but path) of its row, in order

    def column(self, name: str) -> str | None:
        """This image's value in column ``name`` of its manifest or CSV; None without such a column or row."""
        return next((value for key, value in self.extra if key == name), None)


@dataclass
class Dataset:
    """An ordered list of samples plus the class names (sorted, the one source of label order)."""

    root: Path
    samples: list[Sample]
    class_names: list[str] = field(default_factory=list)
    has_groups: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, why it was left out)
    columns: list[str] = field(default_factory=list)              # manifest / CSV columns (but path), in order
    manifest_unmatched: list[str] = field(default_factory=list)   # manifest paths that match no image, as written

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
                       self.has_groups, list(self.skipped), list(self.columns), list(self.manifest_unmatched))

    def skipped_summary(self) -> list[str]:
        """Lines for a command's summary: how many entries were left out, and each one with its reason."""
        if not self.skipped:
            return []
        return [f"{len(self.skipped)} file(s) or folder(s) of {self.root} left out:"] + \
            [f"  left out {path}: {reason}" for path, reason in self.skipped]


Skipped = list[tuple[str, str]]


def _shown(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it, as printable text (undecodable name bytes as ``\\xNN``):
    what skipped lists and messages show."""
    try:
        return printable(path.relative_to(root).as_posix())
    except ValueError:
        return printable(str(path))


def _broken_link_reason(path: Path) -> str:
    """Why a path that is a symbolic link cannot be followed (dangling or looping)."""
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"dangling symbolic link (to {os.readlink(path)})"
    return "symbolic link to something that is not a file"


def _images_under(folder: Path, root: Path, skipped: Skipped) -> list[Path]:
    """Image files under folder (symbolic links followed once), sorted; what cannot be read goes to skipped."""
    found: list[Path] = []
    visited: set[str] = set()

    def unreadable(exc: OSError) -> None:
        skipped.append((_shown(Path(exc.filename), root), f"folder cannot be listed ({exc.strerror})"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            skipped.append((_shown(Path(dirpath), root), "symbolic link loop (folder already read)"))
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith("."):
                continue
            if path.is_symlink() and not path.exists():
                skipped.append((_shown(path, root), _broken_link_reason(path)))
            elif not is_image_file(path):
                continue
            elif not path.is_file():
                skipped.append((_shown(path, root), "not a regular file"))
            else:
                found.append(path)
    return sorted(found)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(column names, rows) of a UTF-8 CSV (with or without a byte-order mark); CxrError when it is not one."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise CxrError(f"{path}: not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); "
                       f"save the CSV as UTF-8") from None
    except OSError as exc:
        raise CxrError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if "\0" in text:
        raise CxrError(f"{path}: not a readable CSV file (it contains NUL bytes, so it is not text)")
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return list(reader.fieldnames or []), list(reader)
    except csv.Error as exc:
        raise CxrError(f"{path}: not a readable CSV file ({exc})") from None


def manifest_key(text: str) -> str:
    """A manifest path as matched against the images: backslashes as ``/``, then ``./``, repeated separators
    and ``a/../`` folded away (``./train\\covid//x.jpg`` -> ``train/covid/x.jpg``)."""
    return posixpath.normpath(text.strip().replace("\\", "/"))


def _match_key(relative: str) -> str:
    """The form in which a manifest's path and an image's relative path are compared: Unicode NFC, so a name
    written in NFD (macOS) matches the same name stored in NFC. Only for matching; files keep their own names."""
    return unicodedata.normalize("NFC", relative)


def _cell(row: dict[str, str], column: str | None) -> str:
    """A CSV cell as a value: surrounding spaces dropped, '' when the column or the cell is absent."""
    return (row.get(column) or "").strip() if column else ""


@dataclass
class _Manifest:
    """What manifest.csv says: its columns (but path) and, per normalised path, its row."""

    columns: list[str] = field(default_factory=list)
    group_column: str | None = None
    rows: dict[str, dict[str, str]] = field(default_factory=dict)   # manifest_key(path) -> row

    def extra(self, key: str) -> tuple[tuple[str, str], ...]:
        row = self.rows.get(key)
        return () if row is None else tuple((c, _cell(row, c)) for c in self.columns)

    def group(self, key: str) -> str:
        row = self.rows.get(key)
        return _cell(row, self.group_column) if row is not None else ""


def _read_manifest(root: Path) -> _Manifest:
    """manifest.csv beside the class or split folders (empty when there is none or it has no path column)."""
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        return _Manifest()
    fields, rows = _read_csv(manifest)
    if "path" not in fields:
        return _Manifest()
    found = _Manifest([c for c in fields if c != "path"], next((c for c in GROUP_COLUMNS if c in fields), None))
    for row in rows:
        if row.get("path"):
            key = manifest_key(row["path"])
            if Path(key).is_absolute():
                key = _shown(Path(key), root)
            found.rows[_match_key(key)] = row
    return found


def _list_dir(folder: Path, root: Path, skipped: Skipped) -> list[Path]:
    """Visible entries of one folder, sorted; a folder that cannot be listed goes to skipped."""
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        if folder == root:
            raise CxrError(f"{root}: folder cannot be listed ({exc.strerror or exc})") from None
        skipped.append((_shown(folder, root), f"folder cannot be listed ({exc.strerror or exc})"))
        return []


def _not_folders(entries: list[Path], root: Path, skipped: Skipped, where: str) -> None:
    """Name what stands beside class or split folders and will not be read."""
    for entry in entries:
        if entry.is_symlink() and not entry.exists():
            skipped.append((_shown(entry, root), _broken_link_reason(entry)))
        elif not entry.is_dir() and is_image_file(entry):
            skipped.append((_shown(entry, root), f"image outside any class folder ({where})"))


def _from_folders(root: Path, skipped: Skipped) -> tuple[list[Sample], bool, _Manifest]:
    entries = _list_dir(root, root, skipped)
    subdirs = [p for p in entries if p.is_dir()]
    if not subdirs:
        raise CxrError(f"{root}: no class folders found (expected {root}/<class>/<image> "
                       f"or {root}/<split>/<class>/<image>)")
    split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_NAMES]
    manifest = _read_manifest(root)
    rows: list[tuple[Path, str, str]] = []
    if split_dirs:
        _not_folders(entries, root, skipped, "beside the split folders")
        for other in subdirs:
            if other not in split_dirs:
                skipped.append((_shown(other, root), f"folder beside the split folders is not a split "
                                                     f"({', '.join(SPLIT_NAMES)}): not read"))
        for split_dir in split_dirs:
            inside = _list_dir(split_dir, root, skipped)
            _not_folders(inside, root, skipped, f"directly in {split_dir.name}/")
            for class_dir in (p for p in inside if p.is_dir()):
                rows += [(p, class_dir.name, split_dir.name.lower())
                         for p in _images_under(class_dir, root, skipped)]
    else:
        _not_folders(entries, root, skipped, "beside the class folders")
        for class_dir in subdirs:
            rows += [(p, class_dir.name, "") for p in _images_under(class_dir, root, skipped)]
    keys = [_match_key(path.relative_to(root).as_posix()) for path, _, _ in rows]
    samples = [Sample(path, label, split, manifest.group(key), extra=manifest.extra(key))
               for (path, label, split), key in zip(rows, keys)]
    return samples, _has_group_values(manifest), manifest


def _has_group_values(manifest: _Manifest) -> bool:
    """The manifest has a group column with at least one value (then every image is expected to have one)."""
    return bool(manifest.group_column) and any(_cell(row, manifest.group_column) for row in manifest.rows.values())


def _from_csv(csv_path: Path) -> tuple[list[Sample], bool, list[str]]:
    base = csv_path.parent
    fields, rows = _read_csv(csv_path)
    if "path" not in fields or "label" not in fields:
        raise CxrError(f"{csv_path}: a dataset CSV needs the columns path,label[,split][,group]; "
                       f"found {','.join(fields) or 'none'}")
    group_column = next((c for c in GROUP_COLUMNS if c in fields), None)
    columns = [c for c in fields if c != "path"]
    samples = []
    for line, row in enumerate(rows, start=2):
        if not row.get("path") or not row.get("label"):
            raise CxrError(f"{csv_path}:{line}: empty path or label")
        path = Path(manifest_key(row["path"]))
        samples.append(Sample(path if path.is_absolute() else base / path, row["label"],
                              (row.get("split") or "").lower(),
                              _cell(row, group_column), extra=tuple((c, _cell(row, c)) for c in columns)))
    missing = [s.path for s in samples if not s.path.is_file()]
    if missing:
        raise CxrError(f"{csv_path}: {len(missing)} listed file(s) do not exist, first: {missing[0]}")
    return samples, group_column is not None, columns


def _digest(path: Path) -> str | OSError:
    try:
        return sha256_file(path)
    except OSError as exc:
        return exc


def hash_samples(samples: list[Sample], workers: int = 4,
                 skipped: Skipped | None = None, root: Path | None = None) -> list[Sample]:
    """Return the samples with sha256 filled in (files read in parallel threads).

    A file that cannot be read (permissions, vanished, I/O error) is left out and, when ``skipped`` is
    given, listed there with the reason; without ``skipped`` the first such file raises CxrError.
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(lambda s: _digest(s.path), samples))
    hashed = []
    for sample, digest in zip(samples, digests):
        if isinstance(digest, OSError):
            reason = f"cannot be read ({type(digest).__name__}: {digest.strerror or digest})"
            if skipped is None:
                raise CxrError(f"{sample.path}: {reason}")
            log.warning("skipped %s: %s", sample.path, reason)
            skipped.append((_shown(sample.path, root) if root else str(sample.path), reason))
        else:
            hashed.append(Sample(sample.path, sample.label, sample.split, sample.group, digest, sample.extra))
    return hashed


def _split_rank(split: str) -> int:
    """train/ first, then val, then test: a repeated image is kept on the training side."""
    return SPLIT_NAMES.index(split) if split in SPLIT_NAMES else len(SPLIT_NAMES)


def merge_duplicates(samples: list[Sample], root: Path, skipped: Skipped) -> list[Sample]:
    """One sample per sha256: copies under the same label are kept once (train/ copy first) and listed in
    ``skipped``; copies under different labels raise CxrError naming both files."""
    first: dict[str, Sample] = {}
    # a copy whose name is not UTF-8 goes last: extraction skips such names, and the image must not go with it
    for sample in sorted(samples, key=lambda s: (_split_rank(s.split), s.split, s.label,
                                                 utf8_problem(str(s.path)) is not None, str(s.path))):
        kept = first.setdefault(sample.sha256, sample)
        if kept is sample:
            continue
        if kept.label != sample.label:
            raise CxrError(f"the same image (sha256 {sample.sha256[:12]}...) has two labels: "
                           f"{_shown(kept.path, root)} is '{kept.label}' and {_shown(sample.path, root)} is "
                           f"'{sample.label}'; remove one copy or fix its label")
        reason = f"the same image as {_shown(kept.path, root)} (sha256 {sample.sha256[:12]}...): kept once"
        log.warning("%s: %s", sample.path, reason)
        skipped.append((_shown(sample.path, root), reason))
    chosen = {id(s) for s in first.values()}
    return [s for s in samples if id(s) in chosen]


def load_dataset(source: "str | Path | Dataset", split: str | None = None,
                 keep_duplicates: bool = False) -> Dataset:
    """Read a dataset folder or CSV (module docstring), hash every file and return it in stable order.

    split: keep only that split (e.g. "train"). keep_duplicates: keep every copy of a repeated image (the
    audit reports them); otherwise each image is kept once. A Dataset given as ``source`` is returned as is
    (so a caller can read the data once and hand it on). Raises CxrError for a missing path or no images.
    """
    if isinstance(source, Dataset):
        return source if split is None else source.subset(split)
    source = Path(source).expanduser()
    if not source.exists():
        raise CxrError(f"{source}: no such file or folder")
    source = source.resolve()
    skipped: Skipped = []
    unmatched: list[str] = []
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise CxrError(f"{source}: give a folder of class subfolders or a .csv file with path,label columns")
        samples, has_groups, columns = _from_csv(source)
        root = source.parent
    else:
        samples, has_groups, manifest = _from_folders(source, skipped)
        root, columns = source, manifest.columns
        found = {_match_key(s.path.relative_to(root).as_posix()) for s in samples}
        unmatched = [row["path"] for key, row in manifest.rows.items() if key not in found]   # as written
        if unmatched:
            log.warning("%s: %d row(s) match no image, first: %s", root / MANIFEST_NAME, len(unmatched), unmatched[0])
    if not has_groups:  # DICOM hook (extract/dicom.py): group = salted hash of the PatientID, never the id
        samples, has_groups = fill_dicom_groups(samples)
    for path, reason in skipped:
        log.warning("left out %s: %s", path, reason)
    if split is not None:
        samples = [s for s in samples if s.split == split]
    if not samples:
        where = f" in split '{split}'" if split else ""
        raise CxrError(f"{source}: no images found{where} (readable suffixes: {' '.join(IMAGE_SUFFIXES)})")
    samples.sort(key=lambda s: (s.split, s.label, str(s.path)))
    samples = hash_samples(samples, skipped=skipped, root=root)
    if not samples:
        raise CxrError(f"{source}: none of the images could be read (first: {skipped[-1][0]}: {skipped[-1][1]})")
    if not keep_duplicates:
        samples = merge_duplicates(samples, root, skipped)
    return Dataset(root, samples, has_groups=has_groups, skipped=skipped, columns=columns,
                   manifest_unmatched=unmatched)


def images_in_folder(folder: str | Path) -> list[Path]:
    """Every image file under a folder, sorted (for predict on unlabeled images)."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise CxrError(f"{folder}: no such file or folder")
    folder = folder.resolve()
    paths = [folder] if folder.is_file() else _images_under(folder, folder, [])
    if not paths:
        raise CxrError(f"{folder}: no images found (readable suffixes: {' '.join(IMAGE_SUFFIXES)})")
    return paths
