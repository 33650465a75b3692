"""Exception types. Problems the user can fix are ``CxrError``; the CLI prints its message on one line.

``CxrError`` subclasses ``ValueError`` (like scikit-learn's errors), so library callers can catch it with
``except ValueError``. Bad arguments to library functions (wrong type, impossible value) raise plain
``TypeError`` / ``ValueError``: those are programming errors and keep their traceback in the CLI.
"""


class CxrError(ValueError):
    """A user-facing error: bad path, missing weights, unknown backbone, empty folder...

    ``param`` names the library parameter at fault (``cache_dir``, ``folds``), and the message then begins with
    that name ("folds must be at least 2, got 1 instead"), so that it reads right in a notebook. The CLI
    prints ``error: <message>`` with the name turned into its flag (``--folds``) and exits with status 2.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class WeightsNotFoundError(CxrError):
    """No weights could be found or downloaded for a backbone."""


class Int8RefusedError(CxrError):
    """An int8 model failed its fidelity gate. ``results`` holds what was extracted before and after it (a
    multi-backbone extract goes on with the other backbones and raises this at the end)."""

    def __init__(self, message: str, results: list | None = None) -> None:
        super().__init__(message)
        self.results = list(results or [])
