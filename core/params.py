"""Declarative settings, in the spirit of scikit-learn's parameter constraints: each field of a settings class
says once its default, its constraint (``Interval``, ``Options``) and its help, and both the library and the
command line read that.

    @dataclass(frozen=True)
    class CompareSettings:
        folds: int = param(5, FOLDS, "folds of the cv protocol")
        def __post_init__(self): check_params(self)

    CompareSettings(folds=1)   # CxrError(param="folds"): folds must be at least 2, got 1 instead

``check_params`` raises ``TypeError`` for a value of the wrong type and ``CxrError(param=NAME)`` (a
``ValueError``) for one out of bounds, its message beginning with the parameter's name; the CLI builds its
flags from the same metadata (``cli.add_settings_flags``) and prints the name as its flag. NumPy integers and
floats are accepted where Python's are.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any

from cxr_transfer.core.errors import CxrError

MAX_INPUT_SIZE = 1024
"""Largest square input accepted: the published weights were trained at 224-331 px, and a batch of 16 VGG16
inputs of 1024 px already needs about 20 GiB of activations (the memory grows with the square of the side)."""


def _number(value: float) -> str:
    """4294967295 as such, 0.2 as 0.2 (never 4.29497e+09)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True)
class Interval:
    """Numbers in [low, high] (an end may be open or absent); whole numbers unless ``real``. ``special`` is one
    more value with a meaning (-1: all cores)."""

    low: float | None = None
    high: float | None = None
    real: bool = False
    low_open: bool = False
    high_open: bool = False
    why_high: str = ""           # said when the maximum is exceeded
    why_low: str = ""            # said when the value is below the minimum
    special: int | None = None
    special_means: str = ""

    @property
    def kind(self) -> str:
        return "a number" if self.real else "an int"

    def accepts_type(self, value: object) -> bool:
        if isinstance(value, bool):
            return False
        return isinstance(value, numbers.Real if self.real else numbers.Integral)

    def problem(self, value: float) -> str | None:
        """What is wrong with ``value`` ('must be at least 1, got 0 instead'), or None when it is in bounds."""
        if self.special is not None and value == self.special:
            return None
        if self.real and not math.isfinite(value):
            return f"must be a finite number, got {value} instead"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below and self.special is not None:
            return f"must be {self.special} ({self.special_means}) or at least {_number(self.low)}, got {value} instead"
        if below and self.high is not None and (self.low_open or self.high_open):
            return f"must be between {_number(self.low)} and {_number(self.high)}{self._ends()}, got {_number(value)} instead"
        if below and self.low_open and self.low == 0:
            return f"must be a positive finite number, got {value} instead"
        if below:
            why = f" {self.why_low}" if self.why_low else ""
            return f"must be {'above' if self.low_open else 'at least'} {_number(self.low)}{why}, got {value} instead"
        if above and self.low is not None and (self.low_open or self.high_open):
            return f"must be between {_number(self.low)} and {_number(self.high)}{self._ends()}, got {_number(value)} instead"
        if above:
            why = f" ({self.why_high})" if self.why_high else ""
            return f"must be {'below' if self.high_open else 'at most'} {_number(self.high)}{why}, got {value} instead"
        return None

    def _ends(self) -> str:
        if self.low_open and self.high_open:
            return " (exclusive)"
        return f" (excluding {_number(self.low if self.low_open else self.high)})"

    def parse(self, text: str) -> float | int:
        """The value of a command-line string, or ValueError saying what is wrong (argparse shows it)."""
        try:
            value = float(text) if self.real else int(text)
        except ValueError:
            raise ValueError(f"expected {'a number' if self.real else 'a whole number'}, got {text!r} instead") from None
        problem = self.problem(value)
        if problem:
            raise ValueError(problem)
        return value


