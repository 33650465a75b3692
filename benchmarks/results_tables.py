"""Print the Markdown accuracy table of docs/results.md from compare run folders (no number typed by hand).

    python benchmarks/results_tables.py runs/results/compare-*
"""
from __future__ import annotations

import sys

from cxr_transfer.classify.results import load_results
from cxr_transfer.core.tables import mean_std


def column_name(settings: dict) -> str:
    name = {"paper": f"paper 80/20 x{settings['seeds']}", "cv": f"CV {settings['repeats']}x{settings['folds']}",
            "holdout": "train/ -> test/"}[settings["protocol"]]
    return name + (" grouped" if settings.get("group_by") else "")


def main(run_dirs: list[str]) -> None:
    columns: dict[str, dict[tuple[str, str], dict]] = {}
    for run_dir in run_dirs:
        payload = load_results(run_dir)
        if payload["kind"] != "compare":
            continue
        name = column_name(payload["record"]["settings"])
        columns[name] = {(r["backbone"], r["model"]): r for r in payload["summary"]}
    order = sorted(columns, key=lambda c: (c.startswith("train"), c.startswith("CV"), c.endswith("grouped")))
    keys = sorted({k for c in columns.values() for k in c})
    print("| backbone | head | " + " | ".join(order) + " |")
    print("|---|---|" + "---|" * len(order))
    for backbone, model in keys:
        cells = []
        for name in order:
            row = columns[name].get((backbone, model))
            acc = row and row["accuracy"]
            cells.append(mean_std(acc))
        print(f"| {backbone} | {model} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
