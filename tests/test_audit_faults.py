"""audit on datasets the Pillow-based checks cannot read: an all-DICOM dataset (M10).

The verdict must say what was checked (the DICOM header-field classifier) and what could not be (the
file-property check, since Pillow reads no DICOM file) in plain words, with no internal error text; section 3b
names classes by name and never prints an empty list of fields. DICOMs are written with pydicom from small
synthetic radiographs (``write_dicom``), one PatientID per file, as in tests/test_dicom.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from cxr_transfer.audit import AuditSettings, run_audit
from cxr_transfer.audit.acquisition import acquisition_shortcuts
from cxr_transfer.audit.header_shortcuts import header_shortcuts
from cxr_transfer.core.settings import BackboneSettings
from testkit.synthetic import synthetic_xray
from cxr_transfer.extract.dataset import load_dataset
from cxr_transfer.extract.dicom import SALT_ENV
from testkit.dicom_files import write_dicom

CLASSES = ("covid", "normal", "pneumonia")
INTERNAL = ("labels must be", "shape (0,)", "1-D array", "Traceback")


def _dicom_tree(root: Path, per_class: int) -> Path:
    """``per_class`` DICOMs per class with the same header fields in every class, one patient per file."""
    for index, label in enumerate(CLASSES):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            write_dicom(root / label / f"im{i}.dcm", synthetic_xray(100 * index + i, 40, index),
                        PatientID=f"{label}-{i}")
    return root


@pytest.fixture(scope="module")
def dicom_audit(tmp_path_factory):
    """The audit of 30 DICOMs (10 per class): the report object and its audit.md."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SALT_ENV, "test-salt")
        base = tmp_path_factory.mktemp("dicom_audit")
        data = _dicom_tree(base / "data", 10)
        common = BackboneSettings(backbone="vgg16", random_weights=True, input_size=32, cache_dir=base / "cache",
                                  progress=False)
        report = run_audit(AuditSettings(data=data, common=common, out_dir=base / "aud"))
        return report, (base / "aud" / "audit.md").read_text(encoding="utf-8")


def test_all_dicom_verdict_says_header_was_checked_and_pillow_reads_no_dicom(dicom_audit):
    report, md = dicom_audit
    assert report.header.accuracy is not None and report.acquisition.accuracy is None
    verdict = report.verdict
    for text in INTERNAL:
        assert text not in verdict, verdict
    assert "nothing is known about shortcuts" not in verdict
    # what was checked: the header-field classifier and its accuracy
    header_pct = f"{100 * report.header.accuracy['mean']:.0f}%"
    assert "header fields" in verdict and header_pct in verdict, verdict
    # what could not be: the Pillow-based file-property check, in plain words
    assert "Not checked: acquisition shortcuts" in verdict and "Pillow reads no DICOM file" in verdict, verdict
    assert "all 30 images are DICOM" in verdict
    assert f"**Verdict.** {verdict}" in md


def test_all_dicom_report_omits_an_empty_field_share_list(dicom_audit):
    report, md = dicom_audit
    assert report.header.field_importance == {}     # identical headers in every class: no field carries signal
    assert "Share of the signal per field: ." not in md
    assert "Share of the signal per field: none" in md
    assert "Random forest on header fields alone" in md


def test_all_dicom_acquisition_skip_is_plain_words(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(SALT_ENV, "test-salt")
    result = acquisition_shortcuts(load_dataset(_dicom_tree(tmp_path / "data", 6)))
    assert result.accuracy is None and len(result.unreadable) == 18
    assert result.skipped.startswith("Pillow reads no DICOM file")
    assert not any(text in result.skipped for text in INTERNAL), result.skipped


def test_header_classifier_skip_names_the_class_not_its_index(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(SALT_ENV, "test-salt")
    result = header_shortcuts(load_dataset(_dicom_tree(tmp_path / "data", 4)))
    assert result.accuracy is None
    assert "class 'covid'" in result.skipped and "class '0'" not in result.skipped, result.skipped
