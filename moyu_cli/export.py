"""Convert a checkpoint with a recipe and calibration, and load the exported MOYU directory.

Export format (format version 1), one directory:
- `config.json`, `generation_config.json`, tokenizer files: copied from the input checkpoint.
- `model.safetensors` (or the input's shards and index): the dense weights, unchanged unless the
  recipe rewires neurons (a permutation) or fine-tunes (`recovery`); plain transformers loads the
  directory as an ordinary dense model either way.
- `moyu.json`: format version, the resolved recipe, the per-module plan (kind, target sparsity,
  calibrated sparsity, threshold summary), calibration provenance and the evaluation measured at
  convert time.
- `moyu_thresholds.safetensors`: one float32 tensor per sparse module, `<module>.threshold`,
  `[K]` per input channel (or per MLP neuron for gated_mlp). For sequence_mlp, whose neurons the
  prompt chooses: empty for a top-k selection (GRIFFIN); for TDA's threshold on each neuron's
  prompt share, one value per prompt length, with the lengths (int64) in
  `<module>.prompt_lengths` (an export without them has one value for every length).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import logging
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

import moyu_kernels
from safetensors.torch import save_file

from . import __version__
from .architecture import discover
from .calibrate import load_calibration
from .checkpoint import atomic_directory, check_checkpoint, checkpoint_hash, load_model, prepare_output
from .data import read_text
from .errors import CheckpointError, MoyuError, RecipeError
from .evaluate import perplexity
from .modeling import ModulePlan, apply_plan
from .recipe import Recipe, SequenceMlpModifier, parse_recipe
from .sparsify import calibrated_sparsity, module_scores, plan_from_recipe

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MOYU_CONFIG = "moyu.json"
THRESHOLDS_FILE = "moyu_thresholds.safetensors"
COPIED_SUFFIXES = (".json", ".jinja", ".model", ".txt", ".safetensors")


def _copy_checkpoint(source: Path, target: Path) -> None:
    for file in sorted(source.iterdir()):
        if file.is_file() and file.suffix in COPIED_SUFFIXES and file.name not in (MOYU_CONFIG, THRESHOLDS_FILE):
            shutil.copy2(file, target / file.name)


def _plan_summary(plan: dict[str, ModulePlan], calibrated: dict[str, float]) -> dict:
    return {
        name: {
            "kind": entry.kind,
            "target_sparsity": entry.target_sparsity,
            "calibrated_sparsity": calibrated.get(name),
            "threshold_mean": float(entry.threshold.mean()) if entry.threshold.numel() else None,
        }
        # A sequence-level MLP has no per-channel thresholds: one per prompt length (TDA) or none (top-k).
        | ({"channels": entry.threshold.numel()} if entry.kind != "sequence_mlp" else {})
        | ({} if entry.prompt_lengths is None else {"prompt_lengths": entry.prompt_lengths.tolist(), "thresholds": entry.threshold.tolist()})
        for name, entry in plan.items()
    }


def calibration_sources(calibration, purpose: str) -> list:
    """Read the calibration text files named in `calibration`; a missing one is an error naming `purpose`."""
    files = [d["name"] for d in calibration.metadata["data"]]
    missing = [name for name in files if not Path(name).is_file()]
    if missing:
        raise MoyuError(f"{purpose} runs on the calibration text, but {missing[0]} is not found; restore it or recalibrate")
    return [read_text(name) for name in files]


def _plan_recipe(recipe: Recipe, model, tokenizer, layout, calibration, max_ppl_increase: float | None, budget_windows: int):
    """Return the recipe, its plan, the allocation and budget reports, and the fractions `measured_plan` skipped.

    With a budget, the recipe's sparsity is the one the budget search chose. The skipped fractions
    (module -> fraction of calibration entries) are empty unless the recipe measures thresholds on the model.
    """
    allocator = None
    if recipe.allocation != "uniform":
        from .allocate import RecipeAllocator

        # The search swaps sparse modules in, so it runs on its own copy of the model.
        allocator = RecipeAllocator(recipe, copy.deepcopy(model), tokenizer, calibration, calibration_sources(calibration, "the allocation search"))
    reports: dict[float, dict] = {}
    plans: dict[float, dict[str, ModulePlan]] = {}
    skipped: dict[float, dict[str, float]] = {}  # per sparsity: module -> fraction skipped by measured_plan

    def plan_for(sparsity: float) -> dict[str, ModulePlan]:
        if sparsity not in plans:
            sparsities = None
            if allocator is not None:
                sparsities, reports[sparsity] = allocator.sparsities_for(sparsity)
            plan = plan_from_recipe(recipe.with_sparsity(sparsity), layout, calibration, sparsities)
            plans[sparsity], skipped[sparsity] = measured_plan(recipe, model, tokenizer, layout, calibration, plan)
        return plans[sparsity]

    budget = None
    if max_ppl_increase is not None:
        from .budget import search_sparsity

        upper = allocator.search.max_sparsity * allocator.targeted_fraction() if allocator else 0.95
        result = search_sparsity(model, tokenizer, calibration_sources(calibration, "the perplexity budget search"), plan_for,
                                 max_ppl_increase, upper=upper, windows=budget_windows, window=calibration.metadata["window"])
        budget = result.to_dict()
        recipe = recipe.with_sparsity(result.sparsity)
    plan = plan_for(recipe.sparsity)
    return recipe, plan, reports.get(recipe.sparsity), budget, skipped.get(recipe.sparsity, {})


def _rewire(recipe: Recipe, model, tokenizer, layout, calibration, plan: dict[str, ModulePlan]):
    """Measure neuron frequencies under `plan` on calibration windows, then permute `model` in place."""
    from .rewire import neuron_frequency, rewire

    settings = recipe.rewire
    batch = _calibration_windows(calibration, tokenizer, "neuron rewiring", settings.tokens, settings.seed)
    measured = copy.deepcopy(model)
    apply_plan(measured, plan, backend="torch")
    frequencies: dict[str, torch.Tensor] = {}
    for ids in batch:
        # `layout` names the same modules in the copy; neuron_frequency looks them up by name.
        for name, value in neuron_frequency(measured, layout, ids[None]).items():
            frequencies[name] = frequencies.get(name, 0) + value / batch.shape[0]
    del measured
    plan, report = rewire(model, layout, plan, frequencies, settings.core_frequency)
    return plan, report.to_dict() | {"core_frequency": settings.core_frequency, "tokens": batch.numel()}


def window_count(tokens: int, window: int) -> int:
    """Return how many whole calibration windows a budget of `tokens` draws (at least one)."""
    return max(1, tokens // window)


def _calibration_windows(calibration, tokenizer, purpose: str, tokens: int, seed: int) -> torch.Tensor:
    """Return `[window_count(tokens, window), window]` token ids drawn at random from the calibration text."""
    from .data import tokenize, uses_bos, windows

    bos = tokenizer.bos_token_id if uses_bos(tokenizer) else None
    window = calibration.metadata["window"]
    batch = windows(tokenize(tokenizer, calibration_sources(calibration, purpose)), window, bos_id=bos)
    count = window_count(tokens, window)
    if count > batch.shape[0]:
        logger.warning("%s requested %d calibration tokens, but the calibration text has %d windows of %d, so it uses all %d tokens",
                       purpose, tokens, batch.shape[0], window, batch.numel())
    order = torch.randperm(batch.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
    return batch[order]


def measured_plan(recipe: Recipe, model, tokenizer, layout, calibration, plan: dict[str, ModulePlan], sequential: bool = True):
    """Measure on `model` the thresholds the calibration histograms cannot give.

    `sequential:` recalibrates the magnitude thresholds with the earlier modules sparse
    (sequential.py; skipped when `sequential` is False), and a `sequence_mlp` modifier with
    `selection: threshold` gets its per-layer prompt thresholds (tda.py). Returns the new plan
    and, per measured module, the fraction of calibration entries it skips (empty when nothing
    was measured).
    """
    skipped: dict[str, float] = {}
    if recipe.sequential is not None and sequential:
        from .sequential import sequential_thresholds

        settings = recipe.sequential
        batch = _calibration_windows(calibration, tokenizer, "sequential threshold calibration", settings.tokens, settings.seed)
        plan, skipped = sequential_thresholds(model, layout, plan, module_scores(recipe, layout), batch)
    modifier = next((m for m in recipe.modifiers if isinstance(m, SequenceMlpModifier) and m.selection == "threshold"), None)
    if modifier is not None:
        from .tda import prompt_thresholds

        window = calibration.metadata["window"]
        prompt = window // 2 if modifier.prompt_tokens is None else modifier.prompt_tokens
        if prompt > window:
            raise RecipeError(f"sequence_mlp prompt_tokens {prompt} is longer than the calibration window {window}; lower it or recalibrate with a longer --window")
        batch = _calibration_windows(calibration, tokenizer, "prompt threshold calibration", modifier.tokens, modifier.seed)
        names = [name for name, entry in plan.items() if entry.kind == "sequence_mlp"]
        plan, measured = prompt_thresholds(model, plan, names, batch[:, :prompt])
        skipped |= measured
    return plan, skipped


def _ramp_schedule(recipe: Recipe, student, layout, calibration, plan: dict[str, ModulePlan], steps: int, stages: int = 8):
    """Return the recovery schedule that raises every magnitude threshold's sparsity to its target (recipe.recovery.ramp).

    Stage k of `stages` sets each module's sparsity to `ramp_from + (1 - ramp_from) * k / stages`
    times its target, with the threshold read from the calibration histogram. The last stage,
    from `ramp * steps` on, restores the plan's own thresholds (sequentially measured ones
    included).
    """
    from .modeling import sparse_modules
    from .sparsify import magnitude_threshold

    settings = recipe.recovery
    scores = module_scores(recipe, layout)
    modules = {name: module for name, module in sparse_modules(student).items() if name in scores and plan[name].kind == "linear"}
    ramp_steps = round(settings.ramp * steps)
    current = None  # the stage whose thresholds are set

    def schedule(step: int) -> None:
        nonlocal current
        stage = stages if step >= ramp_steps else step * stages // ramp_steps
        if stage == current:
            return
        current = stage
        fraction = settings.ramp_from + (1 - settings.ramp_from) * stage / stages
        for name, module in modules.items():
            target = plan[name].target_sparsity
            threshold = plan[name].threshold if stage == stages else magnitude_threshold(scores[name], name, layout, calibration, target * fraction)
            module.threshold = threshold.float().contiguous()
        logger.info("recovery step %d: sparsity at %.0f%% of each target", step + 1, 100 * fraction)

    return schedule


class _HoldSparsity:
    """Recovery schedule that keeps every magnitude and gated-MLP threshold's sparsity at its target.

    Before each step it scales each module's threshold by `exp(gain * (target - skipped))`, where
    `skipped` is the fraction of the module's entries the previous step skipped (counted on the
    training window, every position). Training moves the activations, so thresholds fixed before
    training skip another fraction after it. These follow the activations, and the weights train
    with the thresholds that are exported. Modules of a group (q/k/v, gate/up) see the same
    input, so with equal thresholds they get equal updates and stay equal.
    """

    def __init__(self, student, plan: dict[str, ModulePlan], gain: float = 0.5):
        from .modeling import sparse_modules

        self.plan = plan
        self.gain = gain
        self.modules = {
            name: module for name, module in sparse_modules(student).items()
            if plan[name].kind in ("linear", "gated_mlp") and plan[name].target_sparsity > 0
        }
        self.skipped: dict[str, float] = {}  # per module, the fraction the last step skipped
        for module in self.modules.values():
            module.track = True
            module.reset_counts()

    def _read(self) -> None:
        for name, module in self.modules.items():
            if module.total:
                self.skipped[name] = 1 - module.kept / module.total
            module.reset_counts()

    def __call__(self, step: int) -> None:
        self._read()
        if step % 10 == 1 and self.skipped:
            mean = sum(self.skipped.values()) / len(self.skipped)
            logger.info("recovery step %d: the held thresholds skipped %.1f%% of their entries (module mean)", step, 100 * mean)
        for name, module in self.modules.items():
            if name in self.skipped:
                module.threshold = module.threshold * math.exp(self.gain * (self.plan[name].target_sparsity - self.skipped[name]))

    def state(self) -> dict:
        """Return what the next call reads: the fractions the last step skipped, for a resumable recovery."""
        skipped = dict(self.skipped)
        for name, module in self.modules.items():
            if module.total:
                skipped[name] = float(1 - module.kept / module.total)
        return {"skipped": skipped}

    def restore(self, state: dict) -> None:
        self.skipped = dict(state["skipped"])
        for module in self.modules.values():
            module.reset_counts()

    def finish(self) -> tuple[dict[str, ModulePlan], dict[str, float]]:
        """Stop counting; return the plan with the held thresholds and the fractions the last step skipped."""
        self._read()
        for module in self.modules.values():
            module.track = False
        plan = dict(self.plan)
        for name, module in self.modules.items():
            entry = plan[name]
            plan[name] = ModulePlan(entry.kind, module.threshold.detach().clone(), entry.target_sparsity)
        return plan, dict(self.skipped)


def _fingerprint(model, plan: dict[str, ModulePlan], batch: torch.Tensor, settings, calibration) -> str:
    """Return a SHA-256 of what a recovery run depends on: weights, calibration, plan, windows and settings.

    The compute dtype is left out: "auto" resolves per machine, and `recover` checks the saved
    state's resolved dtype itself, with its own message.
    """
    digest = hashlib.sha256(settings.model_dump_json(exclude={"dtype"}).encode())
    # The calibration's metadata (model, text, token count, seed) fixes its statistics, and a
    # ramp's thresholds come from them. The time the calibration took is left out.
    digest.update(json.dumps({k: v for k, v in calibration.metadata.items() if k != "seconds"}, sort_keys=True).encode())

    def add(tensor: torch.Tensor) -> None:
        digest.update(f"{tuple(tensor.shape)} {tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())

    add(batch)
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        add(parameter)
    for name in sorted(plan):
        entry = plan[name]
        digest.update(f"{name} {entry.kind} {entry.target_sparsity}".encode())
        add(torch.as_tensor(entry.threshold))
        if entry.prompt_lengths is not None:
            add(entry.prompt_lengths)
    return digest.hexdigest()


def _recover(
    recipe: Recipe, model, tokenizer, layout, calibration, plan: dict[str, ModulePlan], progress=None, resume_path: Path | None = None
) -> tuple[dict, dict[str, ModulePlan], dict[str, float] | None]:
    """Fine-tune `model`'s decoder weights in place so that, run sparse under `plan`, it matches its dense self.

    Returns the recovery report, the plan (with the held thresholds under `hold_sparsity`, else
    unchanged) and the fractions of the last step's entries each held threshold skipped (None
    without `hold_sparsity`). `progress` is called with (steps done, steps) after each step.
    With `resume_path`, the training state is saved there and a run interrupted earlier resumes
    from it (recover.py); the file stays for the caller to remove.
    """
    from .data import tokenize, uses_bos, windows
    from .recover import ResumeFile, recover

    settings = recipe.recovery
    sources = calibration_sources(calibration, "recovery fine-tuning")
    bos = tokenizer.bos_token_id if uses_bos(tokenizer) else None
    batch = windows(tokenize(tokenizer, sources), calibration.metadata["window"], bos_id=bos)
    steps = max(1, settings.tokens // calibration.metadata["window"])
    generator = torch.Generator().manual_seed(settings.seed)
    # Whole passes over the text in a fresh random order each, as many as the token budget needs.
    order = torch.cat([torch.randperm(batch.shape[0], generator=generator) for _ in range(math.ceil(steps / batch.shape[0]))])
    student = copy.deepcopy(model)
    apply_plan(student, plan, backend="torch")
    schedule = None
    if settings.ramp > 0:
        schedule = _ramp_schedule(recipe, student, layout, calibration, plan, steps)
    elif settings.hold_sparsity:
        schedule = _HoldSparsity(student, plan)
    batch = batch[order[:steps]]
    resume = None if resume_path is None else ResumeFile(Path(resume_path), _fingerprint(model, plan, batch, settings, calibration))
    report = recover(student, model, batch, settings.lr, settings.dtype, settings.seed,
                     skip_first=0 if bos is None else 1, hidden_weight=settings.hidden_weight, schedule=schedule,
                     progress=progress, loss_positions=settings.loss_positions,
                     loss_top_k=settings.loss_top_k, resume=resume)
    held_skipped = None
    if isinstance(schedule, _HoldSparsity):
        plan, held_skipped = schedule.finish()
    # The sparse modules keep the dense modules' parameter names, so the trained weights load back as they are.
    model.load_state_dict(student.state_dict(), strict=True)
    return report.to_dict() | {"lr": settings.lr}, plan, held_skipped


def adapt_weights(
    recipe: Recipe, model, tokenizer, layout, calibration, plan: dict[str, ModulePlan], progress=None, resume_path: Path | None = None
):
    """Apply the recipe's weight changes to `model` in place: neuron rewiring, then recovery fine-tuning.

    Returns the plan, the rewiring and recovery reports (None when not in the recipe) and the
    calibration entries skipped per recalibrated module (None when nothing was recalibrated).
    Rewiring permutes the plan. After recovery, the thresholds `measured_plan` measures on the
    model are measured again on the trained weights, sequential ones only without `hold_sparsity`.
    `progress` is called with (steps done, steps) after each recovery step; `resume_path` is
    where recovery keeps its state (see `_recover`).
    """
    rewiring, recovery, skipped = None, None, None
    if recipe.rewire is not None:
        plan, rewiring = _rewire(recipe, model, tokenizer, layout, calibration, plan)
    if recipe.recovery is not None:
        recovery, plan, held_skipped = _recover(recipe, model, tokenizer, layout, calibration, plan, progress, resume_path)
        # Training moves the activations, so thresholds measured on the model are measured again,
        # except the ones held at their targets while training.
        plan, skipped = measured_plan(recipe, model, tokenizer, layout, calibration, plan, sequential=held_skipped is None)
        skipped = (held_skipped or {}) | skipped
    return plan, rewiring, recovery, skipped or None


def convert(
    model_dir: str | Path,
    calibration_path: str | Path,
    recipe: Recipe,
    output: str | Path,
    eval_data: list[str] | None = None,
    eval_windows: int = 8,
    overwrite: bool = False,
    allow_pickle: bool = False,
    max_ppl_increase: float | None = None,
    budget_windows: int = 8,
    progress: Callable[[int, int], None] | None = None,
    resume: bool = True,
) -> dict:
    """Apply `recipe` to `model_dir` with the statistics in `calibration_path` and export to `output`.

    With `max_ppl_increase` (0.05 for 5%), the recipe's sparsity is replaced by the highest
    model-wide sparsity whose perplexity on `budget_windows` windows of the calibration text is
    at most that much above the dense model's (see budget.py). `progress` is called with
    (steps done, steps) after each recovery fine-tuning step. With `resume`, recovery keeps its
    state in `recovery_state_path(output)` while it trains, continues from a state left there
    by an interrupted run of the same conversion, and the file is removed once the export is written.

    Returns:
        The contents written to `moyu.json`.
    """
    source = check_checkpoint(model_dir, allow_pickle=allow_pickle)
    out = prepare_output(output, overwrite, [source, Path(calibration_path)])
    calibration = load_calibration(calibration_path)
    source_hash = checkpoint_hash(source)
    if calibration.metadata["model"]["hash"] != source_hash:
        raise MoyuError(
            f"calibration {calibration_path} was made on {calibration.metadata['model']['path']}, not on {source}; "
            f"recalibrate with: moyu calibrate {source} --data TEXT --output CALIB"
        )
    model, tokenizer = load_model(source, allow_pickle=allow_pickle)
    layout = discover(model)
    recipe, plan, allocation, budget, skipped = _plan_recipe(recipe, model, tokenizer, layout, calibration, max_ppl_increase, budget_windows)
    scores = module_scores(recipe, layout)
    calibrated = {
        name: calibrated_sparsity(scores.get(name, "magnitude"), name, entry, layout, calibration) for name, entry in plan.items()
    }
    resume_path = recovery_state_path(out) if resume and recipe.recovery is not None else None
    plan, rewiring, recovery, retrained_skipped = adapt_weights(recipe, model, tokenizer, layout, calibration, plan, progress, resume_path)
    calibrated.update(retrained_skipped or skipped)
    new_weights = copy.deepcopy(model) if rewiring is not None or recovery is not None else None
    apply_plan(model, plan, backend="torch")
    if eval_data:
        sources = [read_text(spec) for spec in eval_data]
        label = "evaluation text"
    else:
        sources = [read_text(d["name"]) for d in calibration.metadata["data"] if Path(d["name"]).is_file()]
        label = "calibration text (in-sample)"
    evaluation = None
    if sources and eval_windows > 0:
        # Sequence-level selection needs a prompt, and the strict protocol has none (every window
        # would run dense), so those recipes are measured with the first half of each window as the prompt.
        protocol = "half-dense" if any(entry.kind == "sequence_mlp" for entry in plan.values()) else "strict"
        result = perplexity(model, tokenizer, sources, window=calibration.metadata["window"], max_windows=eval_windows, protocol=protocol)
        evaluation = {"text": label, **result.to_dict()}
        evaluation.pop("module_sparsity")
    config = {
        "format_version": FORMAT_VERSION,
        "moyu_version": __version__,
        "source": {"path": str(source.resolve()), "hash": source_hash},
        "recipe": recipe.to_dict(),
        "prefill": recipe.prefill,
        "modules": _plan_summary(plan, calibrated),
        "calibration": {k: v for k, v in calibration.metadata.items() if k not in ("site_of", "weighted_of")}
        | {"file": str(Path(calibration_path).resolve())},
        "allocation": allocation,
        "budget": budget,
        "rewire": rewiring,
        "recovery": recovery,
        "evaluation": evaluation,
    }
    try:
        with atomic_directory(out) as staging:
            _copy_checkpoint(source, staging)
            if new_weights is not None:
                # Rewired (neurons permuted, same names and function) or fine-tuned weights are
                # written anew in place of the copied ones.
                for file in staging.glob("*.safetensors*"):
                    file.unlink()
                (staging / "model.safetensors.index.json").unlink(missing_ok=True)
                new_weights.save_pretrained(staging, safe_serialization=True)
            tensors = {f"{name}.threshold": entry.threshold for name, entry in plan.items()}
            tensors |= {f"{name}.prompt_lengths": entry.prompt_lengths for name, entry in plan.items() if entry.prompt_lengths is not None}
            save_file(tensors, staging / THRESHOLDS_FILE)
            (staging / MOYU_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
        reason = getattr(exc, "strerror", None) or exc
        raise MoyuError(f"failed to write {out}: {reason}; nothing was written. Free disk space or choose another --output") from exc
    if resume_path is not None:
        resume_path.unlink(missing_ok=True)
    return config


def recovery_state_path(output: str | Path) -> Path:
    """Return the file beside `output` where `convert` keeps the recovery state until the export is written."""
    output = Path(output).resolve()
    return output.with_name(f"{output.name}.recovery-state.safetensors")


def read_moyu_config(path: str | Path) -> dict | None:
    """Return the parsed `moyu.json` of an export, or None for a plain checkpoint directory."""
    file = Path(path) / MOYU_CONFIG
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc.msg}); re-export with moyu convert") from exc
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file} has format_version {config.get('format_version')!r}; this moyu reads {FORMAT_VERSION}")
    return config


def read_plan(path: str | Path, config: dict) -> dict[str, ModulePlan]:
    """Rebuild the per-module plan of an export from `moyu.json` and its thresholds file."""
    file = Path(path) / THRESHOLDS_FILE
    try:
        with safe_open(file, framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise CheckpointError(f"cannot read {file} ({type(exc).__name__}); re-export with moyu convert") from exc
    plan = {}
    for name, entry in config["modules"].items():
        threshold, lengths = tensors.get(f"{name}.threshold"), tensors.get(f"{name}.prompt_lengths")
        if threshold is None:
            raise CheckpointError(f"{file} has no threshold for module {name}; re-export with moyu convert")
        if bool(torch.isnan(threshold).any()):
            raise CheckpointError(f"invalid {file}: module {name} has NaN thresholds; re-export with moyu convert")
        if entry["kind"] == "sequence_mlp" and threshold.numel() > 1 and lengths is None:
            raise CheckpointError(
                f"invalid {file}: module {name} has {threshold.numel()} prompt thresholds but no {name}.prompt_lengths; "
                "re-export with moyu convert"
            )
        if lengths is not None and lengths.shape != threshold.shape:
            raise CheckpointError(
                f"invalid {file}: module {name} has {threshold.numel()} thresholds for {lengths.numel()} prompt lengths; "
                "re-export with moyu convert"
            )
        if lengths is not None and lengths.numel() and not (lengths[0] >= 1 and bool((lengths[1:] > lengths[:-1]).all())):
            raise CheckpointError(
                f"invalid {file}: the prompt lengths of module {name} are {lengths.tolist()}, not increasing from 1 or more; "
                "re-export with moyu convert"
            )
        plan[name] = ModulePlan(entry["kind"], threshold, entry["target_sparsity"], lengths)
    return plan


def load(path: str | Path, backend: str = "auto", dtype: torch.dtype = torch.float32, allow_pickle: bool = False):
    """Load a MOYU export as a sparse model (or a plain checkpoint as a dense model).

    Args:
        path: directory written by `moyu convert`, or any safetensors checkpoint directory.
        backend: kernel backend, "auto", "torch", "cpu" or "triton".

    Returns:
        The transformers model with sparse modules in place; `model.moyu_config` is the parsed `moyu.json`
        (None for a dense checkpoint) and `model.moyu_backend` the backend in use. Load the
        tokenizer with `transformers.AutoTokenizer.from_pretrained(path)`.
    """
    if backend not in moyu_kernels.BACKENDS:
        raise MoyuError(f"unknown kernel backend {backend!r}; choose one of {', '.join(moyu_kernels.BACKENDS)}")
    model, _ = load_model(path, dtype=dtype, allow_pickle=allow_pickle)
    config = read_moyu_config(path)
    model.moyu_config = config
    model.moyu_backend = None
    if config is not None:
        model.moyu_backend = apply_plan(model, read_plan(path, config), backend=backend)
    return model
