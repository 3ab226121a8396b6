"""Quality budget: `convert --max-ppl-increase` returns a sparsity whose measured increase fits.

CPU only, on the tiny random-weight Llama from conftest.
"""

from __future__ import annotations

import pytest

from moyu_cli.budget import parse_increase
from moyu_cli.calibrate import calibrate
from moyu_cli.checkpoint import load_model
from moyu_cli.data import read_text
from moyu_cli.evaluate import perplexity
from moyu_cli.export import convert, load
from moyu_cli.recipe import load_recipe, parse_recipe


@pytest.mark.parametrize("text, value", [("5%", 0.05), ("0.05", 0.05), (" 12.5% ", 0.125)])
def test_parse_increase(text, value):
    assert parse_increase(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["five", "-5%", "0", ""])
def test_parse_increase_rejects(text):
    with pytest.raises(ValueError, match="invalid perplexity increase"):
        parse_increase(text)


@pytest.fixture(scope="module")
def budget_calibration(tiny_llama, text_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("budget") / "tiny.calib"
    calibrate(tiny_llama, [str(text_file)], path, tokens=2048, window=128)
    return path


def measured_increase(export, tiny_llama, text_file, windows: int) -> float:
    sources = [read_text(str(text_file))]
    sparse = load(export, backend="torch")
    dense, tokenizer = load_model(tiny_llama)
    sparse_ppl = perplexity(sparse, tokenizer, sources, window=128, max_windows=windows).perplexity
    dense_ppl = perplexity(dense, tokenizer, sources, window=128, max_windows=windows).perplexity
    return sparse_ppl / dense_ppl - 1.0


@pytest.mark.parametrize("budget", [0.01, 0.02])
def test_budget_sparsity_within_budget(tiny_llama, text_file, budget_calibration, tmp_path, budget):
    export = tmp_path / "out"
    config = convert(tiny_llama, budget_calibration, load_recipe("teal-uniform"), export, eval_windows=0,
                     max_ppl_increase=budget, budget_windows=6)
    chosen = config["recipe"]["sparsity"]
    assert chosen == config["budget"]["sparsity"]
    assert 0.0 < chosen < 0.95
    assert config["budget"]["increase"] <= budget
    # Measured again from the export, on the same calibration windows.
    assert measured_increase(export, tiny_llama, text_file, windows=6) <= budget + 1e-6
    # The search brackets the result: some trial above the chosen sparsity went over budget.
    assert any(t["sparsity"] > chosen and t["increase"] > budget for t in config["budget"]["trials"])


def test_budget_with_greedy_allocation(tiny_llama, text_file, budget_calibration, tmp_path):
    recipe = parse_recipe({
        "version": 1, "name": "t", "sparsity": 0.5, "allocation": "greedy", "search": {"tokens": 256, "step": 0.25},
        "modifiers": [{"type": "magnitude", "targets": ["all"], "score": "weighted"}],
    })
    export = tmp_path / "out"
    config = convert(tiny_llama, budget_calibration, recipe, export, eval_windows=0, max_ppl_increase=0.05, budget_windows=4)
    assert config["budget"]["increase"] <= 0.05
    assert measured_increase(export, tiny_llama, text_file, windows=4) <= 0.05 + 1e-6
    assert config["allocation"]["model_sparsity"] == config["recipe"]["sparsity"]
