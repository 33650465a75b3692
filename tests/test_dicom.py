"""DICOM input: the pixel rule (bits, MONOCHROME1/2, rescale, window, VOI LUT), compressed syntaxes per installed
decoder, pydicom's bundled files, skipped files with reasons, privacy of patient ids, and the header audit.

Every DICOM is written here with pydicom from small arrays; expected 8-bit images are computed with numpy from
the DICOM standard's formulas, not with the code under test.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset as DicomDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

from cxr_transfer.audit.header_shortcuts import header_shortcuts
from cxr_transfer.audit.report import markdown
from cxr_transfer.classify.protocols import resolve_groups
from cxr_transfer.core.errors import CxrError
from testkit.synthetic import synthetic_xray
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.dicom import (
    DICOM_GROUP_BY,
    GROUP_PREFIX,
    SALT_ENV,
    header_fields,
    is_dicom_file,
    read_dicom_rgb,
)
from testkit.dicom_files import write_dicom
from cxr_transfer.extract.images import ImageDecodeError, is_image_file, read_rgb
from cxr_transfer.extract.pipeline import ExtractSettings, load_features

TINY = dict(backbone="mobilenetv2", random_weights=True, input_size=32, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One feature/ONNX cache for the module: the tiny backbone is exported once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _salt(monkeypatch):
    monkeypatch.setenv(SALT_ENV, "test-salt")


def _grey(values: np.ndarray) -> np.ndarray:
    """The 3-channel image the rule should give for a 2-D uint8 result."""
    return np.repeat(values[:, :, None], 3, axis=2)


def _stored(bits: int, shape=(12, 10), seed=0) -> np.ndarray:
    dtype = np.uint8 if bits <= 8 else np.uint16
    return np.random.default_rng(seed).integers(0, 2 ** bits, size=shape).astype(dtype)


@pytest.mark.parametrize("bits", [8, 12, 16])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_stored_range_is_scaled_to_8_bit_and_monochrome1_inverted(tmp_path: Path, bits: int, photometric: str):
    stored = _stored(bits)
    path = write_dicom(tmp_path / "x.dcm", stored, photometric=photometric, bits_stored=bits)
    expected = np.rint(stored.astype(np.float64) * 255 / (2 ** bits - 1)).astype(np.uint8)
    if photometric == "MONOCHROME1":
        expected = 255 - expected
    np.testing.assert_array_equal(read_rgb(path), _grey(expected))


def _linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) as a fraction of the output range."""
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0, 1)


def test_rescale_then_window(tmp_path: Path):
    stored = _stored(12, seed=1)
    path = write_dicom(tmp_path / "x.dcm", stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024,
                       WindowCenter=1500, WindowWidth=3000)
    x = stored.astype(np.float64) * 2 - 1024
    expected = np.rint(_linear_window(x, 1500, 3000) * 255).astype(np.uint8)
    got = read_rgb(path)[:, :, 0].astype(int)
    assert np.abs(got - expected).max() <= 1
    assert (got == expected).mean() > 0.95


