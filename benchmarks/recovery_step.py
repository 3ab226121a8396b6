"""Time of one recovery fine-tuning step with the full KL, the KL at a random subset of positions, and over the top-k tokens.

A recovery step (recover.py) runs the dense teacher, the sparse student forward and backward,
and AdamW. With a large vocabulary, the LM head and the log-softmax over its logits take much of
the step, so `recovery.loss_positions` computes them at a random subset of each window's
positions, and `recovery.loss_top_k` over the union of the dense model's top-k tokens.
This script plans `teal-uniform` at `--sparsity` (recovery steps cost the same for every recipe
with the torch backend) and times `--steps` steps on calibration windows for each setting, in one
run, with the step time relative to all positions. With `--top-k`, a last setting runs the
windows twice and times the second pass, where recovery reuses the dense model's outputs from the
first, as a run of more tokens than the calibration text holds does (recover.py).

Run (docs/recipes.md, "Recovery fine-tuning"):
    python -P benchmarks/recovery_step.py models/gemma-3-270m --calibration runs/gemma-3-270m.calib \\
        --positions 128 64 --top-k 64 --steps 4 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import time
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
    parser.add_argument("--positions", type=int, nargs="*", default=[128, 64], help="loss positions per window to time besides all of them")
    parser.add_argument("--top-k", type=int, nargs="*", default=[64], help="loss_top_k values to time")
    parser.add_argument("--steps", type=int, default=4, help="steps per setting (one window each), the first not timed")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: the first step of each setting is not timed, so give at least 2")
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model_dir)
    calibration = load_calibration(args.calibration)
    plan = plan_from_recipe(load_recipe("teal-uniform").with_sparsity(args.sparsity), discover(model), calibration)
    bos = tokenizer.bos_token_id if uses_bos(tokenizer) else None
    text = tokenize(tokenizer, calibration_sources(calibration, "the recovery benchmark"))
    batch = windows(text, calibration.metadata["window"], bos_id=bos)[: args.steps]
    skip_first = 0 if bos is None else 1

    rows = []
    settings = [dict(), *(dict(loss_positions=p) for p in args.positions), *(dict(loss_top_k=k) for k in args.top_k)]
    # With loss_top_k, also the same windows twice: the second pass reuses the dense model's outputs.
    settings += [dict(loss_top_k=k, repeated=True) for k in args.top_k]
    for setting in settings:
        student = copy.deepcopy(model)
        apply_plan(student, plan, backend="torch")
        repeated = setting.pop("repeated", False)
        ends = []
        # A tiny learning rate: the step's cost does not depend on it, and the weights barely move.
        report = recover(student, model, torch.cat([batch, batch]) if repeated else batch, 1e-9, args.dtype,
                         skip_first=skip_first, progress=lambda done, total: ends.append(time.perf_counter()), **setting)
        # The first step also warms up the allocator and (loss_top_k) checks the LM head: time the others.
        # Repeated windows: time the second pass only.
        timed = ends[args.steps - 1 :] if repeated else ends
        rows.append((setting | {"repeated": repeated}, report, (timed[-1] - timed[0]) / (len(timed) - 1)))
        del student

    scored = batch.shape[1] - skip_first
    print(f"\n{args.model_dir.name}: vocabulary {model.config.vocab_size:,}, windows of {batch.shape[1]} tokens, "
          f"{args.steps} steps per setting, {args.threads} threads, teal-uniform at {args.sparsity:.0%}\n")
    print("| loss | seconds per step | relative to the full KL | KL, first step | dtype |")
    print("| --- | --- | --- | --- | --- |")
    full = rows[0][2]
    for setting, report, seconds in rows:
        if "loss_positions" in setting:
            label = f"{setting['loss_positions']} random positions"
        elif setting.get("repeated"):
            label = f"top-{setting['loss_top_k']} tokens, windows seen before ({report.teacher_reused} steps reused the dense outputs)"
        elif "loss_top_k" in setting:
            label = (f"top-{setting['loss_top_k']} tokens ({report.loss_tokens:.0f} per window, "
                     f"{report.loss_mass:.1%} of the dense probability)")
        else:
            label = f"full: all {scored} positions, whole vocabulary"
        print(f"| {label} | {seconds:.2f} | {seconds / full:.2f}x | {report.kl_first:.4f} | {report.dtype} |")

if __name__ == "__main__":
    main()
