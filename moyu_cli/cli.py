"""The `moyu` command line: thin Typer wiring over the library functions.

Each command parses options, calls one library function and prints the result. User mistakes
raise `MoyuError` and are printed as one line with exit code 1; set MOYU_DEBUG=1 for a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from moyu_kernels import BackendUnavailable

from .errors import MoyuError, RecoveryInterrupted

app = typer.Typer(
    name="moyu",
    help="Convert dense Hugging Face LLM checkpoints into activation-sparse (MOYU) models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True)

ModelDirArg = Annotated[Path, typer.Argument(help="Checkpoint directory: config.json plus safetensors weights.")]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Path to write; must not exist unless --overwrite.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output (the input is never touched).")]
AllowPickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow loading pickle (.bin) weights, which can run code.")]
BackendOpt = Annotated[str, typer.Option("--backend", help="Kernel backend: auto, torch (reference), cpu or triton.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Compute dtype: float32, bfloat16 or float16.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch (default: torch's choice).")]


def _dtype(name: str):
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise MoyuError(f"unknown --dtype {name!r}; choose one of {', '.join(dtypes)}")
    return dtypes[name]


def _threads(count: Optional[int]) -> None:
    if count is not None:
        import torch

        torch.set_num_threads(count)


def _progress(description: str, quiet: bool):
    """Return (context, callback) for a rich progress bar, or a no-op when quiet or not a TTY.

    The bar appears at the first callback, so loading and planning before the first step show no
    empty bar. Leaving the context removes it.
    """
    if quiet or not sys.stderr.isatty():
        return contextlib.nullcontext(), None
    progress = Progress(
        TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err_console
    )
    task = progress.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        if progress.live.is_started:
            progress.update(task, completed=done, total=total)
            return
        # The rate counts from the first callback on, so a resumed run's earlier steps (and a
        # first step slowed by warm-up) do not enter the time left.
        progress.reset(task, completed=done, total=total)
        progress.start()

    @contextlib.contextmanager
    def shown():
        try:
            yield
        finally:
            progress.stop()  # a no-op when the bar never started

    return shown(), update


@app.command("import-gguf")
def import_gguf_command(
    gguf_file: Annotated[Path, typer.Argument(help="GGUF file to dequantize.")],
    output: OutputOpt,
    overwrite: OverwriteOpt = False,
) -> None:
    """Turn a GGUF file into a float32 safetensors checkpoint directory.

    Example: moyu import-gguf SmolLM2-135M-Instruct.Q4_1.gguf --output models/smollm2-135m
    """
    from .checkpoint import import_gguf

    out = import_gguf(gguf_file, output, overwrite=overwrite)
    console.print(f"wrote {out}")


@app.command()
def inspect(model_dir: ModelDirArg, allow_pickle: AllowPickleOpt = False) -> None:
    """List the decoder linear modules and gated MLPs that recipes can target.

    Example: moyu inspect models/smollm2-135m
    """
    from .architecture import discover
    from .checkpoint import load_model

    model, _ = load_model(model_dir, allow_pickle=allow_pickle)
    layout = discover(model)
    table = Table("module", "kind", "shape (out x in)")
    for name, linear in layout.linears.items():
        table.add_row(name, "linear", f"{linear.out_features} x {linear.in_features}")
    for name in layout.mlps:
        table.add_row(name, "gated_mlp", "")
    console.print(table)
    console.print(f"{len(layout.linears)} linear modules and {len(layout.mlps)} gated MLPs under {layout.layers_path}")


@app.command()
def calibrate(
    model_dir: ModelDirArg,
    data: Annotated[list[str], typer.Option("--data", help="Text: .txt/.raw/.jsonl files, or a dataset id such as wikitext:wikitext-2-raw-v1:validation. Repeatable.")],
    output: OutputOpt,
    tokens: Annotated[int, typer.Option("--tokens", help="Token budget (default 32768 = 64 windows of 512).")] = 32768,
    window: Annotated[int, typer.Option("--window", help="Tokens per forward pass.")] = 512,
    seed: Annotated[int, typer.Option("--seed", help="Seed for drawing windows from the text.")] = 0,
    dtype: DtypeOpt = "float32",
    overwrite: OverwriteOpt = False,
    allow_pickle: AllowPickleOpt = False,
    threads: ThreadsOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Stream per-module activation statistics of real text into a calibration file.

    Example: moyu calibrate models/smollm2-135m --data wikitext-2/valid.txt --output smollm2.calib
    """
    from .calibrate import calibrate as run

    _threads(threads)
    bar, update = _progress("calibrating", quiet or as_json)
    with bar:
        metadata = run(model_dir, data, output, tokens=tokens, window=window, seed=seed, dtype=_dtype(dtype),
                       overwrite=overwrite, allow_pickle=allow_pickle, progress=update)
    if as_json:
        print(json.dumps({k: v for k, v in metadata.items() if k != "site_of"}, indent=2))
        return
    sites = len(set(metadata["site_of"].values()))
    console.print(f"wrote {output}: {metadata['tokens']} tokens, {sites} sites, {metadata['seconds']} s")


