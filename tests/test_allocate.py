"""Sparsity allocation and weight-aware scores: the greedy math, byte targets and recipe checks.

CPU only; the model tests use the tiny random-weight Llama from conftest.
"""

from __future__ import annotations

import pytest
import torch

from moyu_cli.allocate import Group, RecipeAllocator, allocate_layers, greedy_path, linear_bytes, lower_convex_hull, skipped_bytes
from moyu_cli.architecture import discover
from moyu_cli.calibrate import calibrate, column_norms, load_calibration
from moyu_cli.checkpoint import load_model
from moyu_cli.data import read_text
from moyu_cli.errors import RecipeError
from moyu_cli.modeling import apply_plan
from moyu_cli.evaluate import perplexity
from moyu_cli.recipe import parse_recipe
from moyu_cli.sparsify import calibrated_sparsity, plan_from_recipe

GROUPS = [Group("a", ["a"], 100.0), Group("b", ["b"], 300.0), Group("c", ["c"], 50.0)]
WEIGHTS = {"a": 4.0, "b": 1.0, "c": 9.0}


def quadratic_error(sparsity: dict[str, float]) -> float:
    return sum(WEIGHTS[name] * value**2 for name, value in sparsity.items())


def test_greedy_path_meets_byte_target():
    path = greedy_path(GROUPS, quadratic_error, target_bytes=180.0, step=0.1, max_sparsity=0.9)
    assert path[-1].skipped_bytes == pytest.approx(180.0)
    assert skipped_bytes(GROUPS, path[-1].sparsity) == pytest.approx(180.0)
    assert all(0.0 <= value <= 0.9 for value in path[-1].sparsity.values())


def test_greedy_path_errors_increase():
    path = greedy_path(GROUPS, quadratic_error, target_bytes=300.0, step=0.05, max_sparsity=0.95)
    errors = [point.error for point in path]
    assert errors == sorted(errors)
    assert [point.skipped_bytes for point in path] == sorted(point.skipped_bytes for point in path)


def test_greedy_path_near_optimal_on_separable_error():
    # With error sum(w_g s_g^2), the optimum equalizes d(error)/d(bytes) = 2 w_g s_g / bytes_g.
    target = 180.0
    path = greedy_path(GROUPS, quadratic_error, target_bytes=target, step=0.01, max_sparsity=0.99)
    scale = target / sum(g.bytes**2 / WEIGHTS[g.name] for g in GROUPS)
    for group in GROUPS:
        optimum = scale * group.bytes / WEIGHTS[group.name]
        assert path[-1].sparsity[group.name] == pytest.approx(optimum, abs=0.02)


def test_lazy_greedy_matches_eager_greedy():
    calls = []

    def counted(sparsity):
        calls.append(1)
        return quadratic_error(sparsity)

    lazy = greedy_path(GROUPS, counted, target_bytes=200.0, step=0.1, max_sparsity=0.9)
    # Eager reference: measure every group at every step.
    state = {g.name: 0.0 for g in GROUPS}
    done = 0.0
    while done < 200.0 - 1e-9:
        options = []
        for group in GROUPS:
            if state[group.name] >= 0.9 - 1e-12:
                continue
            raise_by = min(0.1, 0.9 - state[group.name], (200.0 - done) / group.bytes)
            candidate = dict(state, **{group.name: state[group.name] + raise_by})
            options.append(((quadratic_error(candidate) - quadratic_error(state)) / (raise_by * group.bytes), candidate, raise_by * group.bytes))
        _, state, saved = min(options, key=lambda option: option[0])
        done += saved
    assert lazy[-1].sparsity == pytest.approx(state)
    assert len(calls) < 3 * len(lazy)


def test_greedy_path_rejects_unreachable_target():
    with pytest.raises(ValueError, match="exceeds"):
        greedy_path(GROUPS, quadratic_error, target_bytes=0.95 * 450.0, step=0.1, max_sparsity=0.9)


def test_lower_convex_hull_drops_concave_point():
    assert lower_convex_hull([(0, 0), (1, 5), (2, 6)]) == [0, 2]
    assert lower_convex_hull([(0, 0), (1, 1), (2, 4)]) == [0, 1, 2]


def test_allocate_layers_meets_target_and_prefers_cheap_layer():
    cheap = [(0.0, 0.0), (10.0, 1.0), (20.0, 2.0), (30.0, 3.0)]
    costly = [(0.0, 0.0), (10.0, 5.0), (20.0, 10.0), (30.0, 15.0)]
    budgets = allocate_layers([cheap, costly], 35.0)
    assert sum(budgets) == pytest.approx(35.0)
    assert budgets == pytest.approx([30.0, 5.0])


def test_allocate_layers_rejects_unreachable_target():
    with pytest.raises(ValueError, match="exceeds"):
        allocate_layers([[(0.0, 0.0), (10.0, 1.0)]], 11.0)


def recipe(allocation: str, score: str = "magnitude", sparsity: float = 0.5):
    # "greedy-kl": greedy with layer budgets from the model KL.
    search = {"tokens": 256, "step": 0.2} | ({"layer_budgets": "model-kl", "kl_points": 3} if allocation == "greedy-kl" else {})
    return parse_recipe({
        "version": 1, "name": "t", "sparsity": sparsity, "allocation": allocation.removesuffix("-kl"),
        "search": search,
        "modifiers": [{"type": "magnitude", "targets": ["all"], "score": score}],
    })


