"""Neuron rewiring: permuting MLP neurons preserves the function, and the export stays loadable.

CPU only, on the tiny random-weight Llama from conftest.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moyu_cli.architecture import discover
from moyu_cli.calibrate import calibrate
from moyu_cli.checkpoint import load_model
from moyu_cli.export import convert, load
from moyu_cli.modeling import ModulePlan
from moyu_cli.recipe import parse_recipe
from moyu_cli.rewire import permute_mlp, rewire


def test_permute_mlp_preserves_output(tiny_llama):
    model, _ = load_model(tiny_llama)
    mlp = discover(model).mlps["model.layers.0.mlp"]
    x = torch.randn(3, 7, mlp.gate_proj.in_features)
    with torch.no_grad():
        before = mlp(x)
    weights = {name: getattr(mlp, name).weight.clone() for name in ("gate_proj", "up_proj", "down_proj")}
    order = torch.randperm(mlp.gate_proj.out_features, generator=torch.Generator().manual_seed(0))
    permute_mlp(mlp, order)
    with torch.no_grad():
        after = mlp(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    # The weights moved exactly: row i of gate/up and column i of down are neuron order[i].
    assert torch.equal(mlp.gate_proj.weight, weights["gate_proj"][order])
    assert torch.equal(mlp.up_proj.weight, weights["up_proj"][order])
    assert torch.equal(mlp.down_proj.weight, weights["down_proj"][:, order])


def test_rewire_sorts_neurons_and_sets_core(tiny_llama):
    model, _ = load_model(tiny_llama)
    layout = discover(model)
    name = "model.layers.1.mlp"
    neurons = layout.mlps[name].down_proj.in_features
    frequency = {mlp: torch.linspace(0.0, 1.0, neurons, dtype=torch.float64) for mlp in layout.mlps}
    threshold = torch.arange(neurons, dtype=torch.float32)
    plan = {f"{name}.down_proj": ModulePlan("linear", threshold, 0.5)}
    down_before = layout.mlps[name].down_proj.weight.clone()
    new_plan, report = rewire(model, layout, plan, frequency, core_frequency=0.9)
    expected_core = int((frequency[name] >= 0.9).sum())
    assert report.core[name] == expected_core
    assert report.neurons[name] == neurons
    permuted = new_plan[f"{name}.down_proj"].threshold
    assert torch.all(permuted[:expected_core] == -1.0)
    # Decreasing frequency: the last neuron comes first, so thresholds after the core run backwards.
    assert torch.equal(permuted[expected_core:], threshold.flip(0)[expected_core:])
    assert torch.equal(layout.mlps[name].down_proj.weight, down_before.flip(1))


@pytest.fixture(scope="module")
def rewired_export(tiny_llama, text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("rewire")
    calibrate(tiny_llama, [str(text_file)], root / "tiny.calib", tokens=2048, window=128)
    recipe = parse_recipe({
        "version": 1, "name": "t", "sparsity": 0.5, "rewire": {"core_frequency": 0.8, "tokens": 512},
        "modifiers": [{"type": "magnitude", "targets": ["all"]}],
    })
    config = convert(tiny_llama, root / "tiny.calib", recipe, root / "out", eval_windows=0)
    return root / "out", config


def test_rewired_export_loads_in_plain_transformers(tiny_llama, rewired_export):
    export, _ = rewired_export
    ids = torch.randint(3, 384, (1, 40), generator=torch.Generator().manual_seed(1))
    original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    permuted = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    assert not torch.equal(permuted.model.layers[0].mlp.down_proj.weight, original.model.layers[0].mlp.down_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(permuted(ids).logits, original(ids).logits, rtol=1e-4, atol=1e-4)


def test_rewired_export_reports_core(rewired_export):
    export, config = rewired_export
    report = config["rewire"]
    assert set(report["core"]) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    model = load(export, backend="torch")
    for mlp, core in report["core"].items():
        assert 0 <= core <= report["neurons"][mlp]
        threshold = model.get_submodule(f"{mlp}.down_proj").threshold
        assert torch.all(threshold[:core] == -1.0)
        assert torch.all(threshold[core:] >= 0.0)
