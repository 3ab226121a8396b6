"""Turn a recipe and calibration statistics into a per-module sparsity plan (thresholds).

Pure planning: no file I/O and no model forward passes. The plan is applied to a model by
`modeling.apply_plan` and stored in an export by `export.py`.
"""

from __future__ import annotations

import torch

from .architecture import DecoderLayout, match_targets
from .calibrate import Calibration
from .errors import RecipeError
from .modeling import ModulePlan
from .observers import histogram_quantile
from .recipe import GatedMlpModifier, MagnitudeModifier, Recipe


def _uniform(value: float, channels: int) -> torch.Tensor:
    return torch.full((channels,), value, dtype=torch.float32)


def plan_from_recipe(recipe: Recipe, layout: DecoderLayout, calibration: Calibration) -> dict[str, ModulePlan]:
    """Compute the threshold of every module the recipe targets.

    Each threshold is the quantile of the module's calibrated |x| (or |act(gate)|) histogram at
    the modifier's target sparsity, so on the calibration text a fraction `sparsity` of entries
    falls at or under it.

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
        elif isinstance(modifier, MagnitudeModifier):
            names = match_targets(list(layout.linears), modifier.targets, modifier.ignore)
            for name in names:
                stats = calibration.statistics_for(name)
                threshold = histogram_quantile(stats.histogram, sparsity)
                plan[name] = ModulePlan("linear", _uniform(threshold, layout.linears[name].in_features), sparsity)
        if not names:
            raise RecipeError(
                f"modifier {modifier.type!r} with targets {modifier.targets} selects no module of this model; "
                "check the module names with: moyu inspect MODEL_DIR"
            )
    overlap = sorted(claimed_by_mlp & plan.keys())
    if overlap:
        raise RecipeError(
            f"module {overlap[0]} is targeted by both 'gated_mlp' and 'magnitude'; add it to the magnitude modifier's ignore list"
        )
    return plan
