"""Test support, not library code: synthetic X-ray trees (``synthetic``), DICOM files (``dicom_files``) and the
near-duplicate edits (``transforms``, also used by benchmarks/duplicate_thresholds.py). setup.cfg puts tests/ on
the path (``pythonpath = tests``), so tests import ``testkit.synthetic``."""
