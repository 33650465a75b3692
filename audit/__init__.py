"""Dataset audit: duplicates, patient leakage, acquisition and pixel shortcuts, one report.

    import cxr_transfer
    report = cxr_transfer.audit_dataset("../shared/data/covid19-xray", "vgg16", weights_dir="../shared/weights")
    report.findings      # short strings; empty when nothing was found
    report.out_dir       # audit.md, audit.json, duplicates.png

``run_audit(AuditSettings(...))`` is the same with a settings object. Modules, one job each: leakage
(patients across splits), acquisition (file properties), header_shortcuts (DICOM header fields),
pixel_shortcuts (masked images), report (files), run (orchestration, duplicates through ``extract.duplicates``,
and pointers).
"""
from __future__ import annotations

import importlib
from typing import Any


_EXPORTS = {"AuditReport": "run", "AuditSettings": "run", "audit_pointer": "run", "latest_audit_for": "run",
            "run_audit": "run"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the audit's modules (scikit-learn, OpenCV, imagehash) only when one of their names is used."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

