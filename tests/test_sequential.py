"""Sequential threshold calibration: exact quantiles, realized sparsity on the windows it measured, recipe checks.

CPU only; uses the tiny random-weight checkpoints from conftest.
"""

from __future__ import annotations

import json

import pytest
import torch

from moyu_cli.architecture import discover
from moyu_cli.calibrate import calibrate, column_norms, load_calibration
from moyu_cli.checkpoint import load_model
from moyu_cli.data import read_text, tokenize, uses_bos, windows
from moyu_cli.errors import MoyuError, RecipeError
from moyu_cli.export import convert
from moyu_cli.modeling import SparseLinear, apply_plan, sparsity_control
from moyu_cli.recipe import parse_recipe
from moyu_cli.sequential import exact_threshold, sequential_thresholds
from moyu_cli.sparsify import module_scores, plan_from_recipe


def recipe(score: str = "magnitude", sparsity: float = 0.6, **extra):
    return parse_recipe({
        "version": 1, "name": "t", "sparsity": sparsity, "sequential": {"tokens": 512},
        "modifiers": [{"type": "magnitude", "targets": ["all"], "score": score}],
    } | extra)


def test_exact_threshold_skips_the_fraction():
    x = torch.randn(3, 50, 40)
    threshold, skipped = exact_threshold(x, 0.3)
    assert skipped == pytest.approx(0.3, abs=1e-3)
    assert float((x.abs() <= threshold).float().mean()) == pytest.approx(skipped)

    norms = torch.rand(40) + 0.5
    threshold, skipped = exact_threshold(x, 0.7, norms)
    assert skipped == pytest.approx(0.7, abs=1e-3)
    # Channel k's threshold is t / norms[k]: the weighted score has one threshold t.
    assert torch.allclose(threshold * norms, (threshold * norms)[0].expand(40), rtol=1e-5)
    assert float((x.abs() <= threshold).float().mean()) == pytest.approx(skipped)

    threshold, skipped = exact_threshold(torch.zeros(4, 8), 0.0)
    assert skipped == 0.0
    assert bool((torch.zeros(4, 8).abs() > threshold).all())


@pytest.fixture(scope="module")
def calibration_files(tiny_checkpoints, text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("sequential")
    for arch in ("llama", "gemma3_text"):
        calibrate(tiny_checkpoints[arch], [str(text_file)], root / f"{arch}.calib", tokens=2048, window=128)
    return {arch: root / f"{arch}.calib" for arch in ("llama", "gemma3_text")}


def prepare(checkpoint, calibration_file, text_file, score="magnitude"):
    """Load the model and return it with its layout, a plan at 60%, the module scores and four windows."""
    model, tokenizer = load_model(checkpoint)
    layout = discover(model)
    the_recipe = recipe(score)
    plan = plan_from_recipe(the_recipe, layout, load_calibration(calibration_file))
    bos = tokenizer.bos_token_id if uses_bos(tokenizer) else None
    ids = windows(tokenize(tokenizer, [read_text(str(text_file))]), 128, bos_id=bos)[:4]
    return model, layout, plan, module_scores(the_recipe, layout), ids


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("score", ["magnitude", "weighted"])
def test_sequential_hits_targets_on_windows(tiny_checkpoints, calibration_files, text_file, arch, score):
    model, layout, plan, scores, ids = prepare(tiny_checkpoints[arch], calibration_files[arch], text_file, score)
    new_plan, skipped = sequential_thresholds(model, layout, plan, scores, ids)
    assert set(skipped) == set(plan)
    assert not any(isinstance(module, SparseLinear) for module in model.modules())  # the input model is untouched
    # Run the sparse model on the very windows the thresholds were measured on: each module then
    # skips its target fraction, since every module received the same inputs then.
    apply_plan(model, new_plan, backend="torch")
    with sparsity_control(model, track=True) as modules, torch.inference_mode():
        model(input_ids=ids, use_cache=False)
        realized = {name: 1 - module.kept / module.total for name, module in modules.items()}
    for name in plan:
        assert realized[name] == pytest.approx(0.6, abs=2e-3), name
        # Equal up to float rounding of t / norms[k] at the boundary (weighted scores).
        assert skipped[name] == pytest.approx(realized[name], abs=1e-4), name
    if score == "weighted":
        name = "model.layers.1.mlp.down_proj"
        scaled = new_plan[name].threshold * column_norms(layout.linears[name].weight)
        assert torch.allclose(scaled, scaled[0].expand_as(scaled), rtol=1e-5)
    # A late module's threshold moves, and every module keeps its target sparsity.
    name = "model.layers.1.mlp.down_proj"
    assert not torch.equal(new_plan[name].threshold, plan[name].threshold)
    for kept in ("model.layers.0.self_attn.q_proj", name):
        assert new_plan[kept].target_sparsity == 0.6
        assert plan[kept].target_sparsity == 0.6


def test_sequential_rejects_nan_activation(tiny_llama, calibration_files, text_file):
    model, layout, plan, scores, ids = prepare(tiny_llama, calibration_files["llama"], text_file)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.fill_(float("nan"))
    with pytest.raises(MoyuError, match="NaN or infinite activation at the input of model.layers.0.mlp.gate_proj"):
        sequential_thresholds(model, layout, plan, scores, ids)


def test_convert_records_sequential_sparsity(tiny_llama, calibration_files, tmp_path):
    config = convert(tiny_llama, calibration_files["llama"], recipe(), tmp_path / "out", eval_windows=0)
    assert config["recipe"]["sequential"] == {"tokens": 512, "seed": 0}
    for entry in config["modules"].values():
        assert entry["calibrated_sparsity"] == pytest.approx(0.6, abs=2e-3)
    saved = json.loads((tmp_path / "out" / "moyu.json").read_text())
    assert saved["recipe"]["sequential"]["tokens"] == 512


def test_recipe_sequential_checks():
    with pytest.raises(RecipeError, match="recalibrates 'magnitude' thresholds but"):
        parse_recipe({"version": 1, "name": "t", "sparsity": 0.5, "sequential": {},
                      "modifiers": [{"type": "gated_mlp", "targets": ["mlp"]}]})
    with pytest.raises(RecipeError, match="cannot be combined"):
        recipe(rewire={"core_frequency": 0.9})
    with pytest.raises(RecipeError, match="sequential.tokens"):
        recipe(sequential={"tokens": 0})
