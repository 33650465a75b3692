"""Read DICOM radiographs: which files are DICOM, their pixels as 8-bit RGB, a few technical header fields, and
a salted patient group. ``extract/images.py`` dispatches here, so every command reads DICOM the same way.

The DICOM pixel rule (README, "How images are read"), in order:
1. pydicom reads the file; compressed transfer syntaxes are decoded by pydicom's plugins. Pillow (always
   installed) decodes JPEG baseline and JPEG 2000; JPEG lossless, JPEG-LS and 12-bit JPEG need the
   ``dicom`` extra (python-gdcm). A file no installed plugin can decode is skipped, naming its transfer syntax
   and the extra. No pixel data (SR, encapsulated PDF), several frames, or a modality other than a projection
   radiograph (``XRAY_MODALITIES``) is skipped with the reason, and so is a transfer syntax UID that is none.
   A ``.dcm`` without the 128-byte preamble is read with ``force=True`` (``_dcmread``).
   Values the header cannot describe are skipped naming the field: bits set above Bits Stored (checked
   before pydicom masks them), a Rescale Slope of 0, a window too narrow for its function. Whatever else
   pydicom raises on one file is that file's skip, naming the step and the error's type (never its text,
   which could quote a header value).
2. Grey images (MONOCHROME1/2): the modality LUT (Rescale Slope/Intercept or the Modality LUT Sequence), then
   the VOI LUT (the VOI LUT Sequence, else Window Center/Width), both with pydicom's own functions.
3. Scaled linearly to 8 bit from the output range of the last step: the VOI LUT's range, else the range the
   modality LUT gives the stored bits (pydicom's windowing convention). A file without a window is thus
   scaled from its full stored range, like a 16-bit PNG (65535 -> 255), and an 8-bit file is unchanged.
4. MONOCHROME1 (white = low values) is inverted, so bone is bright as in every other image.
5. Colour (RGB, YBR converted by pydicom) is scaled from its stored bits to 8 bit. Grey is copied to 3
   channels; then the same resize rule as every other image (``images.resize_square``).

Privacy: no patient-identifying header value (names, ids, dates, institution) leaves this module. Error
messages name the path and technical fields only; ``patient_group`` returns a keyed hash (HMAC-SHA256 with a
secret salt) of the PatientID, never the id itself.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxr_transfer.core.errors import CxrError
from cxr_transfer.core.io import atomic_write

if TYPE_CHECKING:
    from cxr_transfer.extract.dataset import Sample

DICOM_SUFFIXES = (".dcm", ".dicom")
XRAY_MODALITIES = ("CR", "DX", "DR", "RG", "OT", "")
"""Modalities read as projection radiographs (OT: secondary captures, as converted datasets use; "": no tag)."""
DICOM_EXTRA = "pip install 'cxr-transfer[dicom]' (python-gdcm)"
SALT_ENV = "CXR_DICOM_SALT"
DICOM_GROUP_BY = "dicom:PatientID"
GROUP_PREFIX = "dicom-pid-"
HEADER_FIELDS = ("Modality", "Manufacturer", "ManufacturerModelName", "ViewPosition", "PhotometricInterpretation",
                 "BitsStored", "PixelSpacing", "Rows", "Columns", "TransferSyntax")
"""Technical header fields the audit's header-shortcut check reads (none identifies a patient)."""


class DicomReadError(CxrError):
    """A DICOM file this tool does not read (unsupported, undecodable, not an image); the message says why."""


def has_dicom_preamble(path: Path) -> bool:
    """True when bytes 128..131 are ``DICM`` (the DICOM Part 10 file preamble)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def is_dicom_file(path: Path) -> bool:
    """``.dcm``/``.dicom`` files, and files without a suffix (or with a numeric one, as PACS exports name
    them) whose preamble says DICM."""
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    return (suffix == "" or suffix[1:].isdigit()) and has_dicom_preamble(path)


class _NoValueMessages(logging.Filter):
    """Drops pydicom's value-validation messages ("Invalid value for VR LO: '<the value>'"): the value may be a
    patient's name or id, and pydicom logs them besides warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "VR" not in record.getMessage()


