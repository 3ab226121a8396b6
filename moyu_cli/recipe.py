"""Recipes: versioned YAML files that say which modules to sparsify and how.

A recipe holds a list of modifiers, each one sparsity rule applied to the modules its `targets`
select (minus `ignore`). Validation is strict: unknown keys, wrong types and impossible values fail
with a message naming the key and the file. New modifier types and stages are added as new
`type` values, so existing files keep loading; `version` changes only for incompatible changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import RecipeError

RECIPE_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Modifier(_Strict):
    """Fields every modifier has: the modules it selects and an optional sparsity of its own."""

    targets: list[str] = Field(default_factory=lambda: ["all"], min_length=1)
    ignore: list[str] = Field(default_factory=list)
    sparsity: float | None = Field(default=None, ge=0.0, lt=1.0)


class MagnitudeModifier(_Modifier):
    """Zero the input entries of each target linear whose magnitude is at or under a threshold (TEAL).

    The threshold of each module is the quantile of its score at the target sparsity, read from
    the calibration histogram. `score: magnitude` scores input channel k by |x_k| (TEAL), one
    threshold per module. `score: weighted` scores it by |x_k| * ||W[:, k]||_2 (WINA), so channel k
    gets the threshold t / ||W[:, k]||_2 with t the quantile of the module's weighted score.

    Example (recipes/teal-uniform.yaml):
        - type: magnitude
          targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
    """

    type: Literal["magnitude"]
    score: Literal["magnitude", "weighted"] = "magnitude"


class GatedMlpModifier(_Modifier):
    """Threshold |act(gate_proj(x))| inside each gated MLP (CATS).

    Neurons whose activated gate is at or under the threshold are skipped: their rows of
    up_proj and their columns of down_proj are never read.

    Example (recipes/cats-mlp.yaml):
        - type: gated_mlp
          targets: [mlp]
    """

    type: Literal["gated_mlp"]


class SequenceMlpModifier(_Modifier):
    """Choose each gated MLP's neurons once per sequence from the prompt (GRIFFIN or TDA).

    The prompt runs dense, and every neuron gets its share of the prompt's activation energy
    (modeling.prompt_scores). `selection: top-k` (GRIFFIN) keeps the `1 - sparsity` fraction of
    neurons with the largest share, the same count for every sequence. `selection: threshold`
    (TDA) keeps the neurons whose share is above a per-layer threshold, measured at convert time
    as the quantile of the shares on calibration prompts (tda.py), so the count follows the
    prompt and only averages to `1 - sparsity` on calibration text. Shorter prompts give more
    uneven shares, so each layer gets one threshold per prompt length (1, 2, 4, ... tokens and
    `prompt_tokens`), interpolated in log length for the prompt at hand. Every generated token reads
    only the kept neurons' rows of gate_proj and up_proj and columns of down_proj. Needs a
    prompt: under the strict evaluation protocol (no dense positions) the first call of every
    window is its own prompt and runs dense, so use the half-dense protocol to measure it.

    Example (recipes/griffin-mlp.yaml):
        - type: sequence_mlp
          targets: [mlp]
    """

    type: Literal["sequence_mlp"]
    selection: Literal["top-k", "threshold"] = "top-k"
    # `selection: threshold` only: calibration tokens (whole windows, at least one) whose first
    # `prompt_tokens` tokens are the longest calibration prompts; null: half the calibration
    # window. Longer prompts get the threshold measured at `prompt_tokens`.
    tokens: int = Field(default=16384, ge=1)
    prompt_tokens: int | None = Field(default=None, ge=1)
    seed: int = 0  # chooses the calibration windows

    @model_validator(mode="after")
    def _prompt_tokens_need_thresholds(self) -> "SequenceMlpModifier":
        if self.selection == "top-k" and self.prompt_tokens is not None:
            raise ValueError("'prompt_tokens' sets the calibration prompts of 'selection: threshold'; add that or remove 'prompt_tokens'")
        return self


class SearchSettings(_Strict):
    """Settings of the greedy allocation searches (`allocation: block-greedy | greedy`)."""

    # Calibration tokens the layer errors are measured on, in whole calibration windows (at least one).
    tokens: int = Field(default=2048, ge=1)
    step: float = Field(default=0.1, gt=0.0, le=1.0)  # sparsity raise of one group per greedy step
    max_sparsity: float = Field(default=0.95, gt=0.0, lt=1.0)  # upper bound of any group's sparsity
    seed: int = 0  # chooses the calibration windows
    # What sets the layer budgets of `greedy`: each layer's own output error ("layer-error") or the
    # KL divergence of the model's next-token distribution with only that layer sparse ("model-kl").
    layer_budgets: Literal["layer-error", "model-kl"] = "layer-error"
    kl_points: int = Field(default=8, ge=1)  # states per layer's path measured by "model-kl"


class RewireSettings(_Strict):
    """Neuron rewiring (rewire.py): MLP neurons sorted by activation frequency, the frequent core dense."""

    core_frequency: float = Field(default=0.95, gt=0.0, le=1.0)  # neurons kept at least this often form the dense core
    tokens: int = Field(default=4096, ge=1)  # calibration tokens the frequencies are measured on
    seed: int = 0  # chooses the calibration windows


class SequentialSettings(_Strict):
    """Sequential threshold calibration (sequential.py): each threshold measured with the modules before it sparse."""

    tokens: int = Field(default=8192, ge=1)  # calibration tokens, in whole windows (at least one)
    seed: int = 0  # chooses the calibration windows


class RecoverySettings(_Strict):
    """Recovery fine-tuning (recover.py): distill the dense model into the sparse one on calibration text."""

    tokens: int = Field(default=65536, ge=1)  # calibration tokens trained on, in whole windows (one window per step)
    lr: float = Field(default=5e-5, gt=0.0, lt=1.0)  # peak AdamW learning rate
    # Autocast compute dtype, while weights stay float32. "auto" is bfloat16 on a GPU or where oneDNN
    # reports fast bfloat16 (AVX-512 or newer), float32 otherwise: on AVX2 bfloat16 measured 2x slower.
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    seed: int = 0  # chooses and orders the calibration windows
    # Added to the KL: the mean over decoder layers of each position's squared hidden-state error
    # relative to the dense model's, times this weight (0: the KL alone).
    hidden_weight: float = Field(default=0.0, ge=0.0)
    # Sparsity ramp: over the first `ramp` fraction of the steps, every magnitude threshold's
    # sparsity rises in 8 stages from `ramp_from` times its target to the target (0: no ramp).
    ramp: float = Field(default=0.0, ge=0.0, le=1.0)
    ramp_from: float = Field(default=0.5, ge=0.0, le=1.0)
    # Hold each magnitude or gated-MLP threshold's sparsity at its target while training: before
    # every step, each threshold is scaled by exp(0.5 * (target - fraction the last step skipped)).
    # The trained thresholds are exported, and a `sequential:` block is not measured again after training.
    hold_sparsity: bool = False
    # Compute the logits and the KL at this many random positions of each window (null: all).
    # It is meant for large vocabularies, where the LM head dominates a step (recover.py).
    loss_positions: int | None = Field(default=None, ge=1)
    # Compute the KL over the union of the dense model's top-k tokens at each window's positions,
    # both distributions renormalized over it (null: the whole vocabulary). Also for large
    # vocabularies; unlike loss_positions it keeps every position (recover.py).
    loss_top_k: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_threshold_schedule(self) -> "RecoverySettings":
        if self.ramp > 0 and self.hold_sparsity:
            raise ValueError("recovery 'ramp' and 'hold_sparsity' both set the thresholds while training; use one of them")
        return self


Modifier = Annotated[Union[MagnitudeModifier, GatedMlpModifier, SequenceMlpModifier], Field(discriminator="type")]


class Recipe(_Strict):
    """A validated recipe."""

    version: Literal[1]
    name: str = Field(min_length=1)
    description: str = ""
    sparsity: float = Field(ge=0.0, lt=1.0)
    prefill: Literal["sparse", "dense"] = "sparse"
    # "uniform": every targeted module at the modifier's sparsity. "block-greedy" and "greedy":
    # `sparsity` is the model-wide fraction of decoder linear weight bytes skipped, allocated by
    # the searches in allocate.py (block-greedy: the same fraction in every layer).
    allocation: Literal["uniform", "block-greedy", "greedy"] = "uniform"
    search: SearchSettings = Field(default_factory=SearchSettings)
    rewire: RewireSettings | None = None  # null: neurons keep their order and every threshold stays
    sequential: SequentialSettings | None = None  # null: thresholds from the dense model's calibration histograms
    recovery: RecoverySettings | None = None  # null: the weights stay the checkpoint's
    modifiers: list[Modifier] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_rule_per_module_kind(self) -> "Recipe":
        kinds = [m.type for m in self.modifiers]
        if len(kinds) != len(set(kinds)):
            raise ValueError(f"modifier types {kinds} repeat; list each type once and use targets/ignore to select modules")
        if self.allocation != "uniform":
            if kinds != ["magnitude"]:
                raise ValueError(f"allocation '{self.allocation}' works on one 'magnitude' modifier only, got modifiers {kinds}")
            if self.modifiers[0].sparsity is not None:
                raise ValueError(f"allocation '{self.allocation}' chooses every module's sparsity; remove the modifier's 'sparsity'")
        if self.sequential is not None:
            if "magnitude" not in kinds:
                raise ValueError(f"'sequential' recalibrates 'magnitude' thresholds but the modifiers are {kinds}; add a 'magnitude' modifier or remove 'sequential'")
            if self.rewire is not None:
                raise ValueError("'sequential' and 'rewire' cannot be combined yet; remove one of them")
        if self.rewire is not None and "sequence_mlp" in kinds:
            # A per-prompt selection gathers its neurons into contiguous matrices anyway.
            raise ValueError("'rewire' orders the neurons of thresholded MLPs, and a 'sequence_mlp' modifier gathers its own; remove 'rewire'")
        return self

    def with_sparsity(self, sparsity: float) -> "Recipe":
        """Return a copy with the recipe-level target sparsity replaced (the CLI's --sparsity)."""
        if not 0.0 <= sparsity < 1.0:
            raise RecipeError(f"sparsity {sparsity} is outside [0, 1); pass a fraction such as 0.5")
        return self.model_copy(update={"sparsity": sparsity})

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def _format_error(path: Path, error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    return f"invalid recipe {path}: key '{key}': {first['msg']}"


def parse_recipe(data: object, source: str = "<recipe>") -> Recipe:
    """Validate a recipe from already-parsed YAML data."""
    if not isinstance(data, dict):
        raise RecipeError(f"invalid recipe {source}: the top level must be a mapping, got {type(data).__name__}")
    if "version" not in data:
        raise RecipeError(f"invalid recipe {source}: key 'version' is missing; add 'version: {RECIPE_VERSION}'")
    if data["version"] != RECIPE_VERSION:
        raise RecipeError(
            f"invalid recipe {source}: key 'version' is {data['version']!r}; this moyu reads version {RECIPE_VERSION}"
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_error(Path(source), exc)) from exc


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file.

    `path` may also be the name of a shipped recipe (`teal-uniform`), looked up in `recipes/`.

    Raises:
        RecipeError: the file is missing, is not YAML, or fails validation.
    """
    file = resolve_recipe_path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"recipe {file} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {file}: {exc}") from exc
    return parse_recipe(data, str(file))


def shipped_recipes_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "recipes"


def resolve_recipe_path(path: str | Path) -> Path:
    file = Path(path)
    if file.is_file():
        return file
    shipped = shipped_recipes_dir() / f"{path}.yaml"
    if file.suffix == "" and shipped.is_file():
        return shipped
    names = sorted(p.stem for p in shipped_recipes_dir().glob("*.yaml"))
    raise RecipeError(f"recipe file not found: {path}; pass a YAML path or one of: {', '.join(names)}")
