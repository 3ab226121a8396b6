"""Perplexity and realized sparsity of recipes at several sparsities, dense baseline in the same run.

Calibrates once on the calibration text (or reuses --calibration), then for every recipe and
target sparsity builds the plan in memory, evaluates WikiText-style perplexity on the evaluation
text and prints one markdown table with the dense row first.

Run (the README's quality table):
    python benchmarks/quality.py models/smollm2-135m --recipes teal-uniform cats-mlp --sparsities 0.25 0.4 0.5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from moyu_cli.architecture import discover
from moyu_cli.calibrate import calibrate, load_calibration
from moyu_cli.checkpoint import load_model
from moyu_cli.data import read_text
from moyu_cli.evaluate import perplexity
from moyu_cli.modeling import apply_plan
from moyu_cli.recipe import load_recipe
from moyu_cli.sparsify import plan_from_recipe

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--recipes", nargs="+", default=["teal-uniform", "cats-mlp"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.25, 0.4, 0.5])
    parser.add_argument("--calibration-data", default=str(SHARED / "wikitext-2" / "valid.txt"))
    parser.add_argument("--eval-data", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    parser.add_argument("--calibration", type=Path, help="reuse this calibration file instead of calibrating")
    parser.add_argument("--tokens", type=int, default=32768, help="calibration tokens")
    parser.add_argument("--windows", type=int, default=64, help="evaluation windows of 512 tokens")
    parser.add_argument("--protocols", nargs="+", default=["strict"], choices=["strict", "half-dense"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write all results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    calib_path = args.calibration or Path(f"runs/{args.model_dir.name}.calib")
    if not calib_path.exists():
        calib_path.parent.mkdir(parents=True, exist_ok=True)
        calibrate(args.model_dir, [args.calibration_data], calib_path, tokens=args.tokens)
    calibration = load_calibration(calib_path)
    evaluation_text = [read_text(args.eval_data)]
    rows = []

    def run(label: str, recipe_name: str | None, sparsity: float | None) -> None:
        model, tokenizer = load_model(args.model_dir)
        if recipe_name is not None:
            recipe = load_recipe(recipe_name).with_sparsity(sparsity)
            apply_plan(model, plan_from_recipe(recipe, discover(model), calibration), backend="torch")
        for protocol in args.protocols:
            started = time.perf_counter()
            result = perplexity(model, tokenizer, evaluation_text, max_windows=args.windows, protocol=protocol)
            values = list(result.module_sparsity.values()) or [0.0]
            rows.append({
                "recipe": label, "target": sparsity, "protocol": protocol, "perplexity": result.perplexity,
                "model_sparsity": result.model_sparsity, "module_min": min(values), "module_max": max(values),
                "module_mean": sum(values) / len(values), "seconds": round(time.perf_counter() - started, 1),
            })
            print(json.dumps(rows[-1]), flush=True)

    run("dense", None, None)
    for recipe_name in args.recipes:
        for sparsity in args.sparsities:
            run(recipe_name, recipe_name, sparsity)

    print(f"\n{args.model_dir.name}: calibrated on {calibration.metadata['tokens']} tokens of "
          f"{Path(args.calibration_data).name}, evaluated on {args.windows} windows of 512 of {Path(args.eval_data).name}\n")
    print("| recipe | target | protocol | perplexity | model-wide sparsity | per-module realized (mean, min-max) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        target = "-" if row["target"] is None else f"{row['target']:.0%}"
        spread = "-" if row["target"] is None else f"{row['module_mean']:.1%} ({row['module_min']:.1%}-{row['module_max']:.1%})"
        sparsity = "-" if row["target"] is None else f"{row['model_sparsity']:.1%}"
        print(f"| {row['recipe']} | {target} | {row['protocol']} | {row['perplexity']:.2f} | {sparsity} | {spread} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
