"""Read calibration and evaluation text and cut it into token windows.

Text sources: `.txt` / `.raw` files (lines), `.jsonl` files (the "text" field of each record), a
Hugging Face dataset id such as `wikitext:wikitext-2-raw-v1:test` when the network allows, and
`builtin:pydoc-calibration` / `builtin:pydoc-evaluation` (CPython's documentation topics).

The document protocol follows the WikiText evaluation used in the activation-sparsity literature:
strip carriage returns, keep non-empty lines, join them with a blank line, tokenize once without
special tokens, then cut non-overlapping windows.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".raw", ".jsonl")


@dataclass
class TextSource:
    """Text read from one file or dataset, with what is needed to record its provenance."""

    name: str
    text: str
    sha256: str


def _read_lines_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read text file {path}: {exc.strerror}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}); convert it to UTF-8") from exc
    lines = [line.strip("\r") for line in text.split("\n")]
    return "\n\n".join(line for line in lines if line.strip())


def _read_jsonl(path: Path) -> str:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number} is not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{path}:{number} has no string "text" field; each line must be {{"text": ...}}')
        if record["text"].strip():
            records.append(record["text"].strip())
    return "\n\n".join(records)


def _read_dataset(spec: str) -> TextSource:
    """Read `name[:config[:split]]` through the datasets library."""
    parts = spec.split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 else "train"
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"{spec} looks like a dataset id, which needs: pip install 'moyu[datasets]'") from exc
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # the datasets library raises many network and lookup types
        raise DataError(
            f"cannot load dataset {spec!r} ({type(exc).__name__}); without network access pass a local .txt/.raw/.jsonl file"
        ) from exc
    lines = [row["text"].strip("\r") for row in dataset if row["text"].strip()]
    text = "\n\n".join(line.strip() for line in lines)
    return TextSource(spec, text, hashlib.sha256(text.encode()).hexdigest())


def read_text(spec: str | Path) -> TextSource:
    """Read one text source: a file path, or a dataset id when no such file exists.

    Raises:
        DataError: the file is missing, unreadable, of an unknown type, or holds no text.
    """
    if str(spec).startswith("builtin:"):
        return builtin_english_text(str(spec))
    path = Path(spec)
    if path.exists():
        if path.is_dir():
            raise DataError(f"{path} is a directory; pass text files (.txt, .raw, .jsonl)")
        if path.suffix not in TEXT_SUFFIXES:
            raise DataError(f"{path} has unknown type {path.suffix!r}; use one of {', '.join(TEXT_SUFFIXES)}")
        text = _read_jsonl(path) if path.suffix == ".jsonl" else _read_lines_file(path)
        source = TextSource(str(path), text, hashlib.sha256(path.read_bytes()).hexdigest())
    elif path.suffix in TEXT_SUFFIXES or "/" in str(spec) and not _looks_like_dataset(str(spec)):
        raise DataError(f"text file not found: {path}")
    else:
        source = _read_dataset(str(spec))
    if not source.text.strip():
        raise DataError(f"{source.name} holds no text; pass a file with at least one non-empty line")
    return source


def _looks_like_dataset(spec: str) -> bool:
    # A Hub id has at most one "/" (owner/name) and no path-like pieces.
    return spec.count("/") <= 1 and not spec.startswith((".", "/", "~"))


BUILTIN_TEXTS = ("builtin:pydoc-calibration", "builtin:pydoc-evaluation")


def builtin_english_text(spec: str) -> TextSource:
    """Return real English text that ships with CPython: the pydoc_data documentation topics.

    For machines with neither WikiText files nor network access. The topics are split in two
    disjoint halves (even and odd topics, in sorted order) so that calibration and evaluation
    never see the same text: "builtin:pydoc-calibration" and "builtin:pydoc-evaluation".
    """
    if spec not in BUILTIN_TEXTS:
        raise DataError(f"unknown built-in text {spec!r}; choose one of {', '.join(BUILTIN_TEXTS)}")
    from pydoc_data import topics

    parity = 0 if spec.endswith("calibration") else 1
    names = sorted(topics.topics)[parity::2]
    lines = [line.strip() for name in names for line in topics.topics[name].splitlines()]
    text = "\n\n".join(line for line in lines if line)
    return TextSource(f"{spec} (CPython {len(names)} documentation topics)", text, hashlib.sha256(text.encode()).hexdigest())


def uses_bos(tokenizer) -> bool:
    """Return whether the tokenizer puts a BOS token in front of its encodings (Gemma does, SmolLM2 does not)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("hello").input_ids
    return len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def tokenize(tokenizer, texts: list[TextSource]) -> torch.Tensor:
    """Tokenize the joined texts once, without special tokens; returns a 1-D LongTensor."""
    joined = "\n\n".join(source.text for source in texts)
    ids = tokenizer(joined, add_special_tokens=False, return_attention_mask=False).input_ids
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, length: int, max_windows: int | None = None, bos_id: int | None = None) -> torch.Tensor:
    """Cut `ids` into non-overlapping windows of `length` tokens, `[W, length]` (or `length + 1` with BOS).

    With `bos_id`, each window gets BOS in front, because models trained with BOS (Gemma) see
    garbage statistics without it.
    """
    count = ids.numel() // length
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one window of {length}; pass more text or a smaller --window")
    batch = ids[: count * length].view(count, length)
    if bos_id is not None:
        batch = torch.cat([torch.full((count, 1), bos_id, dtype=torch.long), batch], dim=1)
    return batch