@app.command()
def convert(
    model_dir: ModelDirArg,
    calibration: Annotated[Path, typer.Option("--calibration", "-c", help="File written by moyu calibrate.")],
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Recipe YAML path, or a shipped recipe name such as teal-uniform.")],
    output: OutputOpt,
    sparsity: Annotated[Optional[float], typer.Option("--sparsity", help="Override the recipe's target sparsity (fraction, e.g. 0.5).")] = None,
    eval_data: Annotated[Optional[list[str]], typer.Option("--eval-data", help="Text to measure perplexity on at convert time (default: the calibration text, in-sample).")] = None,
    eval_windows: Annotated[int, typer.Option("--eval-windows", help="Windows evaluated at convert time; 0 skips it.")] = 8,
    max_ppl_increase: Annotated[Optional[str], typer.Option("--max-ppl-increase", help="Choose the highest sparsity whose perplexity on the calibration text is at most this much above dense, e.g. 5% (replaces --sparsity).")] = None,
    budget_windows: Annotated[int, typer.Option("--budget-windows", help="Calibration-text windows each --max-ppl-increase trial is measured on.")] = 8,
    overwrite: OverwriteOpt = False,
    allow_pickle: AllowPickleOpt = False,
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Keep the recovery fine-tuning state in OUTPUT.recovery-state.safetensors while training (saved every 10 min and on Ctrl-C) and continue from one left by an interrupted run.")] = True,
) -> None:
    """Apply a recipe to a checkpoint and export a self-describing MOYU directory.

    Example: moyu convert models/smollm2-135m -c smollm2.calib -r teal-uniform --sparsity 0.5 -o smollm2-teal50
    """
    from .export import convert as run, window_count
    from .recipe import load_recipe

    _threads(threads)
    resolved = load_recipe(recipe)
    if sparsity is not None:
        resolved = resolved.with_sparsity(sparsity)
    increase = None
    if max_ppl_increase is not None:
        from .budget import parse_increase

        try:
            increase = parse_increase(max_ppl_increase)
        except ValueError as exc:
            raise MoyuError(f"--max-ppl-increase: {exc}") from None
    # Recovery fine-tuning runs for minutes to hours, so it gets a bar with the time left.
    bar, update = _progress("recovery fine-tuning", as_json or resolved.recovery is None)
    try:
        with bar:
            config = run(model_dir, calibration, resolved, output, eval_data=eval_data, eval_windows=eval_windows,
                         overwrite=overwrite, allow_pickle=allow_pickle, max_ppl_increase=increase, budget_windows=budget_windows,
                         progress=update, resume=resume)
    except RecoveryInterrupted as exc:
        _interrupted(f"interrupted: {exc}; {output} was not written")
    except KeyboardInterrupt:
        _interrupted(f"interrupted; {output} was not written")
    if as_json:
        print(json.dumps(config, indent=2))
        return
    evaluation = config["evaluation"]
    chosen = config["recipe"]["sparsity"]
    # A budget search picks a sparsity between whole percents, so it gets one decimal.
    shown = f"{chosen:.1%}" if config.get("budget") else f"{chosen:.0%}"
    console.print(f"wrote {output}: recipe {resolved.name} at {shown}, {len(config['modules'])} sparse modules")
    if config.get("budget"):
        budget = config["budget"]
        console.print(
            f"budget {budget['max_increase']:.1%}: chose sparsity {budget['sparsity']:.1%}, perplexity {budget['perplexity']:.2f} "
            f"vs dense {budget['dense_perplexity']:.2f} (+{budget['increase']:.1%}) on {budget['windows']} windows of calibration text, "
            f"{len(budget['trials'])} trials"
        )
    recovery_settings = config["recipe"].get("recovery") or {}
    if config["recipe"].get("sequential") and not recovery_settings.get("hold_sparsity"):
        skipped = [entry["calibrated_sparsity"] for entry in config["modules"].values() if entry["calibrated_sparsity"] is not None]
        console.print(
            f"thresholds measured in forward order on {config['recipe']['sequential']['tokens']} calibration tokens: "
            f"{min(skipped):.1%}-{max(skipped):.1%} of each module's entries skipped there"
        )
    tda = [m for m in config["recipe"]["modifiers"] if m["type"] == "sequence_mlp" and m["selection"] == "threshold"]
    if tda:
        entries = [entry for entry in config["modules"].values() if entry["kind"] == "sequence_mlp"]
        lengths = entries[0]["prompt_lengths"]
        limits = [entry["thresholds"][-1] for entry in entries]
        # The calibration text may contain fewer windows than the token budget requests, hence "up to".
        prompts = window_count(tda[0]["tokens"], config["calibration"]["window"])
        console.print(
            f"prompt thresholds (TDA) measured on up to {prompts} calibration prompts at {len(lengths)} prompt lengths of "
            f"{lengths[0]} to {lengths[-1]} tokens: for a {lengths[-1]}-token prompt each MLP keeps the neurons whose share of "
            f"the prompt's activation energy is above {min(limits):.2e} to {max(limits):.2e}, depending on the MLP"
        )
    if config.get("recovery"):
        recovery = config["recovery"]
        loss_at = "" if recovery.get("loss_positions") is None else f" (KL at {recovery['loss_positions']} random positions per window)"
        if recovery.get("resumed_after"):
            loss_at += f" (resumed after step {recovery['resumed_after']})"
        if recovery.get("loss_top_k") is not None:
            loss_at += (
                f" (KL over the dense model's top-{recovery['loss_top_k']} tokens: {recovery['loss_tokens']:.0f} tokens per window "
                f"on average, {recovery['loss_mass']:.1%} of its probability)"
            )
        console.print(
            f"recovery: {recovery['steps']} steps on {recovery['tokens']} calibration tokens, {recovery['seconds'] / 60:.1f} min; "
            f"KL to the dense model {recovery['kl_first']:.3f} -> {recovery['kl_last']:.3f}{loss_at}"
        )
        # The modules `hold_sparsity` adjusts: thresholded ones with a target above zero.
        last_skipped = [
            entry["calibrated_sparsity"]
            for entry in config["modules"].values()
            if entry["kind"] != "sequence_mlp" and entry["target_sparsity"] > 0 and entry["calibrated_sparsity"] is not None
        ]
        if recovery_settings.get("hold_sparsity") and last_skipped:
            console.print(
                f"thresholds held at their targets while training: {min(last_skipped):.1%}-{max(last_skipped):.1%} "
                "of each module's entries skipped on the last training window"
            )
    if evaluation:
        console.print(
            f"perplexity {evaluation['perplexity']:.2f} on {evaluation['text']} ({evaluation['windows']} windows, "
            f"{evaluation['protocol']}), model-wide sparsity {evaluation['model_sparsity']:.1%}"
        )