def test_voi_lut_sequence_is_applied(tmp_path: Path):
    stored = _stored(12, seed=2)
    lut = (np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16)   # a gamma curve, 12 -> 16 bit
    item = DicomDataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "US", lut.tolist())   # LUT Data
    path = write_dicom(tmp_path / "x.dcm", stored, bits_stored=12, VOILUTSequence=[item])
    expected = np.rint(lut[stored].astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(read_rgb(path), _grey(expected))


def test_extensionless_file_with_preamble_is_found_and_other_files_are_not(tmp_path: Path):
    stored = _stored(8)
    write_dicom(tmp_path / "1.2.840.55", stored)
    write_dicom(tmp_path / "IMG0001", stored)
    (tmp_path / "notes").write_text("not an image")
    assert is_dicom_file(tmp_path / "1.2.840.55") and is_image_file(tmp_path / "IMG0001")
    assert not is_image_file(tmp_path / "notes")
    np.testing.assert_array_equal(read_rgb(tmp_path / "IMG0001"), _grey(stored))


def _plugins(syntax) -> list[str]:
    try:
        return list(get_decoder(syntax).available_plugins)
    except NotImplementedError:
        return []


def _compressed(tmp_path: Path, kind: str) -> tuple[Path, np.ndarray, int]:
    """A compressed DICOM of a synthetic image, the expected 8-bit pixels, and the tolerance."""
    pixels = synthetic_xray(3, 40)
    path = write_dicom(tmp_path / f"{kind}.dcm", pixels)
    ds = pydicom.dcmread(path)
    if kind == "rle":
        ds.compress(RLELossless)
        expected, tolerance = pixels, 0
    elif kind == "j2k":
        try:
            ds.compress(JPEG2000Lossless)
        except (RuntimeError, ImportError) as exc:
            pytest.skip(f"no JPEG 2000 encoder installed ({exc})")
        expected, tolerance = pixels, 0
    else:  # baseline JPEG written by Pillow, decoded by each plugin (IDCTs differ by a grey level or two)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        buffer.seek(0)
        expected, tolerance = np.asarray(Image.open(buffer).convert("L")), 2
    ds.save_as(path)
    return path, expected, tolerance


CASES = [("rle", RLELossless, "pydicom")] + [("jpeg", JPEGBaseline8Bit, p) for p in ("pillow", "gdcm", "pylibjpeg")] \
    + [("j2k", JPEG2000Lossless, p) for p in ("gdcm", "pylibjpeg", "pillow")]


@pytest.mark.parametrize("kind,syntax,plugin", CASES, ids=[f"{k}-{p}" for k, _, p in CASES])
def test_compressed_syntax_per_installed_decoder(tmp_path: Path, kind: str, syntax, plugin: str):
    if plugin not in _plugins(syntax):
        pytest.skip(f"decoder {plugin} for {syntax.name} is not installed")
    path, expected, tolerance = _compressed(tmp_path, kind)
    got = read_dicom_rgb(path, decoding_plugin=plugin if plugin != "pydicom" else "")
    assert got.shape == (40, 40, 3)
    assert np.abs(got[:, :, 0].astype(int) - expected.astype(int)).max() <= tolerance


def test_compressed_file_without_a_decoder_is_skipped_naming_syntax_and_extra(tmp_path: Path, monkeypatch):
    path, _, _ = _compressed(tmp_path, "jpeg")

    class Missing:
        is_available = False

    monkeypatch.setattr("pydicom.pixels.get_decoder", lambda uid: Missing())
    with pytest.raises(ImageDecodeError, match=r"JPEG Baseline.*1\.2\.840\.10008\.1\.2\.4\.50.*cxr-transfer\[dicom\]"):
        read_rgb(path, 32)


def test_pydicom_bundled_files(tmp_path: Path):
    # A real CR: extension-less, MONOCHROME1, 12 bit, rescale slope 0.684 / intercept 200, window 1600/2800.
    cr = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "77654033" / "CR3" / "6278"
    assert is_image_file(cr)
    stored = pydicom.dcmread(cr).pixel_array.astype(np.float64)
    expected = 255 - np.rint(_linear_window(stored * 0.684 + 200, 1600, 2800) * 255)
    assert np.abs(read_rgb(cr)[:, :, 0].astype(int) - expected.astype(int)).max() <= 1
    # A colour secondary capture compressed as baseline JPEG: read as RGB at its size, like pydicom shows it.
    rgb = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")
    np.testing.assert_array_equal(read_rgb(rgb), pydicom.dcmread(rgb).pixel_array)
    # Skipped, each with its reason.
    for name, reason in [("CT_small.dcm", "modality CT is not a projection radiograph"),
                         ("test-SR.dcm", "without an image \\(Comprehensive SR Storage"),
                         ("SC_rgb_rle_2frame.dcm", "multi-frame"),
                         ("rtplan.dcm", "without an image")]:
        with pytest.raises(ImageDecodeError, match=reason):
            read_rgb(get_testdata_file(name))


def test_dicom_written_from_png_pixels_embeds_like_the_png(tmp_path: Path, cache_dir: Path):
    pngs, dicoms = tmp_path / "png", tmp_path / "dcm"
    for label, index in (("a", 0), ("b", 1)):
        for i in range(3):
            grey8 = synthetic_xray(10 * index + i, 48, index)
            grey16 = (grey8.astype(np.uint16) * 257 + i).astype(np.uint16)
            for root in (pngs, dicoms):
                (root / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(grey8).save(pngs / label / f"g8_{i}.png")
            write_dicom(dicoms / label / f"g8_{i}.dcm", grey8)
            Image.fromarray(grey16).save(pngs / label / f"g16_{i}.png")
            write_dicom(dicoms / label / f"g16_{i}.dcm", grey16, bits_stored=16)
    settings = ExtractSettings.from_options(cache_dir=cache_dir, **TINY)
    from_png, _ = load_features(load_dataset(pngs), settings)
    from_dicom, _ = load_features(load_dataset(dicoms), settings)
    assert [Path(s.path).stem for s in from_png.samples] == [Path(s.path).stem for s in from_dicom.samples]
    np.testing.assert_allclose(from_dicom.embeddings, from_png.embeddings, rtol=0, atol=1e-6)


def _dicom_tree(root: Path, per_class: int = 4, patients: int = 2) -> Path:
    for index, label in enumerate(("covid", "normal")):
        for i in range(per_class):
            folder = root / label
            folder.mkdir(parents=True, exist_ok=True)
            write_dicom(folder / f"im{i}.dcm", synthetic_xray(100 * index + i, 40, index),
                        PatientID=f"SECRET-{label}-{i % patients}", PatientName="Doe^Jane",
                        PatientBirthDate="19700101", InstitutionName="St Nowhere Hospital")
    return root


def test_patient_ids_become_salted_groups_and_never_leave_the_header(tmp_path: Path, cache_dir: Path, run_cli):
    data = _dicom_tree(tmp_path / "data")
    dataset = load_dataset(data)
    assert dataset.has_groups and all(g.startswith(GROUP_PREFIX) for g in dataset.groups)
    assert len(set(dataset.groups)) == 4 and not any("SECRET" in g for g in dataset.groups)
    assert resolve_groups(dataset, DICOM_GROUP_BY) is not None
    result = run_cli("-v", "compare", "--data", data, "--backbone", "mobilenetv2", "--random-weights", "--input-size", "32",
                     "--protocol", "cv", "--folds", "2", "--heads", "logreg", "--group-by", DICOM_GROUP_BY,
                     "--cache-dir", cache_dir, "--out", tmp_path / "runs", "--no-progress",
                     env={SALT_ENV: "test-salt"})
    assert result.returncode == 0, result.stderr[-3000:]
    written = [p for p in cache_dir.rglob("*") if p.is_file()] + \
        [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert any(p.suffix == ".h5" for p in written) and any(p.name == "results.json" for p in written)
    for path in written:
        blob = path.read_bytes()
        for secret in (b"SECRET", b"Doe^Jane", b"19700101", b"Nowhere"):
            assert secret not in blob, f"{secret!r} written to {path}"
    for secret in ("SECRET", "Doe", "19700101", "Nowhere"):
        assert secret not in result.stdout + result.stderr


def test_group_by_dicom_patient_id_refuses_manifest_groups(tmp_path: Path):
    data = _dicom_tree(tmp_path / "data")
    (data / "manifest.csv").write_text("path,patient_id\n" + "".join(
        f"{p.relative_to(data).as_posix()},p{i}\n" for i, p in enumerate(sorted(data.rglob("*.dcm")))))
    dataset = load_dataset(data)
    assert dataset.groups[0].startswith("p")
    with pytest.raises(CxrError, match="manifest"):
        resolve_groups(dataset, DICOM_GROUP_BY)


def test_header_audit_finds_a_vendor_that_follows_the_class(tmp_path: Path):
    for index, (label, vendor) in enumerate((("covid", "VendorA"), ("normal", "VendorB"))):
        (tmp_path / label).mkdir()
        for i in range(12):
            write_dicom(tmp_path / label / f"im{i}.dcm", synthetic_xray(50 * index + i, 24, index), Manufacturer=vendor,
                        ViewPosition="PA" if i % 2 else "AP", PixelSpacing=[0.14, 0.14], PatientID=f"{label}{i}")
    dataset = load_dataset(tmp_path)
    fields = header_fields(dataset.samples[0].path)
    assert fields["Manufacturer"] == "VendorA" and fields["PixelSpacing"] == pytest.approx(0.14)
    result = header_shortcuts(dataset)
    assert result.n_dicom == 24 and result.shortcut
    assert result.accuracy["mean"] == pytest.approx(1.0) and result.top_fields[0] == "Manufacturer"
    assert result.values["Manufacturer"] == {"covid": {"VendorA": 12}, "normal": {"VendorB": 12}}
    section = markdown({"dataset": {"root": "x", "counts": {}, "n_images": 24, "fingerprint": "0" * 16},
                        "verdict": "v", "findings": [], "settings": {"backbone": "b"}, "weights": "w",
                        "duplicates": {"rule": {"phash_alone": 1, "phash_with_embedding": 2, "cosine_min": 0.9},
                                       "different_patient_pairs": {"pairs": 0, "by_patient_id": True, "flagged": 0,
                                                                   "rate": 0.0},
                                       "n_exact": 0, "n_near": 0, "n_near_cross_split": 0,
                                       "n_near_different_patient": 0, "n_near_cross_label": 0, "pairs": [],
                                       "clusters": [], "borderline": [], "unreadable": []},
                        "leakage": {"checked": False, "reason": "r"},
                        "acquisition": {"summary": {}, "accuracy": None, "skipped": "s"},
                        "header_shortcuts": result.to_dict(),
                        "pixel_shortcuts": {"skipped": "", "head": "h", "grouped": False, "folds": 5, "chance": 0.5,
                                            "center_fraction": 0.5, "border_fraction": 0.1, "scores": {},
                                            "separable_without_lungs": False},
                        "timings": {}, "record": {"created": "now"}})
    assert "Header shortcuts" in section and "VendorA 12" in section and "mostly through Manufacturer" in section
    assert "Pillow reads no DICOM file" in section


def test_non_dicom_dataset_has_no_header_section(class_tree: Path):
    result = header_shortcuts(load_dataset(class_tree))
    assert result.n_dicom == 0 and not result.shortcut and "no DICOM" in result.skipped
