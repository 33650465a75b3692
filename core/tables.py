"""One table printer (terminal and Markdown) and one "mean ± std" formatter for every report."""
from __future__ import annotations

from typing import Mapping, Sequence


def mean_std(stat: Mapping[str, float] | None, digits: int = 3, scale: float = 1.0, suffix: str = "") -> str:
    """``0.971 ± 0.026`` from a summary dict (mean, std, n); just the mean when n == 1; ``-`` when missing.

    scale=100, digits=1, suffix="%" gives ``97.1% ± 2.6``.
    """
    if not stat or stat.get("mean") is None:
        return "-"
    mean = f"{scale * stat['mean']:.{digits}f}{suffix}"
    if stat.get("n", 2) <= 1:
        return mean
    return f"{mean} ± {scale * stat['std']:.{digits}f}"


def text_table(rows: Sequence[Mapping[str, object]]) -> str:
    """Plain aligned text table for the terminal (columns from the first row)."""
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells])


def markdown_table(rows: Sequence[Mapping[str, object]]) -> str:
    """GitHub Markdown table (columns from the first row)."""
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows])
