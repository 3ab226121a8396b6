"""Sparsity allocation across projections and decoder layers, weighted by the weight bytes skipped.

Model-wide sparsity is the fraction of all decoder linear weight bytes skipped, so a projection
at sparsity s saves `s * in_features * out_features * element_size` bytes. Projections that share
an input (q/k/v, gate/up) form one *group* with one sparsity; each member keeps its own threshold
at that sparsity.

Two searches, both greedy on calibration text:

- `block-greedy` (TEAL's block-wise greedy): every decoder layer gets the same byte fraction, the
  model-wide target. Inside a layer, starting from dense, each step raises the sparsity of one
  group by `step`, the group whose step costs the least block-output error per byte saved. The
  layer inputs are the dense model's.
- `greedy`: the same per-layer greedy, first run on dense inputs up to `max_sparsity` to measure how
  the error of every layer grows with the bytes it skips. The layer budgets are then chosen across
  layers by marginal error per byte until the model-wide byte target is met. Finally each layer
  is searched again up to its budget, in order, on the outputs of the already-sparsified earlier
  layers (sequential calibration). With `search.layer_budgets: model-kl` the error that sets the
  layer budgets is the KL divergence of the model's next-token distribution (dense vs. only this
  layer sparse) at `kl_points` states of each layer's path, instead of the layer's own output
  error, which underweights the late layers: an error there has fewer layers left to shrink it,
  and the first layers' errors are partly washed out by the residual stream.

Block-output error is the mean over tokens of ||y - y_dense||^2 / ||y_dense||^2, where y is the
layer's output (the residual stream) and y_dense the dense layer's output on the same input. The
per-token normalization keeps a few huge-norm tokens (attention sinks) from dominating.

The first half of this file is pure math on numbers (`greedy_path`, `allocate_layers`); the
second half runs decoder layers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .architecture import discover, find_decoder_layers, forward_with_hooks, head_logits

logger = logging.getLogger(__name__)


@dataclass
class Group:
    """Projections that share one input and one sparsity, and the weight bytes they read."""

    name: str
    modules: list[str]
    bytes: float


@dataclass
class PathPoint:
    """One state of a per-layer greedy search: the group sparsities, bytes skipped and error."""

    sparsity: dict[str, float]  # group name -> sparsity
    skipped_bytes: float
    error: float


def skipped_bytes(groups: list[Group], sparsity: dict[str, float]) -> float:
    """Return the weight bytes skipped when each group runs at `sparsity[group.name]`."""
    return sum(sparsity.get(g.name, 0.0) * g.bytes for g in groups)


def greedy_path(
    groups: list[Group],
    error_of: Callable[[dict[str, float]], float],
    target_bytes: float,
    step: float,
    max_sparsity: float,
) -> list[PathPoint]:
    """Raise group sparsities greedily until `target_bytes` are skipped; return every state visited.

    Each step raises, by `step`, the sparsity of the group whose raise costs the least error
    increase per byte saved (a raise that lowers the error wins outright). The search is lazy: a
    group's cost measured at an earlier state is kept until that group becomes the cheapest, and
    only then measured again at the current state. A raise is taken only when its cost is fresh.
    When costs only grow as other groups get sparser (diminishing returns), this takes the same
    steps as measuring every group at every step, with far fewer calls of `error_of`. The last
    raise is shortened so that the final state skips exactly `target_bytes`.

    Raises:
        ValueError: `target_bytes` exceeds what the groups can skip at `max_sparsity`.
    """
    reachable = max_sparsity * sum(g.bytes for g in groups)
    if target_bytes > reachable * (1 + 1e-9):
        raise ValueError(
            f"a byte target of {target_bytes:.0f} exceeds the {reachable:.0f} bytes these projections skip at "
            f"the maximum sparsity {max_sparsity}"
        )
    state = {g.name: 0.0 for g in groups}
    path = [PathPoint(dict(state), 0.0, error_of(state))]
    known: dict[str, tuple[float, int, PathPoint]] = {}  # group -> (cost, path length when measured, raised state)

    def measure(group: Group) -> None:
        current = path[-1]
        needed = target_bytes - current.skipped_bytes
        raise_by = min(step, max_sparsity - state[group.name], needed / group.bytes)
        candidate = dict(state)
        candidate[group.name] += raise_by
        error = error_of(candidate)
        saved = raise_by * group.bytes
        known[group.name] = ((error - current.error) / saved, len(path), PathPoint(candidate, current.skipped_bytes + saved, error))

    while path[-1].skipped_bytes < target_bytes * (1 - 1e-9):
        open_groups = [g for g in groups if g.bytes > 0 and state[g.name] < max_sparsity - 1e-12]
        for group in open_groups:
            if group.name not in known:
                measure(group)
        while True:
            cheapest = min(open_groups, key=lambda g: known[g.name][0])
            cost, measured_at, point = known[cheapest.name]
            if measured_at == len(path):
                break
            measure(cheapest)
        state = dict(point.sparsity)
        path.append(point)
        del known[cheapest.name]
    return path


def lower_convex_hull(points: list[tuple[float, float]]) -> list[int]:
    """Return the indices of the lower convex hull of (bytes, error) points sorted by bytes."""
    hull: list[int] = []
    for index, (x, y) in enumerate(points):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = points[hull[-2]], points[hull[-1]]
            # Drop the middle point when it lies on or above the segment from hull[-2] to this point.
            if (y2 - y1) * (x - x1) >= (y - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(index)
    return hull


def allocate_layers(curves: list[list[tuple[float, float]]], target_bytes: float) -> list[float]:
    """Split a model-wide byte target across layers, minimizing the summed error.

    Args:
        curves: per layer, (bytes skipped, error) points in increasing bytes, starting at (0, e0).
        target_bytes: total bytes to skip.

    Returns:
        Bytes to skip per layer, summing to `target_bytes`. Each curve is replaced by its lower
        convex hull, because on convex curves taking segments in order of increasing error per
        byte is optimal. The last segment taken is cut to meet the target exactly.

    Raises:
        ValueError: the curves together cannot reach `target_bytes`.
    """
    reachable = sum(curve[-1][0] for curve in curves)
    if target_bytes > reachable * (1 + 1e-9):
        raise ValueError(f"a byte target of {target_bytes:.0f} exceeds the {reachable:.0f} bytes the layers can skip")
    segments = []
    for layer, curve in enumerate(curves):
        hull = lower_convex_hull(curve)
        for a, b in zip(hull, hull[1:]):
            (x1, y1), (x2, y2) = curve[a], curve[b]
            segments.append(((y2 - y1) / (x2 - x1), layer, x2 - x1))
    segments.sort(key=lambda segment: (segment[0], segment[1]))
    budgets = [0.0] * len(curves)
    remaining = target_bytes
    for _, layer, width in segments:
        if remaining <= 0:
            break
        portion = min(width, remaining)
        budgets[layer] += portion
        remaining -= portion
    return budgets


# ---------------------------------------------------------------------------------------------
# Orchestration: replaying decoder layers on calibration windows.


def token_relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Return the mean over tokens of ||output - reference||^2 / ||reference||^2."""
    difference = (output - reference).float().square().sum(-1)
    scale = reference.float().square().sum(-1).clamp_min(1e-12)
    return float((difference / scale).mean())


