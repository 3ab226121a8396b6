"""Recovery fine-tuning: teach the sparse model to match the dense one on calibration text.

The sparse model (thresholds fixed, every position sparsified) is trained to minimize the KL
divergence from the dense model's next-token distribution, KL(dense || sparse), averaged over
positions. The mask `|x| > threshold` is a constant of each forward pass; gradients flow through
the kept entries. Trained: every parameter inside the decoder layers (projections and norms).
Frozen: the embedding and the LM head (tied in most small models), so the vocabulary is untouched.

Distilling from the dense model, rather than fitting the text, pins the target to what the
checkpoint already predicts. The sparse model can recover quality it lost, but it is not pulled
toward the calibration text beyond the dense model's predictions. Keep the calibration and the
evaluation text apart all the same.

Cost: one dense forward (the teacher) and one sparse forward and backward per window. On
SmolLM2-135M a window of 512 tokens took about 3.3 s with bfloat16 autocast and 2 threads on a CPU
where bfloat16 ran fast, and 15 s in float32 with 1 thread on an AVX2-only CPU (see `resolve_dtype`).
With a large vocabulary the LM head and the log-softmax over it dominate. `loss_positions`
computes the logits and the KL at a random subset of each window's positions, an unbiased
estimate of the same mean. On Gemma 3 270M (vocabulary 262,144; float32, 2 threads, AVX2) a step
took 13.22 s at all 512 positions and 5.50 s at 128 (benchmarks/recovery_step.py, every step
timed; the run below leaves the first step of each setting out). The decoder
layers still run on every position, and positions before a sampled one get gradients through
attention.

`loss_top_k` keeps every position and narrows the vocabulary instead. The dense model's logits
are computed in full, without gradients. The KL then runs over the union of its `loss_top_k`
most likely tokens at the window's positions, with both distributions renormalized over it.
The sparse model's LM head and its backward thus see a few thousand rows, not the whole
vocabulary. On Gemma 3 270M with k = 64 the union held 5,041 tokens per window and 95.0% of the
dense probability, and a step took 7.22 s against 14.70 s with the whole vocabulary (2 threads).
The sparse model is not penalized for probability it puts outside the union. With `loss_top_k`
at every position (no `loss_positions`, no `hidden_weight`), a window that comes again later in
the run keeps the dense model's final hidden states, top-k tokens and normalizers in memory
(`TEACHER_CACHE_BYTES` at most), so a run of more tokens than the calibration text holds runs the
dense model once per distinct window, and such a step took 3.68 s on Gemma 3 270M against 7.22 s
(2 threads). The steps compute the same values either way.

A run of an hour or more should survive an interruption. With a `ResumeFile`, the trained
weights, the thresholds, the optimizer state and the loss history go to one safetensors file.
It is saved every `every_seconds`, when Ctrl-C stops training between two updates, and at the
end. A later call with a file of the same fingerprint continues from the saved step. The steps then
see the same windows, learning rates and loss positions as in an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from .architecture import find_decoder_layers, head_logits
from .errors import MoyuError, RecoveryInterrupted

logger = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    steps: int
    tokens: int
    seconds: float
    dtype: str  # compute dtype used, with "auto" resolved
    kl_first: float  # mean KL over the first tenth of the steps (at least one)
    kl_last: float  # mean KL over the last tenth
    loss_positions: int | None = None  # positions per window the KL was computed at (None: all)
    loss_top_k: int | None = None  # the KL ran over the union of the dense model's top-k tokens (None: all)
    loss_tokens: float | None = None  # with loss_top_k: mean size of that union per window
    loss_mass: float | None = None  # with loss_top_k: mean share of the dense model's probability on it
    resumed_after: int | None = None  # steps taken from a resume file (None: started from the beginning)
    teacher_reused: int = 0  # steps that took the dense model's outputs from an earlier step on the same window

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ResumeFile:
    """The file `recover` keeps its state in while training, so that an interrupted run resumes from it."""

    path: Path
    fingerprint: str  # identifies the run (model, plan, windows, settings); a file from a different run is rejected
    every_seconds: float = 600.0  # time between two saves while training


@dataclass
class _Snapshot:
    """The state a step changes besides the weights and the optimizer, taken after a completed step."""

    buffers: dict[str, torch.Tensor]  # the decoder layers' buffers (thresholds among them)
    schedule: dict | None  # the schedule's own state, where it has one (`hold_sparsity`)
    positions: torch.Tensor  # state of the generator that draws the loss positions
    rng: torch.Tensor  # torch's global random state
    reused: int  # steps so far that reused the dense model's outputs (RecoveryReport.teacher_reused)


def _snapshot(layers: nn.Module, schedule, positions: torch.Generator, reused: int) -> _Snapshot:
    return _Snapshot(
        buffers={name: buffer.detach().clone() for name, buffer in layers.named_buffers()},
        schedule=schedule.state() if hasattr(schedule, "state") else None,
        positions=positions.get_state(),
        rng=torch.get_rng_state(),
        reused=reused,
    )


@contextmanager
def _finish_before_interrupt():
    """Hold back a Ctrl-C until the block has run, so that the block is never left half done.

    Only Python's default SIGINT handler is replaced. Where SIGINT is ignored (under nohup) or has
    the caller's handler, or off the main thread (which receives no signals), the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def _remove_stale_temporaries(path: Path) -> None:
    """Remove temporary state files that a killed run (SIGTERM, SIGKILL, power loss) left beside `path`."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)
        logger.info("removed %s, a state file a killed run did not finish writing", stale)


def _save_state(resume: ResumeFile, step: int, layers: nn.Module, optimizer, snapshot: _Snapshot, history: dict) -> None:
    """Write the state after `step` completed steps to `resume.path` through a temporary file and a rename."""
    from safetensors.torch import save_file

    tensors = {f"layers.{name}": parameter.detach() for name, parameter in layers.named_parameters()}
    tensors |= {f"buffers.{name}": buffer for name, buffer in snapshot.buffers.items()}
    names = {parameter: name for name, parameter in layers.named_parameters()}
    for parameter, state in optimizer.state.items():
        tensors |= {f"optimizer.{names[parameter]}.{key}": value for key, value in state.items()}
    tensors |= {"rng.positions": snapshot.positions, "rng.torch": snapshot.rng}
    tensors = {name: tensor.contiguous().cpu() for name, tensor in tensors.items()}
    header = {"fingerprint": resume.fingerprint, "step": step, "schedule": snapshot.schedule, "teacher_reused": snapshot.reused} | history
    resume.path.parent.mkdir(parents=True, exist_ok=True)
    # Written to a temporary path, not through checkpoint.atomic_write_bytes, so that a state of
    # gigabytes is never held in memory as one bytes object.
    fd, tmp = tempfile.mkstemp(prefix=f".{resume.path.name}.tmp-", dir=resume.path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"moyu_recovery": json.dumps(header)})
        # Flushed to disk before the rename, so that a power loss cannot leave an empty file in
        # place of the last good state.
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, resume.path)
        _fsync_directory(resume.path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_directory(directory: Path) -> None:
    """Flush a rename in `directory` to disk, where the platform allows opening a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


