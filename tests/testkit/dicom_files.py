"""Uncompressed DICOM files from pixel arrays, for tests and benchmarks/make_dicom_dataset.py."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def write_dicom(path: str | Path, pixels: np.ndarray, photometric: str = "", bits_stored: int | None = None,
                **header: Any) -> Path:
    """Write ``pixels`` (grey (H, W) or RGB (H, W, 3); uint8 or uint16) as an uncompressed DICOM file.

    For tests and benchmarks/make_dicom_dataset.py: photometric defaults to MONOCHROME2 for grey and RGB
    for colour; ``bits_stored`` to the dtype's width; ``header`` sets further elements by keyword
    (e.g. Modality="DX", WindowCenter=..., RescaleSlope=..., PatientID=...).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.asarray(pixels)
    if pixels.dtype not in (np.uint8, np.uint16) or pixels.ndim not in (2, 3):
        raise ValueError(f"pixels must be uint8/uint16 (H, W) or (H, W, 3); got {pixels.dtype} {pixels.shape} "
                         f"instead")
    colour = pixels.ndim == 3
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1" if not colour else "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric or ("RGB" if colour else "MONOCHROME2")
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return Path(path)
