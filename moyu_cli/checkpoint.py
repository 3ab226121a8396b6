"""Load and save Hugging Face checkpoints in safetensors form, and import GGUF files.

moyu reads a checkpoint directory: `config.json` plus `model.safetensors` or sharded safetensors
with `model.safetensors.index.json`. Pickle checkpoints (`*.bin`, `*.pt`) are rejected unless the
caller passes `allow_pickle=True`, because unpickling runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from .errors import CheckpointError, MoyuError, OutputExistsError

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def _weight_files(model_dir: Path) -> tuple[list[Path], list[Path]]:
    safetensors = sorted(model_dir.glob("*.safetensors"))
    pickles = sorted(p for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    return safetensors, pickles


def check_checkpoint(model_dir: str | Path, allow_pickle: bool = False) -> Path:
    """Validate that `model_dir` is a loadable checkpoint directory and return it as a Path.

    Raises:
        CheckpointError: the directory, its config or its weights are missing or unreadable.
    """
    path = Path(model_dir)
    if path.is_file() and path.suffix == ".gguf":
        raise CheckpointError(
            f"{path} is a GGUF file; import it first with: moyu import-gguf {path} --output DIR"
        )
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{config} is missing; a checkpoint directory needs config.json")
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config} is not valid JSON ({exc}); restore the file") from exc
    safetensors, pickles = _weight_files(path)
    if not safetensors:
        if pickles and not allow_pickle:
            raise CheckpointError(
                f"{path} holds only pickle weights ({pickles[0].name}); pickle can run arbitrary code. "
                "Convert them to safetensors, or pass --allow-pickle if you trust the file"
            )
        if not pickles:
            raise CheckpointError(f"no *.safetensors weights in {path}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise CheckpointError(f"{index} names missing shard {missing[0]}; restore the checkpoint")
    for file in safetensors:
        _check_safetensors_header(file)
    return path


def _check_safetensors_header(file: Path) -> None:
    """Fail early on a truncated or corrupt safetensors file instead of deep inside transformers."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length exceeds file size")
            header = json.loads(handle.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise ValueError(f"file is {size} bytes but its tensors need {8 + header_len + end}")
    except (ValueError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{file} is corrupt or truncated ({exc}); restore or re-export it") from exc


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, allow_pickle: bool = False):
    """Load a causal LM and its tokenizer from a checked checkpoint directory.

    Returns:
        `(model, tokenizer)` with the model in eval mode on the CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_checkpoint(model_dir, allow_pickle=allow_pickle)
    safetensors, _ = _weight_files(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=bool(safetensors) or not allow_pickle
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"failed to load the checkpoint in {path}: {first_line}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"no usable tokenizer in {path} ({exc}); copy the tokenizer files there") from exc
    model.eval()
    return model, tokenizer


def checkpoint_hash(model_dir: str | Path) -> str:
    """Return a sha256 over config.json and the safetensors headers (names, shapes, dtypes, offsets).

    Hashing headers instead of all weight bytes keeps this instant for large checkpoints; the
    offsets and sizes still change with any re-export.
    """
    path = Path(model_dir)
    digest = hashlib.sha256()
    digest.update((path / "config.json").read_bytes())
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            digest.update(file.name.encode())
            digest.update(handle.read(header_len))
        digest.update(str(file.stat().st_size).encode())
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_output(output: str | Path, overwrite: bool, inputs: list[Path]) -> Path:
    """Check that `output` may be written and never aliases an input.

    Raises:
        OutputExistsError: `output` exists and `overwrite` is False.
        MoyuError: `output` is, contains or lies inside one of `inputs`.
    """
    out = Path(output).resolve()
    for source in inputs:
        src = Path(source).resolve()
        if out == src or src.is_relative_to(out) or out.is_relative_to(src):
            raise MoyuError(f"output {output} overlaps the input {source}; choose another output path")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output {output} exists; choose another path or pass --overwrite")
    return out


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextmanager
def atomic_directory(output: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `output`; on success it replaces `output` in one rename.

    On any error (including KeyboardInterrupt and a full disk) the temporary directory is removed
    and an existing `output` stays untouched.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp creates 0700; give the result the usual permissions
    backup = None
    try:
        yield staging
        # Some writers (safetensors among them) create files 0600, so every file gets the usual permissions.
        mode = 0o666 & ~_umask()
        for file in staging.rglob("*"):
            if file.is_file() and not file.is_symlink():
                file.chmod(mode)
        if output.exists():
            backup = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.replace(output, backup)
            os.replace(staging, output)
        else:
            os.replace(staging, output)
    except BaseException:
        # Interrupted between the two renames: the old output goes back where it was.
        if backup is not None and backup.exists() and not output.exists():
            os.replace(backup, output)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if backup is not None:
        # The new output is in place; the old one is removed on a best-effort basis.
        try:
            shutil.rmtree(backup, ignore_errors=True) if backup.is_dir() else backup.unlink()
        except OSError as exc:
            logger.warning("could not remove the previous output, now at %s (%s); delete it by hand", backup, exc)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename, so a power loss leaves the old file or the new one
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def import_gguf(gguf_file: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Dequantize a GGUF checkpoint with transformers and save it as a float32 safetensors directory."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError as exc:
        raise MoyuError("importing GGUF needs the gguf package: pip install 'moyu[gguf]'") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(gguf_file)
    if not source.is_file():
        raise CheckpointError(f"GGUF file not found: {source}")
    out = prepare_output(output, overwrite, [source])
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"failed to read GGUF file {source}: {exc}") from exc
    # transformers marks GGUF-loaded models as quantized although the weights are plain floats,
    # and save_pretrained then refuses; dropping the quantizer config makes them saveable.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    with atomic_directory(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    logger.info("imported %s into %s", source, out)
    return out