class LayerReplay:
    """Decoder layer inputs captured from one dense forward, so layers can be rerun one at a time.

    With `all_inputs` False only the first layer's input is kept (a caller that replays the layers
    in order from there), which saves one hidden-state tensor per further layer.
    """

    def __init__(self, model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, all_inputs: bool = True):
        self.layers = layers
        self.all_inputs = all_inputs
        self.inputs: list[torch.Tensor] = []
        self.kwargs: list[dict] = []
        handles = [layer.register_forward_pre_hook(self._capture, with_kwargs=True) for layer in layers]
        forward_with_hooks(model, input_ids, handles)
        if len(self.kwargs) != len(layers):
            raise RuntimeError(f"captured {len(self.kwargs)} decoder layer calls for {len(layers)} layers")

    def _capture(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {key: value for key, value in kwargs.items() if key != "hidden_states"}
        if self.all_inputs or not self.inputs:
            self.inputs.append(hidden.detach().clone())
        self.kwargs.append(rest)

    def run(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run decoder layer `index` on `hidden` with the captured masks and position embeddings."""
        with torch.inference_mode():
            output = self.layers[index](hidden, **self.kwargs[index])
        return output[0] if isinstance(output, tuple) else output


class ModelHead:
    """The model's final norm and LM head, to turn last-layer hidden states into next-token log-probabilities."""

    def __init__(self, model: nn.Module, norm: nn.Module, chunk: int = 256):
        self.model = model
        self.norm = norm
        self.chunk = chunk

    def log_probs(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Return log-probabilities of every position of `hidden [B, T, H]`, in chunks of positions."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        chunks = []
        with torch.inference_mode():
            for start in range(0, flat.shape[0], self.chunk):
                logits = head_logits(self.model, self.norm(flat[start : start + self.chunk])).float()
                chunks.append(torch.log_softmax(logits, dim=-1))
        return chunks

    def kl(self, hidden: torch.Tensor, reference: list[torch.Tensor]) -> float:
        """Return the mean over positions of KL(reference || distribution of `hidden`)."""
        total, count = 0.0, 0
        for expected, actual in zip(reference, self.log_probs(hidden)):
            total += float((expected.exp() * (expected - actual)).sum())
            count += expected.shape[0]
        return total / count


@dataclass
class SearchCost:
    """Cost of a search: decoder layer forwards, seconds and tokens per forward."""

    layer_forwards: int = 0
    seconds: float = 0.0
    tokens: int = 0


class AllocationSearch:
    """Greedy allocation on one model with sparse modules already swapped in (torch backend).

    `set_threshold(module, sparsity)` must set the threshold of sparse module `module` for
    `sparsity` in place. The search calls it for every member of a group.
    """

    def __init__(
        self,
        replay: LayerReplay,
        layer_groups: list[list[Group]],
        set_threshold: Callable[[str, float], None],
        step: float,
        max_sparsity: float,
    ):
        self.replay = replay
        self.layer_groups = layer_groups
        self.set_threshold = set_threshold
        self.step = step
        self.max_sparsity = max_sparsity
        self.cost = SearchCost(tokens=int(replay.inputs[0].shape[0] * replay.inputs[0].shape[1]))
        self._dense_paths: list[list[PathPoint]] | None = None

    def _apply(self, layer: int, sparsity: dict[str, float]) -> None:
        for group in self.layer_groups[layer]:
            for module in group.modules:
                self.set_threshold(module, sparsity.get(group.name, 0.0))

    def _error_function(self, layer: int, hidden: torch.Tensor) -> Callable[[dict[str, float]], float]:
        self._apply(layer, {})
        reference = self.replay.run(layer, hidden)
        self.cost.layer_forwards += 1

        def error_of(sparsity: dict[str, float]) -> float:
            self._apply(layer, sparsity)
            self.cost.layer_forwards += 1
            return token_relative_error(self.replay.run(layer, hidden), reference)

        return error_of

    def _search_layer(self, layer: int, hidden: torch.Tensor, target_bytes: float) -> list[PathPoint]:
        started = time.perf_counter()
        path = greedy_path(self.layer_groups[layer], self._error_function(layer, hidden), target_bytes, self.step, self.max_sparsity)
        self.cost.seconds += time.perf_counter() - started
        return path

    def layer_bytes(self, layer: int) -> float:
        return sum(g.bytes for g in self.layer_groups[layer])

    def block_greedy(self, layer_targets: list[float]) -> list[dict[str, float]]:
        """Return per-layer group sparsities, each layer searched on dense inputs up to its byte target."""
        result = []
        for layer, target in enumerate(layer_targets):
            result.append(self._search_layer(layer, self.replay.inputs[layer], target)[-1].sparsity)
            self._apply(layer, {})
            logger.info("layer %d: %s (%d layer forwards so far)", layer, result[-1], self.cost.layer_forwards)
        return result

    def dense_paths(self, limits: list[float]) -> list[list[PathPoint]]:
        """Return every layer's greedy path on dense inputs up to `limits[layer]` bytes skipped.

        Paths are kept and reused while they reach the requested limits.
        """
        if self._dense_paths is None or any(path[-1].skipped_bytes < limit * (1 - 1e-9) for path, limit in zip(self._dense_paths, limits)):
            self._dense_paths = []
            for layer, limit in enumerate(limits):
                self._dense_paths.append(self._search_layer(layer, self.replay.inputs[layer], limit))
                self._apply(layer, {})
                logger.info("layer %d: dense-input path of %d steps", layer, len(self._dense_paths[-1]))
        return self._dense_paths

    def kl_curves(self, paths: list[list[PathPoint]], head: "ModelHead", points: int) -> list[list[tuple[float, float]]]:
        """Return, per layer, (bytes skipped, model KL) at up to `points` states of its path, the other layers dense.

        The model KL is the mean over calibration tokens of KL(dense || sparse) of the next-token
        distribution. Layer `l` is measured by rerunning layers `l..L-1` from the captured dense
        input of layer `l`, then the final norm and the LM head.
        """
        reference = head.log_probs(self.replay.run(len(paths) - 1, self.replay.inputs[-1]))
        self.cost.layer_forwards += 1
        curves = []
        started = time.perf_counter()
        for layer, path in enumerate(paths):
            # Evenly spaced in bytes along the path, always ending at its last state.
            targets = [path[-1].skipped_bytes * (i + 1) / points for i in range(points)]
            chosen = sorted({min(range(len(path)), key=lambda i: abs(path[i].skipped_bytes - t)) for t in targets} - {0})
            curve = [(0.0, 0.0)]
            for index in chosen:
                self._apply(layer, path[index].sparsity)
                hidden = self.replay.inputs[layer]
                for later in range(layer, len(paths)):
                    hidden = self.replay.run(later, hidden)
                self.cost.layer_forwards += len(paths) - layer
                curve.append((path[index].skipped_bytes, head.kl(hidden, reference)))
            self._apply(layer, {})
            curves.append(curve)
            logger.info("layer %d: model KL %s", layer, [round(kl, 4) for _, kl in curve])
        self.cost.seconds += time.perf_counter() - started
        return curves

    def greedy(
        self, target_bytes: float, limits: list[float], head: "ModelHead | None" = None, points: int = 8
    ) -> tuple[list[dict[str, float]], list[float]]:
        """Return per-layer group sparsities and byte budgets for a model-wide `target_bytes`.

        Layer budgets come from the dense-input paths, which stop at `limits[layer]` bytes, scored
        by each layer's output error, or by the model KL when `head` is given. Each layer is then
        searched again, in order, on the output of the sparsified layers before it.
        """
        paths = self.dense_paths(limits)
        if head is None:
            curves = [[(point.skipped_bytes, point.error) for point in path] for path in paths]
        else:
            curves = self.kl_curves(paths, head, points)
        budgets = allocate_layers(curves, target_bytes)
        hidden = self.replay.inputs[0]
        result = []
        for layer, budget in enumerate(budgets):
            path = self._search_layer(layer, hidden, budget)
            result.append(path[-1].sparsity)
            logger.info("layer %d, sequential: %s (%d layer forwards so far)", layer, result[-1], self.cost.layer_forwards)
            self._apply(layer, result[-1])
            hidden = self.replay.run(layer, hidden)
            self.cost.layer_forwards += 1
        for layer in range(len(budgets)):
            self._apply(layer, {})
        return result, budgets


# ---------------------------------------------------------------------------------------------
# Recipes: from a recipe with `allocation: block-greedy | greedy` to per-module sparsities.


PATH_MARGIN = 0.25  # how far above the model-wide target the dense-input paths of `greedy` go


def linear_bytes(linear: nn.Module) -> float:
    """Return the weight bytes a linear layer reads per token when dense."""
    return float(linear.weight.numel() * linear.weight.element_size())


class RecipeAllocator:
    """Runs a recipe's allocation search on a model; reusable across model-wide targets.

    The model gets sparse modules (torch backend) for the search and its original linears back
    by `close()`. The dense-input paths of `greedy` are computed once and shared by every target.
    """

    def __init__(self, recipe, model: nn.Module, tokenizer, calibration, sources):
        from .data import tokenize, uses_bos, windows
        from .modeling import apply_plan
        from .sparsify import magnitude_threshold, module_scores, plan_from_recipe

        self.recipe = recipe
        self.model = model
        self.layout = discover(model)
        self.scores = module_scores(recipe, self.layout)
        self._threshold = magnitude_threshold
        self.calibration = calibration
        self.total_bytes = sum(linear_bytes(linear) for linear in self.layout.linears.values())
        self.layer_total_bytes = [0.0] * (max(self.layout.layer_of.values()) + 1)
        for name, linear in self.layout.linears.items():
            self.layer_total_bytes[self.layout.layer_of[name]] += linear_bytes(linear)

        layer_groups: list[list[Group]] = [[] for _ in self.layer_total_bytes]
        by_site: dict[str, Group] = {}
        for name in self.scores:
            site = calibration.site_of.get(name, name)
            if site not in by_site:
                by_site[site] = Group(site, [], 0.0)
                layer_groups[self.layout.layer_of[name]].append(by_site[site])
            by_site[site].modules.append(name)
            by_site[site].bytes += linear_bytes(self.layout.linears[name])
        self.groups = by_site

        settings = recipe.search
        bos = tokenizer.bos_token_id if uses_bos(tokenizer) else None
        window = calibration.metadata.get("window", 512)
        batch = windows(tokenize(tokenizer, sources), window, bos_id=bos)
        generator = torch.Generator().manual_seed(settings.seed)
        order = torch.randperm(batch.shape[0], generator=generator)[: max(1, settings.tokens // window)]
        input_ids = batch[order]

        self._originals = {name: self.layout.linears[name] for name in self.scores}
        plan = plan_from_recipe(recipe, self.layout, calibration, sparsities={})
        apply_plan(model, plan, backend="torch")
        self._sparse = {name: model.get_submodule(name) for name in plan}
        layers_path, layers = find_decoder_layers(model)
        self._backbone_path = layers_path.rsplit(".", 1)[0]
        self._cache: dict[tuple[str, float], torch.Tensor] = {}
        self.search = AllocationSearch(LayerReplay(model, layers, input_ids), layer_groups, self._set_threshold,
                                       settings.step, settings.max_sparsity)

    def targeted_fraction(self) -> float:
        """Return the fraction of all decoder linear weight bytes that the recipe's modules read."""
        return sum(g.bytes for g in self.groups.values()) / self.total_bytes

    def _set_threshold(self, module: str, sparsity: float) -> None:
        key = (module, round(sparsity, 6))
        if key not in self._cache:
            self._cache[key] = self._threshold(self.scores[module], module, self.layout, self.calibration, sparsity)
        self._sparse[module].threshold = self._cache[key]

    def _module_sparsities(self, layer_sparsities: list[dict[str, float]]) -> dict[str, float]:
        result = {}
        for per_layer in layer_sparsities:
            for site, sparsity in per_layer.items():
                for module in self.groups[site].modules:
                    result[module] = sparsity
        return result

    def sparsities_for(self, model_sparsity: float) -> tuple[dict[str, float], dict]:
        """Return per-module sparsities skipping `model_sparsity` of all decoder linear weight bytes, and a report."""
        target = model_sparsity * self.total_bytes
        started_forwards, started_seconds = self.search.cost.layer_forwards, self.search.cost.seconds
        if self.recipe.allocation == "block-greedy":
            budgets = [model_sparsity * layer_bytes for layer_bytes in self.layer_total_bytes]
            layer_sparsities = self.search.block_greedy(budgets)
        else:
            # A layer's budget rarely exceeds the model-wide target by much, so the dense-input
            # paths stop PATH_MARGIN above it, which saves most of their cost at high sparsity.
            limit = min(1.0, model_sparsity + PATH_MARGIN)
            limits = [
                min(self.search.max_sparsity * self.search.layer_bytes(layer), limit * self.layer_total_bytes[layer])
                for layer in range(len(self.layer_total_bytes))
            ]
            head = None
            if self.recipe.search.layer_budgets == "model-kl":
                head = ModelHead(self.model, self.model.get_submodule(self._backbone_path).norm)
            layer_sparsities, budgets = self.search.greedy(target, limits, head, self.recipe.search.kl_points)
        sparsities = self._module_sparsities(layer_sparsities)
        report = {
            "allocation": self.recipe.allocation,
            "model_sparsity": model_sparsity,
            "layer_sparsity": [round(b / t, 4) for b, t in zip(budgets, self.layer_total_bytes)],
            "search_tokens": self.search.cost.tokens,
            "layer_forwards": self.search.cost.layer_forwards - started_forwards,
            "seconds": round(self.search.cost.seconds - started_seconds, 1),
        }
        return sparsities, report

    def close(self) -> None:
        """Put the original linear modules back into the model."""
        for name, linear in self._originals.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, linear)


def allocate(recipe, model: nn.Module, tokenizer, calibration, sources) -> tuple[dict[str, float], dict]:
    """Run the recipe's allocation search at its `sparsity`; returns per-module sparsities and a report."""
    allocator = RecipeAllocator(recipe, model, tokenizer, calibration, sources)
    try:
        return allocator.sparsities_for(recipe.sparsity)
    finally:
        allocator.close()
