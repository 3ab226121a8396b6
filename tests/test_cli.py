"""The `moyu` command line: help, one-line errors with exit code 1, and no partial output.

CPU only; builds its own tiny checkpoints: `pytest tests/test_cli.py`.
"""

import json
import shutil

import pytest
import torch

from moyu_cli.cli import main

COMMANDS = ["import-gguf", "inspect", "calibrate", "convert", "eval", "generate", "bench"]


def run(capsys, *argv):
    """Run the CLI; return (exit code, stdout, stderr)."""
    try:
        main(list(map(str, argv)))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert "Example:" in out


@pytest.fixture(scope="module")
def calib(tiny_llama, text_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.calib"
    from moyu_cli.calibrate import calibrate

    calibrate(tiny_llama, [str(text_file)], path, tokens=1024, window=128)
    return path


def test_calibrate_convert_eval_generate(capsys, tiny_llama, text_file, tmp_path):
    calib = tmp_path / "c.calib"
    code, out, err = run(capsys, "calibrate", tiny_llama, "--data", text_file, "--output", calib, "--tokens", 512, "--window", 128, "-q")
    assert code == 0, err
    assert "512 tokens" in out
    out_dir = tmp_path / "sparse"
    code, out, err = run(capsys, "convert", tiny_llama, "-c", calib, "-r", "teal-uniform", "--sparsity", 0.4, "-o", out_dir, "--eval-windows", 1)
    assert code == 0, err
    assert "at 40%" in out
    code, out, err = run(capsys, "eval", out_dir, "--data", text_file, "--window", 128, "--windows", 2, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["windows"] == 2
    assert len(result["module_sparsity"]) == 14
    code, out, err = run(capsys, "generate", out_dir, "The", "--max-new-tokens", 3, "--backend", "torch")
    assert code == 0, err
    assert out.startswith("The")


def test_missing_checkpoint(capsys, text_file, tmp_path):
    code, _, err = run(capsys, "calibrate", tmp_path / "nope", "--data", text_file, "--output", tmp_path / "c.calib")
    assert_one_line_error(code, err, "checkpoint directory not found", "nope")
    assert not (tmp_path / "c.calib").exists()


def test_corrupt_checkpoint(capsys, tiny_llama, text_file, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run(capsys, "calibrate", broken, "--data", text_file, "--output", tmp_path / "c.calib")
    assert_one_line_error(code, err, "model.safetensors is corrupt or truncated")


def test_pickle_checkpoint_rejected(capsys, tiny_llama, text_file, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_llama / "config.json", pickled)
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    code, _, err = run(capsys, "calibrate", pickled, "--data", text_file, "--output", tmp_path / "c.calib")
    assert_one_line_error(code, err, "pytorch_model.bin", "--allow-pickle")


def test_empty_text(capsys, tiny_llama, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\r\n  \n")
    code, _, err = run(capsys, "calibrate", tiny_llama, "--data", empty, "--output", tmp_path / "c.calib")
    assert_one_line_error(code, err, "holds no text", "empty.txt")
    assert not (tmp_path / "c.calib").exists()


def test_unreadable_text(capsys, tiny_llama, tmp_path):
    binary = tmp_path / "bytes.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    code, _, err = run(capsys, "calibrate", tiny_llama, "--data", binary, "--output", tmp_path / "c.calib")
    assert_one_line_error(code, err, "not UTF-8")


def test_bad_recipe(capsys, tiny_llama, calib, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("version: 1\nname: x\nsparsity: 0.5\nmodifiers: [{type: magnitude, targetz: [q]}]\n")
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, "convert", tiny_llama, "-c", calib, "-r", recipe, "-o", out_dir)
    assert_one_line_error(code, err, str(recipe), "modifiers.0.magnitude.targetz")
    assert not out_dir.exists()


def test_unparsable_recipe(capsys, tiny_llama, calib, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("version: [1\n")
    code, _, err = run(capsys, "convert", tiny_llama, "-c", calib, "-r", recipe, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "not valid YAML")


def test_existing_output_needs_overwrite(capsys, tiny_llama, calib, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "convert", tiny_llama, "-c", calib, "-r", "teal-uniform", "-o", out_dir)
    assert_one_line_error(code, err, "exists", "--overwrite")
    assert (out_dir / "keep.txt").read_text() == "mine"
    code, _, err = run(capsys, "convert", tiny_llama, "-c", calib, "-r", "teal-uniform", "-o", out_dir, "--overwrite", "--eval-windows", 0)
    assert code == 0, err
    assert (out_dir / "moyu.json").is_file()
    assert not (out_dir / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_output_may_not_be_the_input(capsys, tiny_llama, calib, tmp_path):
    before = sorted(p.name for p in tiny_llama.iterdir())
    code, _, err = run(capsys, "convert", tiny_llama, "-c", calib, "-r", "teal-uniform", "-o", tiny_llama, "--overwrite")
    assert_one_line_error(code, err, "overlaps the input")
    assert sorted(p.name for p in tiny_llama.iterdir()) == before


def test_calibration_of_another_model(capsys, tiny_checkpoints, calib, tmp_path):
    code, _, err = run(capsys, "convert", tiny_checkpoints["mistral"], "-c", calib, "-r", "teal-uniform", "-o", tmp_path / "out")
    assert_one_line_error(code, err, "recalibrate")


def test_failed_convert_leaves_no_directory(capsys, tiny_llama, calib, tmp_path, monkeypatch):
    import moyu_cli.export as export

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_file", full_disk)
    code, _, err = run(capsys, "convert", tiny_llama, "-c", calib, "-r", "teal-uniform", "-o", tmp_path / "out", "--eval-windows", 0)
    assert_one_line_error(code, err, "No space left on device", "nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_unknown_backend(capsys, tiny_llama, text_file):
    code, _, err = run(capsys, "eval", tiny_llama, "--data", text_file, "--backend", "fpga")
    assert code == 1
    assert "unknown kernel backend 'fpga'" in err


RECOVERY = "recovery: {tokens: 256, lr: 1.0e-3, dtype: float32}\n"


def convert_with(capsys, tiny_llama, calib, tmp_path, settings: str):
    """Run `moyu convert` with a 50% magnitude recipe that adds the YAML lines `settings`; return code, stdout, stderr."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"version: 1\nname: r\nsparsity: 0.5\n{settings}modifiers: [{{type: magnitude, targets: [all]}}]\n")
    return run(capsys, "convert", tiny_llama, "-c", calib, "-r", recipe, "-o", tmp_path / "out", "--eval-windows", "0")


def test_convert_with_recovery(capsys, tiny_llama, calib, tmp_path):
    code, out, err = convert_with(capsys, tiny_llama, calib, tmp_path, RECOVERY)
    assert code == 0, err
    assert "recovery: 2 steps on 256 calibration tokens" in out
    assert "KL to the dense model" in out
    assert "random positions" not in out


def test_convert_with_recovery_loss_positions(capsys, tiny_llama, calib, tmp_path):
    code, out, err = convert_with(capsys, tiny_llama, calib, tmp_path, RECOVERY.replace("}", ", loss_positions: 16}"))
    assert code == 0, err
    assert "(KL at 16 random positions per window)" in out
    assert json.loads((tmp_path / "out" / "moyu.json").read_text())["recovery"]["loss_positions"] == 16


def test_convert_with_recovery_loss_top_k(capsys, tiny_llama, calib, tmp_path):
    code, out, err = convert_with(capsys, tiny_llama, calib, tmp_path, RECOVERY.replace("}", ", loss_top_k: 4}"))
    assert code == 0, err
    recovery = json.loads((tmp_path / "out" / "moyu.json").read_text())["recovery"]
    assert recovery["loss_top_k"] == 4
    assert 4 <= recovery["loss_tokens"] < 384
    assert 0 < recovery["loss_mass"] < 1
    assert f"(KL over the dense model's top-4 tokens: {recovery['loss_tokens']:.0f} tokens per window" in out


def test_convert_recovery_resumes_after_ctrl_c(capsys, tiny_llama, calib, tmp_path, monkeypatch):
    import moyu_cli.recover

    kl, calls = moyu_cli.recover._kl, []

    def interrupted(*args, **kwargs):
        """The KL of the third step raises Ctrl-C, as a user pressing it then would."""
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return kl(*args, **kwargs)

    settings = "recovery: {tokens: 512, lr: 1.0e-3, dtype: float32}\n"
    state = tmp_path / "out.recovery-state.safetensors"
    monkeypatch.setattr(moyu_cli.recover, "_kl", interrupted)
    code, out, err = convert_with(capsys, tiny_llama, calib, tmp_path, settings)
    assert code == 130
    assert f"stopped after step 2 of 4; its state is saved in {state}: run the same command again to resume" in err
    assert state.is_file()
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(moyu_cli.recover, "_kl", kl)
    code, out, err = convert_with(capsys, tiny_llama, calib, tmp_path, settings)
    assert code == 0, err
    assert "recovery: 4 steps on 512 calibration tokens" in out
    assert "(resumed after step 2)" in out
    assert json.loads((tmp_path / "out" / "moyu.json").read_text())["recovery"]["resumed_after"] == 2
    assert not state.exists()


def test_convert_ctrl_c_before_state(capsys, tiny_llama, calib, tmp_path, monkeypatch):
    """A Ctrl-C in the first step, with no state saved yet, still prints a line, and writes nothing."""
    import moyu_cli.recover

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(moyu_cli.recover, "_kl", interrupted)
    code, _, err = convert_with(capsys, tiny_llama, calib, tmp_path, "recovery: {tokens: 512, lr: 1.0e-3, dtype: float32}\n")
    assert code == 130
    assert err.strip() == f"interrupted; {tmp_path / 'out'} was not written"
    assert list(tmp_path.glob("out*")) == []


def test_convert_sequential_after_recovery(capsys, tiny_llama, calib, tmp_path, monkeypatch):
    import moyu_cli.export

    calls = []
    measure = moyu_cli.export.measured_plan
    monkeypatch.setattr(moyu_cli.export, "measured_plan", lambda *args, **kwargs: calls.append(1) or measure(*args, **kwargs))
    code, out, err = convert_with(capsys, tiny_llama, calib, tmp_path, "sequential: {tokens: 256}\n" + RECOVERY)
    assert code == 0, err
    assert "thresholds measured in forward order on 256 calibration tokens" in out
    assert len(calls) == 2  # before training and on the trained weights
    # Measured again after training: on its own windows every module skips its target.
    modules = json.loads((tmp_path / "out" / "moyu.json").read_text())["modules"]
    for name, entry in modules.items():
        assert abs(entry["calibrated_sparsity"] - 0.5) < 0.01, name


def test_convert_hold_sparsity_keeps_trained_thresholds(capsys, tiny_llama, calib, tmp_path, monkeypatch):
    import moyu_cli.sequential

    passes = []
    measure = moyu_cli.sequential.sequential_thresholds
    monkeypatch.setattr(moyu_cli.sequential, "sequential_thresholds", lambda *args: passes.append(1) or measure(*args))
    settings = "sequential: {tokens: 256}\nrecovery: {tokens: 256, lr: 1.0e-3, dtype: float32, hold_sparsity: true}\n"
    code, out, err = convert_with(capsys, tiny_llama, calib, tmp_path, settings)
    assert code == 0, err
    assert len(passes) == 1  # before training only: the held thresholds are not measured again
    assert "thresholds held at their targets while training" in out
    assert "thresholds measured in forward order" not in out


def test_recovery_rejects_ramp_with_hold(capsys, tiny_llama, calib, tmp_path):
    code, _, err = convert_with(capsys, tiny_llama, calib, tmp_path, "recovery: {ramp: 0.5, hold_sparsity: true}\n")
    assert_one_line_error(code, err, "hold_sparsity", "ramp")
    assert not (tmp_path / "out").exists()


def test_recovery_rejects_bad_lr(capsys, tiny_llama, calib, tmp_path):
    recipe = tmp_path / "recover.yaml"
    recipe.write_text("version: 1\nname: r\nsparsity: 0.5\nrecovery: {lr: 2}\nmodifiers: [{type: magnitude}]\n")
    code, _, err = run(capsys, "convert", tiny_llama, "-c", calib, "-r", recipe, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "recovery.lr")
    assert not (tmp_path / "out").exists()


def test_convert_tda_prints_thresholds(capsys, tiny_llama, calib, text_file, tmp_path):
    code, out, err = run(capsys, "convert", tiny_llama, "-c", calib, "-r", "tda-mlp", "-o", tmp_path / "out", "--eval-windows", "0")
    assert code == 0, err
    modules = json.loads((tmp_path / "out" / "moyu.json").read_text())["modules"].values()
    lengths = [m["prompt_lengths"] for m in modules]
    assert len(lengths) == 2
    assert lengths[0] == lengths[1]
    assert lengths[0][0] == 1
    longest = [m["thresholds"][-1] for m in modules]
    assert all(t > 0 for t in longest)
    assert (
        f"prompt thresholds (TDA) measured on up to {16384 // 128} calibration prompts at {len(lengths[0])} prompt lengths of "
        f"1 to {lengths[0][-1]} tokens: for a {lengths[0][-1]}-token prompt each MLP keeps the neurons whose share of the "
        f"prompt's activation energy is above {min(longest):.2e} to {max(longest):.2e}, depending on the MLP"
    ) in " ".join(out.split())
    # The strict protocol has no prompt, so eval prints that the sequence-level MLPs ran dense.
    code, out, err = run(capsys, "eval", tmp_path / "out", "--data", text_file, "--windows", "1", "--window", "64")
    assert code == 0, err
    assert "the sequence-level MLPs (sequence_mlp) ran dense" in " ".join(out.split())
    assert "pass --protocol half-dense" in " ".join(out.split())
