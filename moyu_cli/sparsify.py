"""Turn a recipe and calibration statistics into a per-module sparsity plan (thresholds).

Pure planning: no file I/O and no model forward passes. The plan is applied to a model by
`modeling.apply_plan` and stored in an export by `export.py`.
"""

from __future__ import annotations

import torch

from .architecture import DecoderLayout, match_targets
from .calibrate import Calibration, column_norms
from .errors import RecipeError
from .modeling import ModulePlan
from .observers import fraction_at_or_below, histogram_quantile
from .recipe import GatedMlpModifier, MagnitudeModifier, Recipe, SequenceMlpModifier


def _uniform(value: float, channels: int) -> torch.Tensor:
    return torch.full((channels,), value, dtype=torch.float32)


def magnitude_threshold(score: str, name: str, layout: DecoderLayout, calibration: Calibration, sparsity: float) -> torch.Tensor:
    """Return the per-input-channel threshold `[K]` of linear `name` at `sparsity` for a modifier score.

    "magnitude": the sparsity-quantile of the module's calibrated |x|, the same for every channel.
    "weighted": t / ||W[:, k]||_2 with t the sparsity-quantile of |x_k| * ||W[:, k]||_2, so
    |x_k| > threshold_k exactly when the weighted score exceeds t. A channel whose weight column
    is all zeros gets an infinite threshold: it is always skipped and contributes nothing anyway.
    """
    if score == "magnitude":
        threshold = histogram_quantile(calibration.statistics_for(name).histogram, sparsity)
        return _uniform(threshold, layout.linears[name].in_features)
    threshold = histogram_quantile(calibration.weighted_histogram(name), sparsity)
    norms = column_norms(layout.linears[name].weight)
    return (threshold / norms).float()


def calibrated_sparsity(score: str, name: str, entry: ModulePlan, layout: DecoderLayout, calibration: Calibration) -> float:
    """Return the fraction of calibration entries of module `name` that `entry` skips."""
    if entry.kind == "sequence_mlp":
        return entry.target_sparsity  # a fixed neuron count per sequence, whatever the text
    if entry.kind == "gated_mlp" or score == "magnitude":
        return fraction_at_or_below(calibration.statistics_for(name).histogram, float(entry.threshold[0]))
    norms = column_norms(layout.linears[name].weight)
    channel = int(torch.argmax(norms))
    return fraction_at_or_below(calibration.weighted_histogram(name), float(entry.threshold[channel] * norms[channel]))


def module_scores(recipe: Recipe, layout: DecoderLayout) -> dict[str, str]:
    """Return the score ("magnitude" or "weighted") of every module a magnitude modifier targets."""
    scores = {}
    for modifier in recipe.modifiers:
        if isinstance(modifier, MagnitudeModifier):
            for name in match_targets(list(layout.linears), modifier.targets, modifier.ignore):
                scores[name] = modifier.score
    return scores


def plan_from_recipe(
    recipe: Recipe,
    layout: DecoderLayout,
    calibration: Calibration,
    sparsities: dict[str, float] | None = None,
) -> dict[str, ModulePlan]:
    """Compute the threshold of every module the recipe targets.

    Each threshold is the quantile of the module's calibrated score histogram (|x|, the weighted
    score or |act(gate)|) at its target sparsity, so on the calibration text a fraction `sparsity`
    of entries falls at or under it. The target is the modifier's sparsity, or the recipe's,
    unless `sparsities` (module name -> sparsity, from an allocation search) sets it.

    Raises:
        RecipeError: a modifier selects no module, or two modifiers claim the same computation.
    """
    plan: dict[str, ModulePlan] = {}
    claimed_by_mlp: set[str] = set()
    for modifier in recipe.modifiers:
        sparsity = recipe.sparsity if modifier.sparsity is None else modifier.sparsity
        if isinstance(modifier, GatedMlpModifier):
            names = match_targets(list(layout.mlps), modifier.targets, modifier.ignore)
            for name in names:
                stats = calibration.statistics_for(name)
                threshold = histogram_quantile(stats.histogram, sparsity)
                plan[name] = ModulePlan("gated_mlp", _uniform(threshold, stats.abs_sum.numel()), sparsity)
                claimed_by_mlp.update(f"{name}.{child}" for child in ("gate_proj", "up_proj", "down_proj"))
        elif isinstance(modifier, SequenceMlpModifier):
            names = match_targets(list(layout.mlps), modifier.targets, modifier.ignore)
            for name in names:
                plan[name] = ModulePlan("sequence_mlp", torch.zeros(0), sparsity)
                claimed_by_mlp.update(f"{name}.{child}" for child in ("gate_proj", "up_proj", "down_proj"))
        elif isinstance(modifier, MagnitudeModifier):
            names = match_targets(list(layout.linears), modifier.targets, modifier.ignore)
            for name in names:
                target = sparsity if sparsities is None else sparsities.get(name, 0.0)
                threshold = magnitude_threshold(modifier.score, name, layout, calibration, target)
                plan[name] = ModulePlan("linear", threshold, target)
        if not names:
            raise RecipeError(
                f"modifier {modifier.type!r} with targets {modifier.targets} selects no module of this model; "
                "check the module names with: moyu inspect MODEL_DIR"
            )
    overlap = sorted(claimed_by_mlp & plan.keys())
    if overlap:
        raise RecipeError(
            f"module {overlap[0]} is targeted by both an MLP modifier and 'magnitude'; add it to the magnitude modifier's ignore list"
        )
    return plan