_VALUE_FILTER = _NoValueMessages()


def _dcmread(path: Path, **kwargs: Any):
    """pydicom's dataset of ``path``; DicomReadError (naming only the error's type) for whatever it raises.

    A file without the 128-byte preamble and ``DICM`` (a dataset written without the Part 10 header, as older
    and some raw exports are) is read again with ``force=True``: it is found as DICOM only by its ``.dcm`` /
    ``.dicom`` suffix, which the user chose. When that fails too, the reason says the preamble is missing.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    pydicom_logger = logging.getLogger("pydicom")
    if _VALUE_FILTER not in pydicom_logger.filters:  # added at the first read, not on import
        pydicom_logger.addFilter(_VALUE_FILTER)

    def read(force: bool):
        with warnings.catch_warnings():
            # pydicom's value warnings quote the offending value, which may be a patient's: never shown.
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, force=force, **kwargs)

    try:
        return read(False)
    except InvalidDicomError as exc:
        if has_dicom_preamble(path) or not path.is_file():
            raise DicomReadError(f"{path}: not a readable DICOM file ({type(exc).__name__})") from exc
    except Exception as exc:  # noqa: BLE001 - whatever pydicom raises on one file is that file's skip
        raise DicomReadError(f"{path}: not a readable DICOM file ({type(exc).__name__})") from exc
    try:
        return read(True)
    except Exception as exc:  # noqa: BLE001
        raise DicomReadError(f"{path}: no DICOM preamble ('DICM' at byte 128) and not readable as a DICOM "
                             f"dataset either ({type(exc).__name__})") from exc


def _transfer_syntax(ds):
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(uid)) if uid else None


def _set_missing_transfer_syntax(ds) -> None:
    """A dataset read without file meta (no preamble) gets the transfer syntax pydicom found it encoded in:
    such a file can only be uncompressed, and pydicom decodes no pixel data without the syntax."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if _transfer_syntax(ds) is not None:
        return
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        return
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                      ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _check_decodable(path: Path, ds) -> None:
    """Raise DicomReadError for a transfer syntax UID that is none, or naming the transfer syntax and the extra
    when no installed plugin decodes it."""
    from pydicom.pixels import get_decoder

    syntax = _transfer_syntax(ds)
    if syntax is None:
        return
    if not syntax.is_transfer_syntax:
        text = str(syntax)
        shown = text if len(text) <= 64 and all(c in "0123456789." for c in text) else "(not a UID)"
        raise DicomReadError(f"{path}: transfer syntax UID {shown} is not a known transfer syntax (Transfer "
                             f"Syntax UID (0002,0010)); its pixel data cannot be decoded")
    if not syntax.is_compressed:
        return
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise DicomReadError(f"{path}: compressed as {syntax.name} ({syntax}) and no installed decoder reads it; "
                             f"{DICOM_EXTRA}")


def _modality_range(ds) -> tuple[float, float]:
    """The range the modality LUT gives the stored bits (pydicom's windowing convention, PS3.3 C.11.2)."""
    bits = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2 ** bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return min(lo, hi), max(lo, hi)


def _has_voi_lut(ds) -> bool:
    sequence = ds.get("VOILUTSequence")
    return bool(sequence) and None not in (sequence[0].get("LUTDescriptor"), sequence[0].get("LUTData"))


