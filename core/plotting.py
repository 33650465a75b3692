"""Figures without pyplot: no global backend switch, no figure registry, safe in threads and notebooks."""
from __future__ import annotations

from typing import Any


def subplots(nrows: int = 1, ncols: int = 1, **kwargs: Any):
    """``(figure, axes)`` like ``pyplot.subplots``, on a standalone ``matplotlib.figure.Figure``.

    The figure is drawn by its own Agg canvas on ``savefig``; nothing global changes and nothing needs closing.
    """
    from matplotlib.figure import Figure

    figure_kwargs = {k: kwargs.pop(k) for k in ("figsize", "dpi", "layout") if k in kwargs}
    figure = Figure(**figure_kwargs)
    axes = figure.subplots(nrows, ncols, **kwargs)
    return figure, axes
