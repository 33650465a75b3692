"""Dataset audit (issue #5): duplicates, patient leakage, acquisition and pixel shortcuts, one report.

    from audit import AuditSettings, run_audit
    report = run_audit(AuditSettings(data="../shared/data/covid19-xray", weights_dir="../shared/weights"))
    report.findings      # short strings; empty when nothing was found
    report.out_dir       # audit.md, audit.json, duplicates.png

Modules, one job each: duplicates (pHash + embedding cosine), leakage (patients across splits), acquisition
(file properties), pixel_shortcuts (masked views), report (files), run (orchestration and pointers),
transforms and calibrate (the evidence behind the duplicate thresholds).
"""
from audit.duplicates import DuplicatePair, DuplicateRule, find_duplicates
from audit.run import AuditReport, AuditSettings, audit_pointer, latest_audit_for, run_audit

__all__ = ["AuditReport", "AuditSettings", "DuplicatePair", "DuplicateRule", "audit_pointer", "find_duplicates",
           "latest_audit_for", "run_audit"]