def _number(ds, keyword: str, tag: str, path: Path) -> float | None:
    """The first value of a numeric header field as a finite float, None when absent; DicomReadError naming
    the field (never its text) when it is not a finite number."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        number = float(value[0] if hasattr(value, "__len__") and not isinstance(value, (str, bytes)) else value)
    except (TypeError, ValueError, IndexError):
        raise DicomReadError(f"{path}: {_FIELD_NAMES[keyword]} ({tag}) is not a number") from None
    if not np.isfinite(number):
        raise DicomReadError(f"{path}: {_FIELD_NAMES[keyword]} ({tag}) is {number}, not a finite number")
    return number


_FIELD_NAMES = {"RescaleSlope": "Rescale Slope", "RescaleIntercept": "Rescale Intercept",
                "WindowWidth": "Window Width", "WindowCenter": "Window Center"}


def _check_luts(path: Path, ds) -> None:
    """Refuse the modality and VOI LUT values that give no image (M9, H4): a Rescale Slope of 0 maps every
    stored value to one; a window narrower than its function allows (pydicom refuses it)."""
    if not ds.get("ModalityLUTSequence"):
        slope = _number(ds, "RescaleSlope", "0028,1053", path)
        intercept = _number(ds, "RescaleIntercept", "0028,1052", path)
        if slope == 0 and intercept is not None:
            raise DicomReadError(f"{path}: Rescale Slope (0028,1053) is 0: every stored value maps to the "
                                 f"intercept, so the image has no range")
    if _has_voi_lut(ds) or "WindowCenter" not in ds or "WindowWidth" not in ds:
        return
    _number(ds, "WindowCenter", "0028,1050", path)
    width = _number(ds, "WindowWidth", "0028,1051", path)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if width is not None and function == "LINEAR" and width < 1:
        raise DicomReadError(f"{path}: Window Width (0028,1051) {width:g} is below 1, the least a LINEAR window "
                             f"allows; no window can be applied")
    if width is not None and function != "LINEAR" and width <= 0:
        shown = function if function in ("LINEAR_EXACT", "SIGMOID") else "non-LINEAR"
        raise DicomReadError(f"{path}: Window Width (0028,1051) {width:g} is not above 0 ({shown} window); "
                             f"no window can be applied")


def _grey_to_8bit(pixels: np.ndarray, ds, path: Path) -> np.ndarray:
    """Steps 2-4 of the module rule for a MONOCHROME1/2 frame; DicomReadError naming the step and its header
    fields (never an error's text, which may quote a value) for whatever pydicom raises."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    _check_luts(path, ds)
    with np.errstate(over="ignore", invalid="ignore"):   # an overflowing slope is checked below, not warned
        try:
            values = apply_modality_lut(pixels, ds)
        except Exception as exc:  # noqa: BLE001 - one file's header: that file's skip
            raise DicomReadError(f"{path}: cannot apply the modality LUT (Rescale Slope/Intercept or Modality "
                                 f"LUT Sequence: {type(exc).__name__})") from exc
        try:
            if _has_voi_lut(ds):
                lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
            else:
                lo, hi = _modality_range(ds)
            values = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
        except Exception as exc:  # noqa: BLE001
            raise DicomReadError(f"{path}: cannot apply the VOI LUT (VOI LUT Sequence or Window Center/Width, "
                                 f"Bits Stored: {type(exc).__name__})") from exc
        finite = np.isfinite(hi - lo) and bool(np.isfinite(values).all())
    if not finite:
        raise DicomReadError(f"{path}: Rescale Slope/Intercept (0028,1053/1052) or the window take the values "
                             f"beyond the floating-point range, so the image has no range")
    if not hi > lo:
        raise DicomReadError(f"{path}: the header gives the output an empty range ({lo:g} to {hi:g}), so the "
                             f"image has no range")
    scale = 255.0 / (hi - lo)
    grey = np.clip(np.rint((values - lo) * scale), 0, 255).astype(np.uint8)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        grey = 255 - grey
    return grey


def read_dicom_rgb(path: str | Path, decoding_plugin: str = "") -> np.ndarray:
    """One DICOM radiograph as RGB uint8 (H, W, 3) by the module's rule, at its own size.

    decoding_plugin: force one of pydicom's decoding plugins (``gdcm``, ``pylibjpeg``, ``pillow``); "" lets
    pydicom choose. Raises DicomReadError with the reason for files that are skipped.
    """
    path = Path(path)
    try:
        return _read_dicom_rgb(path, decoding_plugin)
    except DicomReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever pydicom raises on one file is that file's skip
        raise DicomReadError(f"{path}: cannot read the DICOM image ({type(exc).__name__} reading its image "
                             f"header fields or pixel data)") from exc


def _check_stored_bits(path: Path, ds, pixels: np.ndarray) -> np.ndarray:
    """Refuse integer pixel data with bits set above Bits Stored (M9), then drop those bits as pydicom would.

    ``pixels`` is decoded without pydicom's masking (``correct_unused_bits=False``). Unsigned values must
    fit in Bits Stored; signed ones may also carry the sign in the unused bits (sign-extended, as most writers
    store them). Anything else cannot come from the declared encoding: masking would keep the low bits of
    larger values, an image of noise.
    """
    if pixels.dtype.kind not in "iu" or "BitsStored" not in ds:
        return pixels
    bits, allocated = int(ds.BitsStored), int(ds.get("BitsAllocated", pixels.dtype.itemsize * 8))
    if allocated != pixels.dtype.itemsize * 8 or not 0 < bits < allocated:
        return pixels
    high = pixels >> bits                         # arithmetic for signed dtypes: -1 where sign-extended
    signed = pixels.dtype.kind == "i"
    wrong = (high != 0) & (high != -1) if signed else high != 0
    if wrong.any():
        raw = pixels.view(pixels.dtype.str.replace("i", "u"))
        raise DicomReadError(f"{path}: Bits Stored (0028,0101) is {bits} but the pixel data holds values up to "
                             f"{int(raw.max())} (bits above bit {bits - 1} set in {int(wrong.sum())} pixels): the "
                             f"values cannot come from the declared encoding")
    shift = allocated - bits
    return (pixels << shift) >> shift if signed else pixels


def _read_dicom_rgb(path: Path, decoding_plugin: str) -> np.ndarray:
    ds = _dcmread(path)
    _set_missing_transfer_syntax(ds)
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if not has_dicom_preamble(path):
            raise DicomReadError(f"{path}: no DICOM preamble ('DICM' at byte 128) and no image when read as a "
                                 f"DICOM dataset: not a DICOM image")
        sop = ds.get("SOPClassUID")
        kind = getattr(sop, "name", "") or "unknown SOP class"
        raise DicomReadError(f"{path}: DICOM without an image ({kind}, modality {modality or 'none'})")
    if modality not in XRAY_MODALITIES:
        raise DicomReadError(f"{path}: modality {modality} is not a projection radiograph (read: "
                             f"{', '.join(m for m in XRAY_MODALITIES if m)})")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 0
    if frames != 1:
        raise DicomReadError(f"{path}: multi-frame DICOM ({ds.get('NumberOfFrames')} frames); one radiograph per "
                             f"file is read")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    grey = photometric in ("MONOCHROME1", "MONOCHROME2")
    if not grey and photometric not in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
        raise DicomReadError(f"{path}: photometric interpretation {photometric or 'missing'} is not read "
                             f"(MONOCHROME1/2, RGB, YBR)")
    _check_decodable(path, ds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.pixel_array_options(decoding_plugin=decoding_plugin, correct_unused_bits=False)
            pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - every decoder failure is a skipped file with a reason
        syntax = _transfer_syntax(ds)
        hint = f"; {DICOM_EXTRA}" if syntax is not None and syntax.is_compressed else ""
        name = syntax.name if syntax is not None else "no transfer syntax"
        raise DicomReadError(f"{path}: cannot decode the pixel data ({name}: {type(exc).__name__}){hint}") from exc
    pixels = _check_stored_bits(path, ds, pixels)
    if grey:
        if pixels.ndim != 2:
            raise DicomReadError(f"{path}: grey pixel data of shape {pixels.shape}, expected 2-D")
        image = _grey_to_8bit(pixels, ds, path)
        return np.repeat(image[:, :, None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise DicomReadError(f"{path}: colour pixel data of shape {pixels.shape}, expected (rows, columns, 3)")
    bits = int(ds.get("BitsStored", 8) or 8)
    if bits == 8:
        return np.ascontiguousarray(pixels, dtype=np.uint8)
    scale = 255.0 / (2 ** bits - 1)
    return np.clip(np.rint(pixels.astype(np.float64) * scale), 0, 255).astype(np.uint8)


def header_fields(path: str | Path) -> dict[str, str | float]:
    """The technical header fields of ``HEADER_FIELDS`` (no pixel data read; nothing identifying a patient).

    Missing text fields are "", missing numbers NaN. PixelSpacing falls back to ImagerPixelSpacing (mm, the
    row spacing). DicomReadError (naming the error's type only) for whatever pydicom raises on the file.
    """
    ds = _dcmread(Path(path), stop_before_pixels=True)
    try:
        return _header_fields(ds)
    except Exception as exc:  # noqa: BLE001 - an element pydicom cannot convert: that file's skip
        raise DicomReadError(f"{path}: cannot read its technical header fields ({type(exc).__name__})") from exc


def _header_fields(ds) -> dict[str, str | float]:
    out: dict[str, str | float] = {}
    for name in ("Modality", "Manufacturer", "ManufacturerModelName", "ViewPosition", "PhotometricInterpretation"):
        out[name] = str(ds.get(name, "") or "").strip()
    for name in ("BitsStored", "Rows", "Columns"):
        try:
            out[name] = float(ds.get(name))
        except (TypeError, ValueError):
            out[name] = float("nan")
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        out["PixelSpacing"] = float(spacing[0])
    except (TypeError, ValueError, IndexError, KeyError):
        out["PixelSpacing"] = float("nan")
    syntax = _transfer_syntax(ds)
    out["TransferSyntax"] = syntax.name if syntax is not None else ""
    return out


def _salt() -> bytes:
    """The secret key of the patient-id hash: ``$CXR_DICOM_SALT``, else a random key created once in
    ``~/.config/cxr-transfer/dicom-salt`` (mode 0600). Without a secret, short ids could be found by trying
    every number."""
    if os.environ.get(SALT_ENV):
        return os.environ[SALT_ENV].encode("utf-8")
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "cxr-transfer"
    path = base / "dicom-salt"
    if not path.is_file():
        base.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w") as handle:
            os.chmod(handle.name, 0o600)    # before the secret is in it
            handle.write(secrets.token_hex(32))
    return path.read_text().strip().encode("utf-8")


def hash_patient_id(patient_id: str, salt: bytes) -> str:
    """``dicom-pid-<16 hex>``: HMAC-SHA256 of the id under the salt, never reversible to the id."""
    digest = hmac.new(salt, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{GROUP_PREFIX}{digest[:16]}"


def patient_group(path: str | Path, salt: bytes | None = None) -> str:
    """The salted hash of a DICOM file's PatientID, or "" when it has none or is not readable."""
    try:
        ds = _dcmread(Path(path), stop_before_pixels=True, specific_tags=["PatientID"])
    except DicomReadError:
        return ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patient_id = str(ds.get("PatientID", "") or "").strip()
    return hash_patient_id(patient_id, salt if salt is not None else _salt()) if patient_id else ""


def fill_dicom_groups(samples: "list[Sample]") -> "tuple[list[Sample], bool]":
    """Samples with ``group`` set to the salted PatientID hash of each DICOM file; True when any was set.

    Used only for datasets without a group column (a manifest or CSV group wins: ids of two sources never
    match, so mixing them would split one patient into two groups).
    """
    dicoms = [i for i, s in enumerate(samples) if not s.group and is_dicom_file(Path(s.path))]
    if not dicoms:
        return samples, False
    salt = _salt()
    out = list(samples)
    found = False
    for i in dicoms:
        group = patient_group(samples[i].path, salt)
        if group:
            out[i] = replace(samples[i], group=group)
            found = True
    return out, found
