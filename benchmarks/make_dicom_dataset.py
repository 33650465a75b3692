#!/usr/bin/env python
"""Write a DICOM copy of a dataset's train/ images, to check that DICOM input gives the same results.

Each image is decoded by the library's own rule (``read_rgb`` at full size: EXIF orientation, 16-bit
scaling, alpha) and written uncompressed: grey images as 8-bit MONOCHROME2, others as 8-bit RGB, with
Modality DX. The manifest's patient_id goes into PatientID (so ``--group-by dicom:PatientID`` can be
tried), and a manifest.csv with the new paths is written beside the class folders.

    PYTHONPATH=tests python benchmarks/make_dicom_dataset.py ../shared/data/covid19-xray /tmp/covid19-dicom
    PYTHONPATH=tests python benchmarks/make_dicom_dataset.py ../shared/data/covid19-xray /tmp/vendor-dicom --per-class 30 \
        --manufacturer-by-class        # a header shortcut for the audit: Manufacturer = vendor-<class>

Then run ``compare`` on both folders with the same protocol and compare the numbers (README, DICOM).
"""
from __future__ import annotations

import argparse
import sys
import csv
from pathlib import Path

import numpy as np

from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.images import read_rgb
try:  # testkit is test support, on the path when run as the docstring says (PYTHONPATH=tests)
    from testkit.dicom_files import write_dicom
except ImportError:  # pragma: no cover - a usage error, said in one line
    sys.exit("error: run with PYTHONPATH=tests (the DICOM writer is tests/testkit/dicom_files.py)")


def make_dicom_copy(source: Path, out: Path, split: str = "train", per_class: int | None = None,
                    manufacturer_by_class: bool = False) -> int:
    """Write ``out/<split>/<class>/<stem>.dcm`` for every image of ``split`` (the first ``per_class`` of each
    class when given); returns the number written."""
    dataset = load_dataset(source, split=split)
    rows = []
    taken: dict[str, int] = {}
    for sample in dataset.samples:
        taken[sample.label] = taken.get(sample.label, 0) + 1
        if per_class is not None and taken[sample.label] > per_class:
            continue
        rgb = read_rgb(sample.path)
        grey = bool(np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 1], rgb[:, :, 2]))
        target = out / sample.split / sample.label / (sample.path.stem + ".dcm")
        target.parent.mkdir(parents=True, exist_ok=True)
        header = {"PatientID": sample.group} if sample.group else {}
        if manufacturer_by_class:
            header["Manufacturer"] = f"vendor-{sample.label}"
        write_dicom(target, rgb[:, :, 0] if grey else rgb, **header)
        rows.append({"path": target.relative_to(out).as_posix(), "patient_id": sample.group})
    if dataset.has_groups:
        with open(out / "manifest.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "patient_id"])
            writer.writeheader()
            writer.writerows(rows)
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--split", default="train")
    parser.add_argument("--per-class", type=int, default=None, help="only the first N images of each class")
    parser.add_argument("--manufacturer-by-class", action="store_true",
                        help="Manufacturer = vendor-<class>: a header field that gives the class away")
    args = parser.parse_args()
    written = make_dicom_copy(args.source, args.out, args.split, args.per_class, args.manufacturer_by_class)
    print(f"wrote {written} DICOM files under {args.out}")


if __name__ == "__main__":
    main()
