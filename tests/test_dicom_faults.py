"""DICOM files that must be skipped with a reason, never abort a run: bad windows, unknown transfer syntaxes,
pixel values the declared encoding cannot hold, degenerate images, files without the 128-byte preamble.

Every DICOM is written here with pydicom from small arrays (``write_dicom``), as in tests/test_dicom.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from testkit.synthetic import synthetic_xray, write_class_tree
from cxr_transfer.extract.dicom import SALT_ENV
from testkit.dicom_files import write_dicom
from cxr_transfer.extract.images import ImageDecodeError, read_rgb

SECRETS = ("SECRET-PID", "Doe^Jane", "19700101")
PATIENT = dict(PatientID=SECRETS[0], PatientName=SECRETS[1], PatientBirthDate=SECRETS[2])


@pytest.fixture(autouse=True)
def _salt(monkeypatch):
    monkeypatch.setenv(SALT_ENV, "test-salt")


def _ramp(high: int = 3591, shape=(20, 20)) -> np.ndarray:
    """16-bit values 0..high."""
    return np.linspace(0, high, shape[0] * shape[1]).reshape(shape).astype(np.uint16)


def _set_syntax(path: Path, uid: str) -> Path:
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = uid
    ds.save_as(path)
    return path


def _without_preamble(source: Path, target: Path, meta: bool) -> Path:
    """The same dataset written without the 128-byte preamble and 'DICM' (with or without the file meta group)."""
    ds = pydicom.dcmread(source)
    ds.preamble = None
    if not meta:
        del ds.file_meta
        ds.save_as(target, enforce_file_format=False, implicit_vr=True, little_endian=True)
    else:
        ds.save_as(target, enforce_file_format=False)
    assert target.read_bytes()[128:132] != b"DICM"
    return target


BAD = {  # name -> (writer, pattern the skip reason must match)
    "ww0": (lambda p: write_dicom(p, _ramp(), bits_stored=12, WindowCenter=100, WindowWidth=0, **PATIENT),
            r"Window Width \(0028,1051\) 0(\.0)? .*below 1"),
    "ww_negative": (lambda p: write_dicom(p, _ramp(), bits_stored=12, WindowCenter=100, WindowWidth=-5, **PATIENT),
                    r"Window Width \(0028,1051\) -5(\.0)? .*below 1"),
    "unknown_syntax": (lambda p: _set_syntax(write_dicom(p, _ramp(), bits_stored=12, **PATIENT), "1.2.3.4.5"),
                       r"transfer syntax UID 1\.2\.3\.4\.5 is not a known transfer syntax"),
    "slope0": (lambda p: write_dicom(p, _ramp(), bits_stored=12, RescaleSlope=0, RescaleIntercept=10, **PATIENT),
               r"Rescale Slope \(0028,1053\) is 0"),
    "slope_overflow": (lambda p: write_dicom(p, _ramp(), bits_stored=12, RescaleSlope=1e308, RescaleIntercept=0,
                                             **PATIENT), r"beyond the floating-point range"),   # was all black
    "bits_too_small": (lambda p: write_dicom(p, _ramp(3591), bits_stored=8, **PATIENT),
                       r"Bits Stored \(0028,0101\) is 8 .* values up to 3591"),
    "one_pixel": (lambda p: write_dicom(p, np.array([[7]], np.uint8), **PATIENT), r"degenerate image of 1x1 pixels"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_dicom_is_one_skip_naming_file_and_field_never_patient_data(tmp_path: Path, name: str):
    writer, pattern = BAD[name]
    path = writer(tmp_path / f"{name}.dcm")
    with pytest.raises(ImageDecodeError, match=pattern) as caught:
        read_rgb(path, 32)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert not any(secret in message for secret in SECRETS)


def test_any_other_pydicom_error_while_windowing_is_a_skip_without_its_text(tmp_path: Path, monkeypatch):
    path = write_dicom(tmp_path / "x.dcm", _ramp(), bits_stored=12, WindowCenter=100, WindowWidth=50, **PATIENT)

    def broken(*args, **kwargs):
        raise KeyError("Doe^Jane")         # an unexpected error whose text could hold a header value

    monkeypatch.setattr("pydicom.pixels.apply_voi_lut", broken)
    with pytest.raises(ImageDecodeError, match=r"x\.dcm: .*VOI LUT.*KeyError") as caught:
        read_rgb(path, 32)
    assert "Doe" not in str(caught.value)


def test_valid_encodings_near_the_limits_are_still_read(tmp_path: Path):
    full12 = write_dicom(tmp_path / "full12.dcm", _ramp(4095), bits_stored=12)
    assert read_rgb(full12)[:, :, 0].max() == 255
    # signed 12-bit values stored sign-extended in 16 bits: inside the declared range, not skipped
    signed = np.linspace(-2048, 2047, 400).reshape(20, 20).astype(np.int16).view(np.uint16)
    path = write_dicom(tmp_path / "signed.dcm", signed, bits_stored=12, PixelRepresentation=1)
    grey = read_rgb(path)[:, :, 0].astype(int)
    assert grey.min() == 0 and grey.max() == 255
    window1 = write_dicom(tmp_path / "w1.dcm", _ramp(4095), bits_stored=12, WindowCenter=2000, WindowWidth=1)
    assert set(np.unique(read_rgb(window1))) <= {0, 255}


def test_one_pixel_dicom_and_png_are_skipped_by_the_same_rule(tmp_path: Path):
    png = tmp_path / "one.png"
    Image.fromarray(np.array([[7]], np.uint8)).save(png)
    dcm = write_dicom(tmp_path / "one.dcm", np.array([[7]], np.uint8))
    reasons = []
    for path in (png, dcm):
        with pytest.raises(ImageDecodeError) as caught:
            read_rgb(path, 32)
        reasons.append(str(caught.value).split(": ", 1)[1])
    assert reasons[0] == reasons[1] and "degenerate image" in reasons[0]


@pytest.mark.parametrize("meta", [True, False], ids=["with-file-meta", "raw-dataset"])
def test_dcm_without_preamble_is_read_like_the_file_with_it(tmp_path: Path, meta: bool):
    source = write_dicom(tmp_path / "a.dcm", _ramp(4000), bits_stored=12, WindowCenter=2000, WindowWidth=3000)
    bare = _without_preamble(source, tmp_path / "bare.dcm", meta)
    np.testing.assert_array_equal(read_rgb(bare, 32), read_rgb(source, 32))


def test_non_dicom_named_dcm_says_the_preamble_is_missing(tmp_path: Path):
    path = tmp_path / "notes.dcm"
    path.write_text("this is a text file, not a radiograph\n" * 20)
    with pytest.raises(ImageDecodeError, match=r"notes\.dcm: no DICOM preamble"):
        read_rgb(path, 32)


# --- the command line: one bad file never aborts extract, predict or explain -----------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> tuple[Path, Path]:
    """(cache folder, a saved logreg head): mobilenetv2 with random weights at 32 px on a synthetic tree."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("dicom-cli")
    data = write_class_tree(root / "data", per_class=6, splits=("train", "test"), size=40)
    done = subprocess.run([sys.executable, "-m", "cxr_transfer.cli", "compare", "--data", str(data),
                           "--backbone", "mobilenetv2", "--random-weights", "--input-size", "32", "--heads", "logreg",
                           "--protocol", "holdout", "--save", "--cache-dir", str(root / "cache"),
                           "--out", str(root / "runs"), "--name", "r", "--no-progress"],
                          capture_output=True, text=True, cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "cache", next((root / "runs" / "r").glob("*logreg*.joblib"))


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """Two good DICOMs and one good PNG, then every bad file of ``BAD`` and a non-DICOM named .dcm."""
    folder = tmp_path_factory.mktemp("mixed") / "images"
    for label in ("covid", "normal"):
        (folder / label).mkdir(parents=True)
    for i in range(2):
        write_dicom(folder / "covid" / f"good{i}.dcm", synthetic_xray(i, 40, i), **PATIENT)
    Image.fromarray(synthetic_xray(5, 40, 0)).save(folder / "normal" / "good.png")
    for name, (writer, _) in BAD.items():
        writer(folder / "covid" / f"{name}.dcm")
    (folder / "covid" / "notes.dcm").write_text("not a radiograph\n" * 20)
    return folder


def _check_skips(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    skipped = [line for line in result.stdout.splitlines() if "skipped " in line]
    for name in [*BAD, "notes"]:
        assert sum(f"covid/{name}.dcm: " in line for line in skipped) == 1, result.stdout
    for secret in SECRETS:
        assert secret not in result.stdout + result.stderr


def test_cli_extract_predict_explain_skip_each_bad_dicom(saved_model, mixed_folder, run_cli, tmp_path):
    cache, model = saved_model
    flags = ("--random-weights", "--cache-dir", cache, "--no-progress")
    done = run_cli("extract", "--data", mixed_folder, "--backbone", "mobilenetv2", "--input-size", "32", *flags,
                   env={SALT_ENV: "test-salt"})
    _check_skips(done)
    assert f"{len(BAD) + 1} skipped" in done.stdout
    done = run_cli("predict", mixed_folder, "--model", model, "--out", tmp_path / "p.csv", *flags)
    _check_skips(done)
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + 3
    done = run_cli("explain", mixed_folder, "--model", model, "--out", tmp_path / "ex", *flags)
    _check_skips(done)
    assert "3 heatmaps" in done.stdout
