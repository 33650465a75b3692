"""Exception types. Problems the user can fix are ``CxrError``; the CLI prints its message on one line.

``CxrError`` subclasses ``ValueError`` (like scikit-learn's errors), so library callers can catch it with
``except ValueError``. Bad arguments to library functions (wrong type, impossible value) raise plain
``TypeError`` / ``ValueError``: those are programming errors and keep their traceback in the CLI.
"""


class CxrError(ValueError):
    """A user-facing error: bad path, missing weights, unknown backbone, empty folder...

    The CLI catches it, prints ``error: <message>`` and exits with status 2.
    """


class WeightsNotFoundError(CxrError):
    """No weights could be found or downloaded for a backbone."""
