"""One exception type for problems the user can fix; the CLI prints its message on one line."""


class CxrError(Exception):
    """A user-facing error: bad path, missing weights, unknown backbone, empty folder...

    The CLI catches it, prints ``error: <message>`` and exits with status 2.
    """


class WeightsNotFoundError(CxrError):
    """No weights could be found or downloaded for a backbone."""