@app.command("eval")
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="MOYU export or plain checkpoint directory.")],
    data: Annotated[list[str], typer.Option("--data", help="Evaluation text (.txt/.raw/.jsonl or dataset id). Repeatable.")],
    window: Annotated[int, typer.Option("--window", help="Tokens per window.")] = 512,
    windows: Annotated[int, typer.Option("--windows", help="Maximum number of windows; 0 means all.")] = 64,
    protocol: Annotated[str, typer.Option("--protocol", help="strict: every position sparsified; half-dense: first half of each window dense.")] = "strict",
    dense: Annotated[bool, typer.Option("--dense", help="Evaluate the same weights with sparsity turned off.")] = False,
    compare_dense: Annotated[bool, typer.Option("--compare-dense", help="Also evaluate with sparsity off and print both side by side.")] = False,
    backend: BackendOpt = "auto",
    per_module: Annotated[bool, typer.Option("--per-module", help="Print the realized sparsity of every module.")] = False,
    threads: ThreadsOpt = None,
    allow_pickle: AllowPickleOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure perplexity and realized sparsity per module on real text.

    Example: moyu eval smollm2-teal50 --data wikitext-2-raw/wiki.test.raw --windows 64
    """
    from .data import read_text
    from .evaluate import perplexity
    from .export import load
    from .modeling import SequenceMLP, sparse_modules, sparsity_control
    from transformers import AutoTokenizer

    _threads(threads)
    model = load(model_dir, backend=backend, allow_pickle=allow_pickle)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sources = [read_text(spec) for spec in data]
    if dense and compare_dense:
        raise MoyuError("--dense and --compare-dense exclude each other; pass one")
    runs = {"sparse": not dense} if not compare_dense else {"dense": False, "sparse": True}
    results = {}
    for label, enabled in runs.items():
        bar, update = _progress(f"evaluating ({label})", as_json)
        with bar, sparsity_control(model, enabled=enabled):
            results[label] = perplexity(model, tokenizer, sources, window=window, max_windows=windows or None,
                                        protocol=protocol, progress=update)
    err_console.print(f"kernel backend: {model.moyu_backend or 'none (dense checkpoint)'}")
    if as_json:
        payload = {label: r.to_dict() for label, r in results.items()}
        print(json.dumps(payload if compare_dense else payload["sparse"], indent=2))
        return
    if compare_dense:
        _print_comparison(results["dense"], results["sparse"], sources[0].name)
    # With --dense every module runs dense, so the summary is that of a plain checkpoint.
    _print_eval(results["sparse"], per_module, 0 if dense else len(sparse_modules(model)))
    if protocol == "strict" and any(isinstance(m, SequenceMLP) for m in sparse_modules(model).values()):
        console.print(
            "the sequence-level MLPs (sequence_mlp) ran dense, because under the strict protocol every window is its own "
            "prompt; pass --protocol half-dense to measure them"
        )


def _print_comparison(dense, sparse, text: str) -> None:
    table = Table("model", "perplexity", "ratio to dense", "model-wide sparsity", title=f"{text}, {sparse.protocol} protocol")
    table.add_row("dense", f"{dense.perplexity:.3f}", "1.000", "0.0%")
    table.add_row("sparse", f"{sparse.perplexity:.3f}", f"{sparse.perplexity / dense.perplexity:.3f}", f"{sparse.model_sparsity:.1%}")
    console.print(table)


def _print_eval(result, per_module: bool, sparse_count: int) -> None:
    console.print(
        f"perplexity {result.perplexity:.3f} ({result.protocol}: {result.windows} windows of {result.window} tokens, "
        f"{result.targets} targets, BOS {'on' if result.bos else 'off'}, {result.seconds} s)"
    )
    if not sparse_count:
        console.print("dense model: no sparse modules")
        return
    if not result.module_sparsity:
        console.print(f"realized sparsity: none of the {sparse_count} sparse modules skipped any weights on these windows")
        return
    values = list(result.module_sparsity.values())
    console.print(
        f"realized sparsity: model-wide {result.model_sparsity:.1%} of decoder linear weights skipped; "
        f"per module min {min(values):.1%}, mean {sum(values) / len(values):.1%}, max {max(values):.1%}"
    )
    if per_module:
        table = Table("module", "realized sparsity")
        for name, value in result.module_sparsity.items():
            table.add_row(name, f"{value:.1%}")
        console.print(table)


@app.command()
def generate(
    model_dir: Annotated[Path, typer.Argument(help="MOYU export or plain checkpoint directory.")],
    prompt: Annotated[str, typer.Argument(help="Prompt text.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="0 means greedy decoding.")] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the tokenizer's chat template.")] = False,
    backend: BackendOpt = "auto",
    threads: ThreadsOpt = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Generate text with the sparse model.

    Example: moyu generate smollm2-teal50 "The capital of France is"
    """
    from .generate import generate as run

    _threads(threads)
    result = run(model_dir, prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                 chat=chat, backend=backend, allow_pickle=allow_pickle)
    console.print(result.text, markup=False, highlight=False)
    selection = "" if result.prompt_kept is None else f", MLP neurons kept after the prompt {result.prompt_kept:.1%}"
    err_console.print(
        f"[{result.new_tokens} tokens in {result.seconds:.2f} s, {result.new_tokens / result.seconds:.1f} tokens/s, "
        f"backend {result.backend}, prefill {result.prefill}{selection}]"
    )


