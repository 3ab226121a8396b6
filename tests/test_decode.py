"""The lean static-cache decoder against transformers' forward, and `moyu bench` on a tiny export.

CPU only; builds its own tiny checkpoints: `pytest tests/test_decode.py`.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import moyu_cli
from moyu_cli.bench import run_bench
from moyu_cli.calibrate import calibrate
from moyu_cli.decode import LeanDecoder
from moyu_cli.export import convert
from moyu_cli.recipe import load_recipe

from conftest import ARCHITECTURES

TOLERANCE = 1e-4  # float32, only the summation order differs from transformers' forward


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefill_and_decode_match_transformers(tiny_checkpoints, arch):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch]).eval()
    torch.manual_seed(0)
    # 100 tokens pass the tiny Gemma's sliding window of 64, so the banded mask is exercised.
    ids = torch.randint(3, 384, (1, 100))
    with torch.no_grad():
        expected = model(ids).logits[0]
    decoder = LeanDecoder(model, 128)
    errors = [float((decoder.forward(ids[:, :90]) - expected[89]).abs().max())]
    for position in range(90, 100):
        errors.append(float((decoder.forward(ids[:, position : position + 1]) - expected[position]).abs().max()))
    assert max(errors) < TOLERANCE, errors


def test_sparse_decode_matches_sparse_forward(tiny_llama, text_file, tmp_path):
    calibrate(tiny_llama, [str(text_file)], tmp_path / "c.calib", tokens=512, window=128)
    convert(tiny_llama, tmp_path / "c.calib", load_recipe("teal-uniform"), tmp_path / "out", eval_windows=0)
    model = moyu_cli.load(tmp_path / "out", backend="torch")
    ids = torch.randint(3, 384, (1, 20))
    with torch.no_grad():
        expected = model(ids).logits[0, -1]
    got = LeanDecoder(model, 32).forward(ids)
    assert float((got - expected).abs().max()) < TOLERANCE


def test_fused_projections_match_unfused(tiny_llama, text_file, tmp_path):
    calibrate(tiny_llama, [str(text_file)], tmp_path / "c.calib", tokens=512, window=128)
    convert(tiny_llama, tmp_path / "c.calib", load_recipe("teal-uniform"), tmp_path / "out", eval_windows=0)
    model = moyu_cli.load(tmp_path / "out", backend="cpu")
    fused = LeanDecoder(model, 32, fuse=True)
    assert all(layer.qkv is not None and layer.gate_up is not None for layer in fused.layers)
    plain = LeanDecoder(model, 32)
    ids = torch.randint(3, 384, (1, 6))
    assert float((fused.forward(ids) - plain.forward(ids)).abs().max()) < TOLERANCE
    for token in (7, 8, 9):
        step = torch.tensor([[token]])
        assert float((fused.forward(step) - plain.forward(step)).abs().max()) < TOLERANCE


def test_cache_overflow_is_reported(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    decoder = LeanDecoder(model, 8)
    with pytest.raises(ValueError, match="the cache holds 8"):
        decoder.forward(torch.ones(1, 9, dtype=torch.long))


def test_bench_reports_both_models(tiny_llama, text_file, tmp_path):
    calibrate(tiny_llama, [str(text_file)], tmp_path / "c.calib", tokens=512, window=128)
    convert(tiny_llama, tmp_path / "c.calib", load_recipe("teal-uniform"), tmp_path / "out", eval_windows=0)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    sparse = moyu_cli.load(tmp_path / "out", backend="torch")
    reference = moyu_cli.load(tmp_path / "out", backend="torch")
    with torch.inference_mode():
        result = run_bench(dense, sparse, torch.tensor([[5, 6, 7]]), "torch", new_tokens=4, repeats=1, reference=reference)
    assert result.dense_tokens_per_s > 0
    assert result.sparse_tokens_per_s > 0
    assert result.reference_match.startswith("all 4 tokens identical")
    assert 0.3 < result.model_sparsity < 0.7
    assert result.sparse_bytes_per_token < result.dense_bytes_per_token
    assert set(result.module_ms) >= {"q_proj", "down_proj"}