@pytest.fixture(scope="module")
def tiny_calibration(tiny_llama, text_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("allocate") / "tiny.calib"
    calibrate(tiny_llama, [str(text_file)], path, tokens=2048, window=128)
    return load_calibration(path)


def test_calibration_has_weighted_histograms(tiny_calibration):
    assert len(tiny_calibration.weighted) == 2 * 7
    histogram = tiny_calibration.weighted["model.layers.0.self_attn.k_proj"]
    assert histogram.sum() == 2048 * 64


def test_weighted_threshold_is_score_quantile(tiny_llama, tiny_calibration):
    model, _ = load_model(tiny_llama)
    layout = discover(model)
    plan = plan_from_recipe(recipe("uniform", "weighted", 0.6), layout, tiny_calibration)
    name = "model.layers.1.self_attn.v_proj"
    scaled = plan[name].threshold * column_norms(layout.linears[name].weight)
    assert torch.allclose(scaled, scaled[0].expand_as(scaled), rtol=1e-5)
    assert calibrated_sparsity("weighted", name, plan[name], layout, tiny_calibration) == pytest.approx(0.6, abs=0.01)
    # q and k share an input but not their thresholds: their column norms differ.
    assert not torch.allclose(plan["model.layers.0.self_attn.q_proj"].threshold, plan["model.layers.0.self_attn.k_proj"].threshold)


@pytest.mark.parametrize("allocation", ["block-greedy", "greedy", "greedy-kl"])
def test_allocation_meets_model_byte_target(tiny_llama, tiny_calibration, text_file, allocation):
    model, tokenizer = load_model(tiny_llama)
    layout = discover(model)
    allocator = RecipeAllocator(recipe(allocation), model, tokenizer, tiny_calibration, [read_text(str(text_file))])
    try:
        sparsities, report = allocator.sparsities_for(0.5)
    finally:
        allocator.close()
    assert all(isinstance(module, torch.nn.Linear) for module in discover(model).linears.values())
    total = sum(linear_bytes(linear) for linear in layout.linears.values())
    skipped = sum(sparsities[name] * linear_bytes(layout.linears[name]) for name in sparsities)
    assert skipped / total == pytest.approx(0.5, abs=1e-6)
    # q/k/v share one input and so one sparsity.
    assert sparsities["model.layers.0.self_attn.q_proj"] == sparsities["model.layers.0.self_attn.k_proj"]
    if allocation == "block-greedy":
        assert report["layer_sparsity"] == pytest.approx([0.5, 0.5])
    assert sum(report["layer_sparsity"]) / 2 == pytest.approx(0.5, abs=1e-4)
    assert report["layer_forwards"] > 0

    # Realized on calibration text, the model-wide sparsity lands near the target.
    apply_plan(model, plan_from_recipe(recipe(allocation), layout, tiny_calibration, sparsities), backend="torch")
    result = perplexity(model, tokenizer, [read_text(str(text_file))], window=128, max_windows=8)
    assert result.model_sparsity == pytest.approx(0.5, abs=0.05)


def test_model_kl_curves_grow(tiny_llama, tiny_calibration, text_file):
    from moyu_cli.allocate import ModelHead

    model, tokenizer = load_model(tiny_llama)
    allocator = RecipeAllocator(recipe("greedy-kl"), model, tokenizer, tiny_calibration, [read_text(str(text_file))])
    try:
        search = allocator.search
        paths = search.dense_paths([0.9 * search.layer_bytes(layer) for layer in range(2)])
        curves = search.kl_curves(paths, ModelHead(model, model.model.norm), points=3)
    finally:
        allocator.close()
    for curve, path in zip(curves, paths):
        assert curve[0] == (0.0, 0.0)
        assert 2 <= len(curve) <= 4
        assert curve[-1][0] == pytest.approx(path[-1].skipped_bytes)
        # The last state (90% of the layer's bytes) costs more KL than the first measured one.
        assert curve[1][1] > 0
        assert curve[-1][1] > curve[1][1]


def test_recipe_allocation_needs_magnitude_only():
    data = {
        "version": 1, "name": "t", "sparsity": 0.5, "allocation": "greedy",
        "modifiers": [{"type": "gated_mlp", "targets": ["mlp"]}],
    }
    with pytest.raises(RecipeError, match="works on one 'magnitude' modifier only"):
        parse_recipe(data)


def test_recipe_allocation_rejects_modifier_sparsity():
    data = {
        "version": 1, "name": "t", "sparsity": 0.5, "allocation": "block-greedy",
        "modifiers": [{"type": "magnitude", "sparsity": 0.3}],
    }
    with pytest.raises(RecipeError, match="remove the modifier's 'sparsity'"):
        parse_recipe(data)


def test_recipe_rejects_unknown_score():
    data = {"version": 1, "name": "t", "sparsity": 0.5, "modifiers": [{"type": "magnitude", "score": "wina"}]}
    with pytest.raises(RecipeError, match="modifiers.0.magnitude.score"):
        parse_recipe(data)


def test_calibration_without_weighted_loads(tiny_llama, tiny_calibration, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from moyu_cli.errors import CalibrationError

    # A file as written before weight-aware scores: no weighted histograms, no "weighted_of".
    path = tmp_path / "old.calib"
    source = tmp_path / "new.calib"
    calibrate(tiny_llama, [tiny_calibration.metadata["data"][0]["name"]], source, tokens=256, window=128)
    with safe_open(source, framework="pt") as handle:
        metadata = json.loads(handle.metadata()["moyu"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys() if ".weighted." not in key}
    del metadata["weighted_of"]
    save_file(tensors, path, metadata={"moyu": json.dumps(metadata)})

    old = load_calibration(path)
    assert old.weighted == {}
    assert len(old.sites) == 2 * 5
    model, _ = load_model(tiny_llama)
    layout = discover(model)
    assert plan_from_recipe(recipe("uniform", "magnitude"), layout, old)
    with pytest.raises(CalibrationError, match="recalibrate"):
        plan_from_recipe(recipe("uniform", "weighted"), layout, old)