HEADER_FIELDS = ("fingerprint", "step", "seconds", "losses", "coverage", "dtype")


def _load_state(resume: ResumeFile, layers: nn.Module, optimizer, schedule, positions: torch.Generator, dtype: str) -> dict:
    """Restore the state in `resume.path` into `layers`, `optimizer`, `schedule` and the generators; return its header.

    Raises:
        MoyuError: the file is invalid, from a different run, trained in another compute dtype
            than `dtype`, or does not fit the model. In the first three cases nothing is restored.
    """
    from safetensors import safe_open

    fix = "delete it or pass --no-resume to start this run from the beginning"
    try:
        with safe_open(resume.path, framework="pt") as handle:
            header = json.loads((handle.metadata() or {}).get("moyu_recovery", "null"))
            if not isinstance(header, dict) or any(field not in header for field in HEADER_FIELDS):
                raise ValueError("missing or incomplete moyu_recovery header")
            if header["fingerprint"] != resume.fingerprint:
                raise MoyuError(
                    f"{resume.path} contains the recovery state of a different run (another model, calibration, plan, text "
                    f"or recovery settings); {fix}"
                )
            # "auto" resolves per machine, and a run trained in one dtype does not continue in another.
            if header["dtype"] != dtype:
                raise MoyuError(
                    f"{resume.path} was trained with {header['dtype']} compute, and this run resolves {dtype}; set the recipe's "
                    f"recovery.dtype to {header['dtype']} (the run stays the same), or {fix}"
                )
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except MoyuError:
        raise
    except Exception as exc:  # a truncated or foreign file: safetensors, JSON and key errors
        raise MoyuError(f"invalid recovery state file {resume.path} ({exc}); {fix}") from exc
    try:
        with torch.no_grad():
            for name, parameter in layers.named_parameters():
                parameter.copy_(tensors[f"layers.{name}"])
            for name, buffer in layers.named_buffers():
                # Rebound, not copied in place: a threshold buffer may be the plan's own tensor.
                owner, _, leaf = name.rpartition(".")
                setattr(layers.get_submodule(owner), leaf, tensors[f"buffers.{name}"].to(buffer.device, buffer.dtype))
        for name, parameter in layers.named_parameters():
            prefix = f"optimizer.{name}."
            state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
            if state:
                # AdamW keeps its step count as a CPU scalar, the moments beside the parameter.
                optimizer.state[parameter] = {key: value.to(parameter.device) if value.dim() else value for key, value in state.items()}
        positions.set_state(tensors["rng.positions"])
        torch.set_rng_state(tensors["rng.torch"])
        if header.get("schedule") is not None:
            schedule.restore(header["schedule"])
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise MoyuError(f"the recovery state {resume.path} does not fit this run ({exc}); {fix}") from exc
    return header


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Mean over positions of KL(teacher || student), computed over chunks of positions to bound memory."""
    total = student_logits.new_zeros((), dtype=torch.float32)
    positions = student_logits.shape[0]
    for start in range(0, positions, chunk):
        s = F.log_softmax(student_logits[start : start + chunk].float(), dim=-1)
        t = F.log_softmax(teacher_logits[start : start + chunk].float(), dim=-1)
        total = total + (t.exp() * (t - s)).sum()
    return total / positions


def _check_head(model: nn.Module, ids: torch.Tensor, hidden: torch.Tensor) -> None:
    """Raise MoyuError unless `model`'s last logits are `head_logits` of its decoder's last hidden state (`hidden`)."""
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1].float()
        manual = head_logits(model, hidden[0, -1:])[0].float()
    difference = (manual - reference).abs().max().item()
    if difference > 1e-3 * max(1.0, reference.abs().max().item()):
        raise MoyuError(
            f"{type(model).__name__}'s logits differ from its LM head applied to its last hidden state (by up to "
            f"{difference:.3g}): it transforms them in a way recovery.loss_top_k does not know; remove loss_top_k"
        )


def _teacher_top_k(teacher: nn.Module, teacher_hidden: torch.Tensor, k: int, chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the union of the teacher's top-`k` tokens over the positions of `teacher_hidden`, and its log-normalizer at each position.

    `teacher_hidden` is the teacher's final hidden states `[positions, hidden]` at the positions of
    the loss. The full logits are computed in chunks of positions and not kept.
    """
    top, normalizers = [], []
    with torch.no_grad():
        for start in range(0, teacher_hidden.shape[0], chunk):
            logits = head_logits(teacher, teacher_hidden[start : start + chunk]).float()
            normalizers.append(torch.logsumexp(logits, dim=-1))
            top.append(logits.topk(min(k, logits.shape[-1]), dim=-1).indices)
    return torch.cat(top).unique(), torch.cat(normalizers)


