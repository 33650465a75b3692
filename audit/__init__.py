"""Dataset audit: duplicates, patient leakage, acquisition and pixel shortcuts, one report.

    import cxr_transfer
    report = cxr_transfer.audit("../shared/data/covid19-xray", "vgg16", weights_dir="../shared/weights")
    report.findings      # short strings; empty when nothing was found
    report.out_dir       # audit.md, audit.json, duplicates.png

The package is also that API function (``cxr_transfer.api.audit``); ``run_audit(AuditSettings(...))`` is
the same with a settings object. Modules, one job each: duplicates (pHash + embedding cosine), leakage
(patients across splits), acquisition (file properties), pixel_shortcuts (masked views), report (files),
run (orchestration and pointers), transforms and calibrate (the evidence behind the duplicate thresholds).
"""
from __future__ import annotations

import importlib
from typing import Any

from cxr_transfer.api import audit as _audit
from cxr_transfer.core.callable_module import make_module_callable

_EXPORTS = {"AuditReport": "run", "AuditSettings": "run", "audit_pointer": "run", "latest_audit_for": "run",
            "run_audit": "run", "DuplicatePair": "duplicates", "DuplicateRule": "duplicates",
            "find_duplicates": "duplicates"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the audit's modules (scikit-learn, OpenCV, imagehash) only when one of their names is used."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


make_module_callable(__name__, _audit)
