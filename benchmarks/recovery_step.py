"""Time of one recovery fine-tuning step with the KL at every position and at a random subset of them.

A recovery step (recover.py) runs the dense teacher, the sparse student forward and backward,
and AdamW. With a large vocabulary, the LM head and the log-softmax over its logits take most of
the step, so `recovery.loss_positions` computes them at a random subset of each window's positions.
This script plans `teal-uniform` at `--sparsity` (recovery steps cost the same for every recipe
with the torch backend) and times `--steps` steps on calibration windows for each setting, in one
run, with the step time relative to all positions.

Run (docs/recipes.md, "Recovery fine-tuning"):
    python -P benchmarks/recovery_step.py models/gemma-3-270m --calibration runs/gemma-3-270m.calib \\
        --positions 128 64 --steps 4 --threads 2
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from moyu_cli.architecture import discover
from moyu_cli.calibrate import load_calibration
from moyu_cli.checkpoint import load_model
from moyu_cli.data import tokenize, uses_bos, windows
from moyu_cli.export import calibration_sources
from moyu_cli.modeling import apply_plan
from moyu_cli.recipe import load_recipe
from moyu_cli.recover import recover
from moyu_cli.sparsify import plan_from_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--calibration", type=Path, required=True, help="calibration file of the model (moyu calibrate)")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--positions", type=int, nargs="+", default=[128, 64], help="loss positions per window to time besides all of them")
    parser.add_argument("--steps", type=int, default=4, help="steps timed per setting (one window each)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model_dir)
    calibration = load_calibration(args.calibration)
    plan = plan_from_recipe(load_recipe("teal-uniform").with_sparsity(args.sparsity), discover(model), calibration)
    bos = tokenizer.bos_token_id if uses_bos(tokenizer) else None
    text = tokenize(tokenizer, calibration_sources(calibration, "the recovery benchmark"))
    batch = windows(text, calibration.metadata["window"], bos_id=bos)[: args.steps]
    skip_first = 0 if bos is None else 1

    rows = []
    for positions in [None, *args.positions]:
        student = copy.deepcopy(model)
        apply_plan(student, plan, backend="torch")
        # A tiny learning rate: the step's cost does not depend on it, and the weights barely move.
        report = recover(student, model, batch, 1e-9, args.dtype, skip_first=skip_first, loss_positions=positions)
        rows.append((positions, report.seconds / report.steps, report.dtype))
        del student

    scored = batch.shape[1] - skip_first
    print(f"\n{args.model_dir.name}: vocabulary {model.config.vocab_size:,}, windows of {batch.shape[1]} tokens, "
          f"{args.steps} steps per setting, {args.threads} threads, teal-uniform at {args.sparsity:.0%}\n")
    print("| loss positions | seconds per step | relative to all positions | dtype |")
    print("| --- | --- | --- | --- |")
    full = rows[0][1]
    for positions, seconds, dtype in rows:
        label = f"all {scored}" if positions is None else str(positions)
        print(f"| {label} | {seconds:.2f} | {seconds / full:.2f}x | {dtype} |")


if __name__ == "__main__":
    main()
