"""The project's version, one source of truth: setup.cfg reads it, and records and exports write it."""
__version__ = "0.2.0"