@app.command()
def bench(
    model_dir: Annotated[Path, typer.Argument(help="MOYU export directory.")],
    prompt: Annotated[str, typer.Option("--prompt", help="Prompt decoded from.")] = "The history of the Roman Empire",
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Tokens decoded per timed run.")] = 64,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs per model, alternating dense and sparse.")] = 5,
    backend: BackendOpt = "auto",
    check: Annotated[bool, typer.Option("--check/--no-check", help="Compare the sparse tokens with the torch reference backend.")] = True,
    threads: ThreadsOpt = None,
    dtype: DtypeOpt = "float32",
    allow_pickle: AllowPickleOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure greedy decoding speed, dense and sparse in the same process, and per-module times.

    Example: moyu bench smollm2-teal50 --new-tokens 64 --threads 2
    """
    import torch
    from transformers import AutoTokenizer

    from .bench import run_bench
    from .checkpoint import load_model
    from .export import load

    _threads(threads)
    dtype_value = _dtype(dtype)
    sparse = load(model_dir, backend=backend, dtype=dtype_value, allow_pickle=allow_pickle)
    if sparse.moyu_config is None:
        raise MoyuError(f"{model_dir} is a dense checkpoint; bench an export written by moyu convert")
    dense, tokenizer = load_model(model_dir, dtype=dtype_value, allow_pickle=allow_pickle)
    reference = None
    if check and sparse.moyu_backend != "torch":
        reference = load(model_dir, backend="torch", dtype=dtype_value, allow_pickle=allow_pickle)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    dense_prefill = sparse.moyu_config.get("prefill") == "dense"
    err_console.print(f"kernel backend: {sparse.moyu_backend}")
    with torch.inference_mode():
        result = run_bench(dense, sparse, ids, sparse.moyu_backend, new_tokens=new_tokens, repeats=repeats,
                           reference=reference, dense_prefill=dense_prefill)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    table = Table("model", "tokens/s", "ratio", "weight MB/token", "bound tokens/s", "of bound",
                  title=f"greedy decoding, batch 1, {result.new_tokens} tokens x {result.repeats} runs, {result.threads} threads, backend {result.backend}")
    for label, speed, size in (("dense", result.dense_tokens_per_s, result.dense_bytes_per_token),
                               ("sparse", result.sparse_tokens_per_s, result.sparse_bytes_per_token)):
        bound = result.bandwidth_gb_s * 1e9 / size
        table.add_row(label, f"{speed:.1f}", f"{speed / result.dense_tokens_per_s:.2f}", f"{size / 1e6:.0f}", f"{bound:.1f}", f"{speed / bound:.0%}")
    console.print(table)
    console.print(f"speed-up {result.ratio:.2f}x; weight-read bound {result.bound_ratio:.2f}x at {result.model_sparsity:.1%} model-wide "
                  f"sparsity; measured bandwidth {result.bandwidth_gb_s:.1f} GB/s")
    console.print(f"sparse vs torch reference: {result.reference_match}")
    modules = Table("module", "dense ms/token", "sparse ms/token", "ratio", title="time per token by projection (all layers)")
    for kind, times in result.module_ms.items():
        dense_ms, sparse_ms = times.get("dense"), times.get("sparse")
        ratio = f"{dense_ms / sparse_ms:.2f}" if dense_ms and sparse_ms else "-"
        modules.add_row(kind, f"{dense_ms:.2f}" if dense_ms else "-", f"{sparse_ms:.2f}" if sparse_ms else "-", ratio)
    console.print(modules)


_interrupt_reported = False


def _interrupted(message: str) -> None:
    """Print `message` for a Ctrl-C and exit with 130, the shell's code for it."""
    global _interrupt_reported
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)
    _interrupt_reported = True
    raise typer.Exit(130)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn user errors into one line and exit code 1."""
    logging.basicConfig(level=os.environ.get("MOYU_LOG", "WARNING").upper(), format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # moyu draws its own progress; the per-load weight bars are noise
    global _interrupt_reported
    _interrupt_reported = False  # main() runs many times in one process under the tests
    try:
        app(args=argv, prog_name="moyu")
    except (MoyuError, BackendUnavailable) as exc:
        if os.environ.get("MOYU_DEBUG") == "1":
            raise
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)
    except SystemExit as exc:
        # Typer turns a Ctrl-C into exit code 130 with no message, so commands that printed none get this one.
        if exc.code == 130 and not _interrupt_reported:
            err_console.print("interrupted; no partial output was left behind")
        raise
    except KeyboardInterrupt:  # before Typer runs the command
        err_console.print("interrupted; no partial output was left behind")
        sys.exit(130)


if __name__ == "__main__":
    main()
