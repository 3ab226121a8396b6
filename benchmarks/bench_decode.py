"""End-to-end greedy decoding speed, dense and sparse side by side in one run (the README's speed table).

For each target sparsity the script converts the checkpoint with the recipe (from an existing
calibration file), loads it with each requested backend, and runs `moyu_cli.bench.run_bench`:
both models decode with the same lean static-cache loop, alternating, after a warm-up.

Run:
    python benchmarks/bench_decode.py models/smollm2-135m --calibration runs/smollm2-135m.calib \
        --sparsities 0.5 0.7 --backends cpu torch --threads 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import moyu_cli
from moyu_cli.bench import run_bench
from moyu_cli.checkpoint import load_model
from moyu_cli.export import convert
from moyu_cli.recipe import load_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--recipe", default="teal-uniform")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5])
    parser.add_argument("--backends", nargs="+", default=["cpu", "torch"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--prompt", default="The history of the Roman Empire")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    dense, tokenizer = load_model(args.model_dir, dtype=dtype)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for sparsity in args.sparsities:
            export = Path(scratch) / f"s{sparsity}"
            recipe = load_recipe(args.recipe).with_sparsity(sparsity)
            convert(args.model_dir, args.calibration, recipe, export, eval_windows=0)
            reference = moyu_cli.load(export, backend="torch", dtype=dtype)
            for backend in args.backends:
                sparse = reference if backend == "torch" else moyu_cli.load(export, backend=backend, dtype=dtype)
                with torch.inference_mode():
                    result = run_bench(dense, sparse, ids, sparse.moyu_backend, new_tokens=args.new_tokens,
                                       repeats=args.repeats, reference=None if backend == "torch" else reference)
                row = {"model": args.model_dir.name, "dtype": str(next(dense.parameters()).dtype).removeprefix("torch."),
                       "recipe": args.recipe, "target": sparsity, **result.to_dict()}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "module_ms"}), flush=True)

    print(f"\nmachine bandwidth (torch.sum over 512 MiB): {rows[0]['bandwidth_gb_s']:.1f} GB/s, {args.threads} threads\n")
    print("| model | dtype | backend | batch | recipe | model-wide sparsity | dense tok/s | sparse tok/s | ratio | bound | of bound | tokens vs reference |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['dtype']} | {r['backend']} | 1 | {r['recipe']} {r['target']:.0%} | {r['model_sparsity']:.1%} | "
              f"{r['dense_tokens_per_s']:.1f} | {r['sparse_tokens_per_s']:.1f} | {r['ratio']:.2f}x | {r['bound_ratio']:.2f}x | "
              f"{r['ratio'] / r['bound_ratio']:.0%} | {r['reference_match']} |")
    print("\nper-projection ms per token (dense / sparse), first row:")
    for kind, times in rows[0]["module_ms"].items():
        print(f"  {kind}: {times.get('dense', float('nan')):.2f} / {times.get('sparse', float('nan')):.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
