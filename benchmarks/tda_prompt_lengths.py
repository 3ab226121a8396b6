"""How many MLP neurons TDA keeps for prompts of different lengths, with one threshold or one per length.

TDA (`selection: threshold`) keeps the neurons whose share of the prompt's activation energy is
above a per-layer threshold. Shares of short prompts are more uneven, so with one threshold,
measured on long calibration prompts, short prompts keep fewer neurons than the target. moyu
measures one threshold per prompt length and interpolates (tda.py). This script plans `tda-mlp`
once and runs prompts cut from the evaluation text. For each prompt length it prints the
fraction of MLP neurons kept (mean over prompts and MLPs) twice: with the threshold of the
longest calibration prompt only (moyu before per-length thresholds), and with the per-length ones.

Run (README "Limitations", docs/recipes.md):
    python -P benchmarks/tda_prompt_lengths.py models/smollm2-135m --calibration runs/smollm2-135m-wina.calib \\
        --sparsity 0.667 --lengths 6 16 48 128 256 384
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from moyu_cli.architecture import discover
from moyu_cli.calibrate import load_calibration
from moyu_cli.checkpoint import load_model
from moyu_cli.data import read_text, tokenize, uses_bos, windows
from moyu_cli.export import measured_plan
from moyu_cli.modeling import SequenceMLP, apply_plan, sparse_modules
from moyu_cli.recipe import load_recipe
from moyu_cli.sparsify import plan_from_recipe

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def kept_fraction(model, mlps: dict[str, SequenceMLP], prompts: torch.Tensor) -> float:
    """Run each row of `prompts` ([N, T]) as a prompt of its own and return the mean fraction of MLP neurons selected."""
    fractions = []
    with torch.no_grad():
        for prompt in prompts:
            # The selection needs no logits, so only the last position's are computed.
            model(input_ids=prompt[None], use_cache=False, logits_to_keep=1)
            fractions += [mlp.selected[0].numel() / mlp.neurons for mlp in mlps.values()]
    return sum(fractions) / len(fractions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--calibration", type=Path, required=True, help="calibration file of the model (moyu calibrate)")
    parser.add_argument("--recipe", default="tda-mlp")
    parser.add_argument("--sparsity", type=float, default=0.667, help="MLP target sparsity of the recipe")
    parser.add_argument("--lengths", type=int, nargs="+", default=[6, 16, 48, 128, 256, 384], help="prompt lengths to test (tokens); every prompt is the start of a window as long as the longest")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per length, each from its own window of the evaluation text")
    parser.add_argument("--eval-data", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model_dir)
    calibration = load_calibration(args.calibration)
    recipe = load_recipe(args.recipe).with_sparsity(args.sparsity)
    layout = discover(model)
    plan = plan_from_recipe(recipe, layout, calibration, None)
    plan, _ = measured_plan(recipe, model, tokenizer, layout, calibration, plan)
    apply_plan(model, plan, backend="torch")
    mlps = {name: module for name, module in sparse_modules(model).items() if isinstance(module, SequenceMLP)}
    if not mlps or next(iter(mlps.values())).prompt_lengths is None:
        raise SystemExit(f"invalid --recipe {args.recipe}: it has no TDA thresholds (sequence_mlp with selection: threshold); pass --recipe tda-mlp")
    measured = next(iter(mlps.values())).prompt_lengths
    per_length = {name: (mlp.thresholds, mlp.prompt_lengths) for name, mlp in mlps.items()}

    bos = tokenizer.bos_token_id if uses_bos(tokenizer) else None
    ids = tokenize(tokenizer, [read_text(args.eval_data)])
    batch = windows(ids, max(args.lengths) - (bos is not None), args.prompts, bos_id=bos)
    print(f"\n{args.model_dir.name}, {args.recipe} at {args.sparsity:.1%} MLP sparsity (target kept "
          f"{1 - args.sparsity:.1%}), thresholds measured at {measured[0]}-{measured[-1]} tokens; "
          f"{batch.shape[0]} prompts per length from {Path(args.eval_data).name}\n")
    print(f"| prompt tokens | kept, one threshold ({measured[-1]} tokens) | kept, per-length thresholds |")
    print("| --- | --- | --- |")
    for length in args.lengths:
        prompts = batch[:, :length]
        for name, mlp in mlps.items():
            mlp.thresholds, mlp.prompt_lengths = per_length[name][0][-1:], None
        single = kept_fraction(model, mlps, prompts)
        for name, mlp in mlps.items():
            mlp.thresholds, mlp.prompt_lengths = per_length[name]
        interpolated = kept_fraction(model, mlps, prompts)
        print(f"| {length} | {single:.1%} | {interpolated:.1%} |", flush=True)


if __name__ == "__main__":
    main()