@dataclass(frozen=True)
class Options:
    """One of a fixed set of strings (or whole numbers); a near miss is named ('did you mean ...')."""

    values: tuple[str, ...] | tuple[int, ...]

    def accepts_type(self, value: object) -> bool:
        if isinstance(self.values[0], str):
            return isinstance(value, str)
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    def problem(self, value: str | int) -> str | None:
        if value in self.values:
            return None
        close = difflib.get_close_matches(str(value), [str(v) for v in self.values], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close and isinstance(value, str) else ""
        return f"must be one of {', '.join(map(str, self.values))}, got {value!r} instead{hint}"

    @property
    def kind(self) -> str:
        return "a str" if isinstance(self.values[0], str) else "an int"


Constraint = Interval | Options

COUNT = Interval(1)
"""Counts: batch size, threads, workers, epochs, seeds, int8 sample images, ..."""
INPUT_SIZE = Interval(1, MAX_INPUT_SIZE, why_high="larger inputs need tens of GiB of memory per batch")
SEED = Interval(0, 2**32 - 1, why_high="the largest seed NumPy accepts")
FOLDS = Interval(2)
JOBS = Interval(1, special=-1, special_means="all cores")
N_BOOT = Interval(100, 100_000, why_high="more replicates only add time: at 100000 the ends of a 95% interval vary "
                                          "by well under 0.01 from run to run", why_low="for a 95% interval")
"""Bootstrap replicates per interval: 100 at least for a 95% percentile interval."""
IMAGE_COUNT = Interval(0, why_low="(a number of images, 0: none)")
FRACTION = Interval(0.0, 1.0, real=True, low_open=True, high_open=True)
"""Strictly between 0 and 1: test sizes, the conformal miscoverage."""
POSITIVE = Interval(0.0, real=True, low_open=True)
"""A positive finite number: learning rates, timeouts."""


def param(default: Any = dataclasses.MISSING, constraint: Constraint | None = None, help: str = "", *,
          none_means: str = "", flag: str | None = None, default_factory: Any = dataclasses.MISSING,
          cli: bool = True, metavar: str | None = None) -> Any:
    """A dataclass field that carries its constraint and help: ``none_means`` says what None stands for (None
    is refused without it), ``flag`` the CLI flag when it is not ``--name-with-dashes``, ``cli=False`` keeps
    the field off the command line, ``metavar`` names the flag's value in its help."""
    metadata = {"param": {"constraint": constraint, "help": help, "none_means": none_means, "flag": flag,
                          "cli": cli, "metavar": metavar}}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def param_info(field: dataclasses.Field) -> dict[str, Any] | None:
    """The ``param`` metadata of a dataclass field, or None for a plain field."""
    return field.metadata.get("param")


def flag_of(field: dataclasses.Field) -> str:
    """The command-line flag of a ``param`` field: its own ``flag`` (n_jobs: --jobs), else the name dashed."""
    return param_info(field)["flag"] or "--" + field.name.replace("_", "-")


def parse_floats(text: str) -> tuple[float, ...]:
    """A tuple-of-floats field from its command-line text: a comma list of numbers (--mean 0.5,0.5,0.5)."""
    return tuple(float(v) for v in text.split(",") if v.strip())


def check_value(name: str, value: Any, constraint: Constraint | None, none_means: str = "") -> Any:
    """``value`` checked against ``constraint`` (TypeError for a wrong type, CxrError(param=name) for a value
    out of bounds), returned as a plain Python int/float/str."""
    if value is None and none_means:
        return None
    if constraint is None:
        return value
    if not constraint.accepts_type(value):
        allowed = f"{constraint.kind} or None" if none_means else constraint.kind
        raise TypeError(f"{name} must be {allowed}, got {value!r} instead")
    if isinstance(constraint, Interval):
        value = float(value) if constraint.real else int(value)
    problem = constraint.problem(value)
    if problem:
        raise CxrError(f"{name} {problem}" + (f" (None: {none_means})" if none_means else ""), param=name)
    return value


def check_params(settings: Any) -> None:
    """Check every ``param`` field of a settings dataclass; NumPy numbers are stored back as Python's."""
    for field in dataclasses.fields(settings):
        info = param_info(field)
        if info is None:
            continue
        value = getattr(settings, field.name)
        checked = check_value(field.name, value, info["constraint"], info["none_means"])
        if checked is not value:
            object.__setattr__(settings, field.name, checked)


def check_int(name: str, value: object, bound: Interval, none_means: str = "") -> None:
    """Check one whole-number argument of a library function (see ``check_value``)."""
    check_value(name, value, bound, none_means)


def path_arguments(*names: str):
    """Decorator for library functions: each named argument must be a str or a path (or None where None is its
    default), else TypeError naming it, before anything runs."""
    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def checked(*args: Any, **kwargs: Any) -> Any:
            given = signature.bind_partial(*args, **kwargs).arguments
            for name in names:
                value = given.get(name, signature.parameters[name].default)
                if value is inspect.Parameter.empty:   # missing: Python's own TypeError says so
                    continue
                if not isinstance(value, (str, os.PathLike)) and not (
                        value is None and signature.parameters[name].default is None):
                    raise TypeError(f"{name} must be a str or Path, got {value!r} instead")
            return function(*args, **kwargs)
        return checked
    return decorate


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
