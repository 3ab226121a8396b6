"""Merge the JSON files of `recipes_table.py` runs into one grid: recipes by target sparsity.

Each cell is "strict / half-dense" perplexity with the realized model-wide sparsity of the strict
run (of the half-dense run where only that one exists). Later files win where two files have
the same recipe, target and protocol. A `.log` file (the output of a run still in progress) is
read for its JSON lines.

Run:
    python benchmarks/recipes_grid.py runs/tables/smollm2-*.json --dense 29.81
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--dense", type=float, help="dense perplexity, when no file has the dense row")
    args = parser.parse_args()

    cells: dict[tuple[str, float], dict[str, dict]] = {}
    dense = args.dense
    for file in args.files:
        text = file.read_text()
        if file.suffix == ".json":
            rows = json.loads(text)
        else:  # a log of a run in progress: its JSON lines
            rows = [json.loads(line) for line in text.splitlines() if line.startswith("{") and '"perplexity"' in line]
        for row in rows:
            if row["recipe"] == "dense":
                dense = row["perplexity"]
                continue
            cells.setdefault((row["recipe"], row["target"]), {})[row["protocol"]] = row
    recipes = list(dict.fromkeys(recipe for recipe, _ in cells))
    targets = sorted({target for _, target in cells})

    def cell(recipe: str, target: float) -> str:
        runs = cells.get((recipe, target))
        if not runs:
            return ""
        strict, half = runs.get("strict"), runs.get("half-dense")
        figures = " / ".join("-" if run is None else f"{run['perplexity']:.2f}" for run in (strict, half))
        realized = (strict or half)["model_sparsity"]
        return f"{figures} ({realized:.1%})"

    print("| recipe | " + " | ".join(f"{target:.0%}" for target in targets) + " |")
    print("| --- | " + " | ".join("---" for _ in targets) + " |")
    if dense is not None:
        print(f"| dense | " + " | ".join(f"{dense:.2f}" for _ in targets) + " |")
    for recipe in recipes:
        print(f"| {recipe} | " + " | ".join(cell(recipe, target) for target in targets) + " |")


if __name__ == "__main__":
    main()
