"""The bounds of the numeric settings, in one place: the library's settings check them, and the command
line's argparse types (``cli.bounded``) use the same objects, so a value one refuses the other refuses too.

    INPUT_SIZE.problem(0)                  # 'must be at least 1, got 0 instead'
    check_int("input_size", 5000, INPUT_SIZE)   # CxrError: input_size must be at most 1024 (...), got 5000 instead
"""
from __future__ import annotations

from dataclasses import dataclass

from cxr_transfer.core.errors import CxrError

MAX_INPUT_SIZE = 1024
"""Largest square input accepted: the published weights were trained at 224-331 px, and a batch of 16 VGG16
inputs of 1024 px already needs about 20 GiB of activations (the memory grows with the square of the side)."""


@dataclass(frozen=True)
class IntBound:
    """Whole numbers in [minimum, maximum]; ``special`` is one more value with a meaning (-1: all cores)."""

    minimum: int
    maximum: int | None = None
    why_maximum: str = ""          # said when the maximum is exceeded
    special: int | None = None
    special_means: str = ""
    why_minimum: str = ""          # said when the value is below the minimum

    def problem(self, value: int) -> str | None:
        """What is wrong with ``value`` ('must be at least 1, got 0 instead'), or None when it is in bounds."""
        if self.special is not None and value == self.special:
            return None
        if value < self.minimum:
            if self.special is not None:
                return (f"must be {self.special} ({self.special_means}) or at least {self.minimum}, "
                        f"got {value} instead")
            why = f" {self.why_minimum}" if self.why_minimum else ""
            return f"must be at least {self.minimum}{why}, got {value} instead"
        if self.maximum is not None and value > self.maximum:
            why = f" ({self.why_maximum})" if self.why_maximum else ""
            return f"must be at most {self.maximum}{why}, got {value} instead"
        return None


COUNT = IntBound(1)
"""Counts: batch size, threads, workers, epochs, seeds, calibration images, ..."""
INPUT_SIZE = IntBound(1, MAX_INPUT_SIZE, "larger inputs need tens of GiB of memory per batch")
SEED = IntBound(0, 2**32 - 1, "the largest seed NumPy accepts")
FOLDS = IntBound(2)
JOBS = IntBound(1, special=-1, special_means="all cores")
N_BOOT = IntBound(100, 100_000, "more replicates only add time: at 100000 the ends of a 95% interval vary by "
                                 "well under 0.01 from run to run", why_minimum="for a 95% interval")
"""Bootstrap replicates per interval: 100 at least for a 95% percentile interval."""
IMAGE_COUNT = IntBound(0, why_minimum="(a number of images, 0: none)")


def check_int(name: str, value: object, bound: IntBound, none_means: str = "") -> None:
    """Check a library argument: TypeError when ``value`` is not an int (a bool is not; None only when
    ``none_means`` says what None stands for), else CxrError (a ValueError) naming ``name`` when out of bounds."""
    if value is None and none_means:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        allowed = "an int or None" if none_means else "an int"
        raise TypeError(f"{name} must be {allowed}, got {value!r} instead")
    problem = bound.problem(value)
    if problem:
        raise CxrError(f"{name} {problem}" + (f" (None: {none_means})" if none_means else ""))


def names_argument(name: str, value: object) -> str:
    """A comma list given as a str ('vgg16,xception') or a list of str (['vgg16', 'xception']), as one str;
    TypeError naming ``name`` for anything else, ValueError when it names nothing."""
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        value = ",".join(value)
    if not isinstance(value, str):
        got = type(value).__name__
        if isinstance(value, (list, tuple)):
            got = f"a {got} holding a {next(type(v).__name__ for v in value if not isinstance(v, str))}"
        raise TypeError(f"{name} must be a str or a list of str, got {got} instead")
    if not value.strip(" ,"):
        raise ValueError(f"{name} must name at least one, got {value!r} instead")
    return value