def _top_k_kl(
    student: nn.Module,
    teacher: nn.Module,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    tokens: torch.Tensor,
    normalizers: torch.Tensor,
) -> tuple[torch.Tensor, float]:
    """Return the mean KL(teacher || student) over `tokens`, both distributions renormalized over them, and the teacher's mean mass on them.

    `student_hidden` and `teacher_hidden` are the final hidden states `[positions, hidden]` at the
    positions of the loss; `tokens` and `normalizers` come from `_teacher_top_k`.
    """
    with torch.no_grad():
        teacher_logp = head_logits(teacher, teacher_hidden, tokens).float() - normalizers[:, None]
        log_mass = torch.logsumexp(teacher_logp, dim=-1, keepdim=True)
        target = teacher_logp - log_mass
    student_logp = F.log_softmax(head_logits(student, student_hidden, tokens).float(), dim=-1)
    kl = (target.exp() * (target - student_logp)).sum(-1).mean()
    return kl, log_mass.exp().mean().item()


TEACHER_CACHE_BYTES = 4 << 30  # memory for the dense model's outputs on windows that come again


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _hidden_loss(student_states: tuple, teacher_states: tuple, skip_first: int) -> torch.Tensor:
    """Return the mean over decoder layers and positions of |h_student - h_teacher|^2 / |h_teacher|^2.

    The error is relative per position, so the few positions with very large hidden states (the first token's
    attention sink) weigh no more than the others. The embedding output (index 0) is the same in
    both models and is left out.
    """
    total = student_states[1].new_zeros((), dtype=torch.float32)
    for student, teacher in zip(student_states[1:], teacher_states[1:]):
        s, t = student[0, skip_first:].float(), teacher[0, skip_first:].float()
        total = total + ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-6)).mean()
    return total / (len(student_states) - 1)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Set requires_grad on the decoder layers' parameters only; return them."""
    _, layers = find_decoder_layers(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    parameters = list(layers.parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    return parameters


def resolve_dtype(dtype: str, device_type: str) -> str:
    """Return the recovery compute dtype for `dtype` ("auto", "bfloat16" or "float32") on `device_type`."""
    if dtype != "auto":
        return dtype
    if device_type == "cuda":
        return "bfloat16"
    # oneDNN's check for fast bfloat16 (AVX-512 or newer) is a private op, so a torch build
    # without it gets float32.
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return "bfloat16" if native else "float32"


def recover(
    student: nn.Module,
    teacher: nn.Module,
    batch: torch.Tensor,
    lr: float,
    dtype: str = "auto",
    seed: int = 0,
    skip_first: int = 0,
    hidden_weight: float = 0.0,
    schedule: Callable[[int], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    loss_positions: int | None = None,
    loss_top_k: int | None = None,
    resume: ResumeFile | None = None,
) -> RecoveryReport:
    """Fine-tune `student` (sparse modules in place, torch backend) toward `teacher` on the windows of `batch`.

    Args:
        batch: `[steps, window]` token ids; one window per step, in this order.
        lr: peak AdamW learning rate; 10-step warm-up, cosine decay to zero.
        dtype: autocast compute dtype ("auto", "bfloat16" or "float32", see `resolve_dtype`);
            weights and the optimizer state stay float32.
        skip_first: positions at the start of each window left out of the loss (a BOS token).
        hidden_weight: weight of `_hidden_loss`, added to the KL (0: the KL alone).
        schedule: called with the step index before each step (the sparsity ramp and
            `hold_sparsity` set thresholds there).
        progress: called with (steps done, steps) after each step.
        loss_positions: compute the logits and the KL at this many positions per window, drawn
            at random for each step from the positions after `skip_first` (None, or at least
            that many positions: all of them).
        loss_top_k: compute the KL over the union of the dense model's `loss_top_k` most likely
            tokens at the positions of the loss (None: the whole vocabulary).
        resume: save the training state there while training and at the end, and continue
            from it when it exists (see `ResumeFile`). The caller removes it when done with it.

    Raises:
        MoyuError: the loss becomes NaN or infinite, the model ignores `logits_to_keep`, (with
            `loss_top_k`) its logits are not its LM head applied to its decoder's output, or the
            resume file is invalid or from a different run.
        RecoveryInterrupted: Ctrl-C, with `resume`; the message names the file with the state.
    """
    if dtype not in ("auto", "bfloat16", "float32"):
        raise MoyuError(f"invalid recovery dtype {dtype!r}; use auto, bfloat16 or float32")
    device_type = next(student.parameters()).device.type
    dtype = resolve_dtype(dtype, device_type)
    parameters = trainable_parameters(student)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    steps = batch.shape[0]
    scored = batch.shape[1] - skip_first
    if loss_positions is not None and loss_positions >= scored:
        loss_positions = None
    positions = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    coverage: list[tuple[int, float]] = []  # with loss_top_k: (tokens the KL covered, teacher mass on them) per step
    _, layers = find_decoder_layers(student)
    first, earlier = 0, 0.0  # the first step to run; seconds of training before it (resumed runs)
    reused = 0  # steps that took the dense model's outputs from the cache below
    if resume is not None:
        _remove_stale_temporaries(resume.path)
    if resume is not None and resume.path.exists():
        header = _load_state(resume, layers, optimizer, schedule, positions, dtype)
        first, earlier, reused = header["step"], header["seconds"], header.get("teacher_reused", 0)
        losses, coverage = header["losses"], [tuple(entry) for entry in header["coverage"]]
        logger.info("recovery resumes after step %d/%d from %s", first, steps, resume.path)
    started = last_save = time.perf_counter()

    def save(completed: int, snapshot: _Snapshot) -> bool:
        """Save the state after `completed` steps and return True, or log a write error (a full disk) and return False."""
        history = {
            "dtype": dtype, "seconds": earlier + time.perf_counter() - started, "losses": losses[:completed], "coverage": coverage[:completed]
        }
        try:
            _save_state(resume, completed, layers, optimizer, snapshot, history)
        except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
            logger.warning("failed to save the recovery state to %s (%s); training continues without it", resume.path, exc)
            return False
        return True

    student.train()
    teacher.eval()
    autocast = dict(device_type=device_type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    # With loss_top_k at every position, a window that repeats keeps the dense model's outputs
    # (final hidden states, top-k tokens, normalizers) up to TEACHER_CACHE_BYTES, because a run of
    # more tokens than the text contains would otherwise run the dense model on it again.
    keys, uses, teacher_cache, cache_size = None, Counter(), {}, 0
    if loss_top_k is not None and loss_positions is None and hidden_weight == 0:
        keys = [row.cpu().numpy().tobytes() for row in batch]
        uses = Counter(keys[first:])
    completed = first
    snapshot = _snapshot(layers, schedule, positions, reused) if resume is not None else None
    try:
        for step in range(first, steps):
            if resume is not None and step > first and time.perf_counter() - last_save >= resume.every_seconds:
                save(step, snapshot)
                last_save = time.perf_counter()
            if schedule is not None:
                schedule(step)
            ids = batch[step : step + 1]
            hidden = hidden_weight > 0
            loss_at = slice(skip_first, None)
            if loss_positions is not None:
                loss_at = skip_first + torch.randperm(scored, generator=positions)[:loss_positions].sort().values
            if loss_top_k is not None:
                # The decoders' final hidden states; the LM heads run in _teacher_top_k and _top_k_kl.
                cached = teacher_cache.pop(keys[step], None) if keys is not None else None
                cache_size -= 0 if cached is None else _nbytes(*cached)
                if cached is None:
                    with torch.no_grad(), torch.autocast(**autocast):
                        target = teacher.get_decoder()(input_ids=ids, use_cache=False, output_hidden_states=hidden)
                        if step == first:
                            _check_head(teacher, ids, target.last_hidden_state)
                        teacher_hidden = target.last_hidden_state[0, loss_at]
                        tokens, normalizers = _teacher_top_k(teacher, teacher_hidden, loss_top_k)
                else:
                    teacher_hidden, tokens, normalizers = (tensor.to(ids.device) for tensor in cached)
                    reused += 1
                if keys is not None:
                    uses[keys[step]] -= 1
                    size = _nbytes(teacher_hidden, tokens, normalizers)
                    if uses[keys[step]] and cache_size + size <= TEACHER_CACHE_BYTES:
                        teacher_cache[keys[step]] = tuple(tensor.cpu() for tensor in (teacher_hidden, tokens, normalizers))
                        cache_size += size
                with torch.autocast(**autocast):
                    output = student.get_decoder()(input_ids=ids, use_cache=False, output_hidden_states=hidden)
                    kl, mass = _top_k_kl(student, teacher, output.last_hidden_state[0, loss_at], teacher_hidden, tokens, normalizers)
                coverage.append((tokens.numel(), mass))
            else:
                # The LM head runs only at the positions of the loss (transformers' logits_to_keep).
                keep = {} if loss_positions is None else {"logits_to_keep": loss_at.to(ids.device)}
                with torch.no_grad(), torch.autocast(**autocast):
                    target = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden, **keep)
                with torch.autocast(**autocast):
                    output = student(input_ids=ids, use_cache=False, output_hidden_states=hidden, **keep)
                student_logits, teacher_logits = output.logits[0], target.logits[0]
                if loss_positions is None:
                    student_logits, teacher_logits = student_logits[skip_first:], teacher_logits[skip_first:]
                elif student_logits.shape[0] != loss_positions:
                    raise MoyuError(
                        f"{type(student).__name__} returned logits at {student_logits.shape[0]} positions, not the "
                        f"{loss_positions} of recovery.loss_positions (it ignores logits_to_keep); remove loss_positions"
                    )
                kl = _kl(student_logits, teacher_logits)
            loss = kl
            if hidden:
                loss = loss + hidden_weight * _hidden_loss(output.hidden_states, target.hidden_states, skip_first)
            if not math.isfinite(loss.item()):
                fix = f"lower the recipe's recovery.lr (now {lr})"
                if resume is not None and resume.path.exists():
                    fix += f" and delete {resume.path}, whose state was trained at this rate"
                raise MoyuError(f"recovery loss is {loss.item()} at step {step}; {fix}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            scale = min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in optimizer.param_groups:
                group["lr"] = lr * scale
            # A Ctrl-C during the update waits for its end: a half-applied update could not be saved.
            with _finish_before_interrupt():
                losses.append(kl.item())
                optimizer.step()
                if resume is not None:
                    snapshot = _snapshot(layers, schedule, positions, reused)
                completed = step + 1
            if progress is not None:
                progress(step + 1, steps)
            if step % 10 == 0 or step == steps - 1:
                logger.info("recovery step %d/%d: KL %.4f (%.0f s)", step + 1, steps, losses[-1], earlier + time.perf_counter() - started)
        if resume is not None and completed > first:
            save(completed, snapshot)
    except KeyboardInterrupt:
        if resume is None:
            raise
        if completed == first or not save(completed, snapshot):
            if not resume.path.exists():
                raise
            raise RecoveryInterrupted(
                f"recovery fine-tuning stopped in step {completed + 1} of {steps}; the last state saved is in "
                f"{resume.path}: run the same command again to resume from there"
            ) from None
        raise RecoveryInterrupted(
            f"recovery fine-tuning stopped after step {completed} of {steps}; its state is saved in {resume.path}: "
            f"run the same command again to resume"
        ) from None
    finally:
        student.eval()
        for parameter in student.parameters():
            parameter.requires_grad_(False)
    tenth = max(1, steps // 10)
    return RecoveryReport(
        steps=steps,
        tokens=int(batch[:, skip_first:].numel()),
        seconds=round(earlier + time.perf_counter() - started, 1),
        dtype=dtype,
        kl_first=sum(losses[:tenth]) / tenth,
        kl_last=sum(losses[-tenth:]) / tenth,
        loss_positions=loss_positions,
        loss_top_k=loss_top_k,
        loss_tokens=sum(c for c, _ in coverage) / len(coverage) if coverage else None,
        loss_mass=sum(m for _, m in coverage) / len(coverage) if coverage else None,
        resumed_after=first or None,
        teacher_reused=reused,
    )
