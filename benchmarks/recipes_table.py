"""Perplexity of recipes at given sparsities, with the dense baseline, as a markdown table.

Every recipe is planned from the same calibration file, and its allocation search, if any, runs
on the calibration text. Each recipe is evaluated on the evaluation text under each protocol and
reported with its realized model-wide sparsity (fraction of decoder linear weight bytes skipped)
and the cost of its allocation search.

Run (README "Results" and "Recipes beyond uniform thresholds"):
    python -P benchmarks/recipes_table.py models/smollm2-135m --calibration runs/smollm2-135m-wina.calib \\
        --recipes teal-uniform teal-block-greedy wina-uniform teal-greedy wina-greedy --sparsities 0.5
    python -P benchmarks/recipes_table.py models/smollm2-135m --calibration runs/smollm2-135m-wina.calib \\
        --recipes teal-uniform cats-mlp --sparsities 0.25 0.4 0.5 --protocols strict
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from moyu_cli.allocate import allocate
from moyu_cli.architecture import discover
from moyu_cli.calibrate import calibrate, load_calibration
from moyu_cli.checkpoint import load_model
from moyu_cli.data import read_text
from moyu_cli.evaluate import perplexity
from moyu_cli.export import adapt_weights, measured_plan
from moyu_cli.modeling import apply_plan
from moyu_cli.recipe import load_recipe
from moyu_cli.sparsify import plan_from_recipe

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--recipes", nargs="*", default=["teal-uniform", "teal-block-greedy", "wina-uniform", "teal-greedy", "wina-greedy"])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5],
                        help="target sparsities: per module for uniform recipes, model-wide for allocation recipes")
    parser.add_argument("--calibration-data", default=str(SHARED / "wikitext-2" / "valid.txt"))
    parser.add_argument("--eval-data", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    parser.add_argument("--calibration", type=Path, required=True, help="calibration file; written here first when missing")
    parser.add_argument("--tokens", type=int, default=32768, help="calibration tokens when calibrating")
    parser.add_argument("--windows", type=int, default=64, help="evaluation windows of 512 tokens")
    parser.add_argument("--protocols", nargs="+", default=["strict", "half-dense"], choices=["strict", "half-dense"])
    parser.add_argument("--no-dense", action="store_true", help="skip the dense row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allocations", type=Path,
                        help="directory of allocation search results: reused when present, written otherwise")
    parser.add_argument("--search-tokens", type=int, help="override the recipes' search.tokens")
    parser.add_argument("--search-step", type=float, help="override the recipes' search.step")
    parser.add_argument("--recovery-tokens", type=int, help="override the recipes' recovery.tokens")
    parser.add_argument("--recovery-lr", type=float, help="override the recipes' recovery.lr")
    parser.add_argument("--recovery-state", type=Path,
                        help="directory where each recovery run keeps its state (recover.py): an interrupted run resumes "
                             "from it, and a finished one is kept, so running the command again evaluates without training")
    parser.add_argument("--json", type=Path, help="also write all results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Progress of the searches and of recovery fine-tuning, on stderr.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("moyu_cli").setLevel(logging.INFO)

    if not args.calibration.exists():
        args.calibration.parent.mkdir(parents=True, exist_ok=True)
        calibrate(args.model_dir, [args.calibration_data], args.calibration, tokens=args.tokens)
    calibration = load_calibration(args.calibration)
    calibration_text = [read_text(args.calibration_data)]
    evaluation_text = [read_text(args.eval_data)]
    rows = []

    def search_or_reuse(recipe, model, tokenizer) -> tuple[dict, dict]:
        # Recovery and sequential settings do not change the search, so recipes that differ only there share it.
        settings = recipe.search.model_dump()
        key = recipe.model_copy(update={"recovery": None, "sequential": None, "name": "", "description": ""}).model_dump_json()
        key += str(args.calibration.resolve())  # one file per model and calibration
        cached = None if args.allocations is None else args.allocations / f"{recipe.allocation}-{recipe.sparsity}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"
        if cached is not None and cached.exists():
            saved = json.loads(cached.read_text())
            if saved["calibration"] == str(args.calibration.resolve()) and saved["search_settings"] == settings:
                return saved["sparsities"], saved["report"]
        sparsities, report = allocate(recipe, model, tokenizer, calibration, calibration_text)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps({"calibration": str(args.calibration.resolve()), "search_settings": settings,
                                          "sparsities": sparsities, "report": report}, indent=1))
        return sparsities, report

    def run(recipe_name: str | None, target: float | None) -> None:
        model, tokenizer = load_model(args.model_dir)
        search, recovery = None, None
        if recipe_name is not None:
            recipe = load_recipe(recipe_name).with_sparsity(target)
            overrides = {"tokens": args.search_tokens, "step": args.search_step}
            overrides = {key: value for key, value in overrides.items() if value is not None}
            recipe = recipe.model_copy(update={"search": recipe.search.model_copy(update=overrides)})
            if recipe.recovery is not None:
                overrides = {"tokens": args.recovery_tokens, "lr": args.recovery_lr}
                overrides = {key: value for key, value in overrides.items() if value is not None}
                recipe = recipe.model_copy(update={"recovery": recipe.recovery.model_copy(update=overrides)})
            sparsities = None
            if recipe.allocation != "uniform":
                sparsities, search = search_or_reuse(recipe, model, tokenizer)
            layout = discover(model)
            plan = plan_from_recipe(recipe, layout, calibration, sparsities)
            plan, _ = measured_plan(recipe, model, tokenizer, layout, calibration, plan)
            state = None
            if args.recovery_state is not None and recipe.recovery is not None:
                state = args.recovery_state / f"{Path(recipe_name).stem}-{target}.safetensors"
            plan, _, recovery, _ = adapt_weights(recipe, model, tokenizer, layout, calibration, plan, resume_path=state)
            if recovery is not None:
                print(json.dumps({"recipe": recipe_name, "target": target, "recovery": recovery}), flush=True)
            apply_plan(model, plan, backend="torch")
        dense_result = None
        for protocol in args.protocols:
            started = time.perf_counter()
            if recipe_name is None and dense_result is not None:
                result = dense_result  # no sparse module: every protocol gives the same figure
            else:
                result = perplexity(model, tokenizer, evaluation_text, max_windows=args.windows, protocol=protocol)
            dense_result = result if recipe_name is None else None
            values = list(result.module_sparsity.values()) or [0.0]
            rows.append({
                "recipe": recipe_name or "dense", "target": target, "protocol": protocol,
                "perplexity": result.perplexity, "model_sparsity": result.model_sparsity, "search": search, "recovery": recovery,
                "module_sparsity": result.module_sparsity,
                "module_mean": sum(values) / len(values), "module_min": min(values), "module_max": max(values),
                "seconds": round(time.perf_counter() - started, 1),
            })
            print(json.dumps(rows[-1]), flush=True)

    if not args.no_dense:
        run(None, None)
    for target in args.sparsities:
        for recipe_name in args.recipes:
            run(recipe_name, target)

    print(f"\n{args.model_dir.name}: calibrated on {calibration.metadata['tokens']} tokens of "
          f"{Path(args.calibration_data).name}, evaluated on {args.windows} windows of 512 of {Path(args.eval_data).name}, "
          f"{args.threads} threads\n")
    print("| recipe | target | protocol | perplexity | realized model-wide sparsity | per-module realized: mean (min-max) "
          "| allocation search | recovery |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        target = "-" if row["target"] is None else f"{row['target']:.0%}"
        sparsity = "-" if row["target"] is None else f"{row['model_sparsity']:.1%}"
        spread = "-" if row["target"] is None else f"{row['module_mean']:.1%} ({row['module_min']:.1%}-{row['module_max']:.1%})"
        search = row["search"]
        cost = "-" if search is None else (f"{search['layer_forwards']} layer forwards on {search['search_tokens']} tokens, "
                                           f"{search['seconds'] / 60:.1f} min")
        recovery = row["recovery"]
        tuned = "-" if recovery is None else f"{recovery['tokens']} tokens, {recovery['seconds'] / 60:.1f} min"
        print(f"| {row['recipe']} | {target} | {row['protocol']} | {row['perplexity']:.2f} | {sparsity} | {spread} | {cost} | {tuned} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
