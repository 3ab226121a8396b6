"""Calibration: run real text through a checkpoint and stream activation statistics to a file.

Observed sites (one `SiteStatistics` each):
- `<linear>.input`: the input of every decoder `nn.Linear`. Linears that receive the same tensor
  (q/k/v, gate/up) share one site, detected on the first window by tensor identity.
- `<mlp>.act_gate`: `act_fn(gate_proj(x))` of every gated MLP.
- `<linear>.weighted`: the weight-aware score |x_k| * ||W[:, k]||_2 of every decoder linear (WINA),
  one per module because modules that share an input (q/k/v) differ in column norms. Only the
  histogram is stored, and these entries are listed under the metadata key "weighted_of" (module
  name -> site name), so they are not counted among the input sites of `site_of`.

The calibration file is safetensors: the statistics as float64 tensors and, under the metadata key
"moyu", a JSON object with the model identity and hash, data files and hashes, token count, window
length, seed, dtype and the module-to-site map.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save

from .architecture import discover
from .checkpoint import atomic_write_bytes, checkpoint_hash, load_model, prepare_output
from .data import TextSource, read_text, tokenize, uses_bos, windows
from .errors import CalibrationError, MoyuError
from .observers import SiteStatistics, magnitude_histogram

logger = logging.getLogger(__name__)

CALIBRATION_FORMAT = 1
DEFAULT_TOKENS = 32768  # 64 windows of 512; each site then observes 18M to 50M values on SmolLM2-135M
DEFAULT_WINDOW = 512


@dataclass
class Calibration:
    """Statistics of every site plus provenance, as read from a calibration file."""

    sites: dict[str, SiteStatistics]
    site_of: dict[str, str]  # module name -> site name
    metadata: dict = field(default_factory=dict)
    weighted: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> histogram of |x_k| * ||W[:, k]||

    def weighted_histogram(self, module: str) -> torch.Tensor:
        """Return the histogram of the weight-aware score |x_k| * ||W[:, k]||_2 of `module`'s input."""
        if module not in self.weighted:
            raise CalibrationError(
                f"the calibration file has no weight-aware score statistics for module {module}; "
                "it was written by an older moyu, recalibrate with: moyu calibrate MODEL_DIR --data TEXT --output CALIB"
            )
        return self.weighted[module]

    def statistics_for(self, module: str) -> SiteStatistics:
        if module not in self.site_of:
            raise CalibrationError(
                f"the calibration file has no statistics for module {module}; recalibrate with this model"
            )
        return self.sites[self.site_of[module]]


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """Return ||W[:, k]||_2 for every input channel k of a linear weight `[out, in]` (float32 `[in]`)."""
    return weight.detach().float().norm(dim=0)


class _Recorder:
    """Forward hooks that fold activations of every site into its statistics."""

    def __init__(self, model: torch.nn.Module):
        self.layout = discover(model)
        self.sites: dict[str, SiteStatistics] = {}
        self.site_of: dict[str, str] = {}
        self.handles = []
        self._grouping = True
        self._last: tuple[torch.Tensor, str] | None = None
        self.weighted: dict[str, torch.Tensor] = {}
        for name, linear in self.layout.linears.items():
            self.handles.append(linear.register_forward_pre_hook(self._input_hook(name)))
            self.handles.append(linear.register_forward_pre_hook(self._weighted_hook(name, column_norms(linear.weight))))
        for name, mlp in self.layout.mlps.items():
            self.handles.append(mlp.gate_proj.register_forward_hook(self._gate_hook(name, mlp.act_fn)))

    def _observe(self, site: str, x: torch.Tensor) -> None:
        if site not in self.sites:
            self.sites[site] = SiteStatistics(x.shape[-1])
        try:
            self.sites[site].update(x)
        except FloatingPointError as exc:
            raise CalibrationError(
                f"NaN or infinite activation at {site}; the checkpoint may be corrupt, or try --dtype float32"
            ) from exc

    def _input_hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if self._grouping:
                # Linears fed the very same tensor share one site (q/k/v, gate/up). Holding the
                # tensor itself, not its id, keeps a freed tensor's address from being mistaken.
                if self._last is not None and self._last[0] is x:
                    self.site_of[name] = self._last[1]
                    return
                site = f"{name}.input"
                self.site_of[name] = site
                self._last = (x, site)
            elif self.site_of[name] != f"{name}.input":
                return
            self._observe(f"{name}.input", x)

        return hook

    def _weighted_hook(self, name: str, norms: torch.Tensor):
        def hook(module, args):
            score = args[0].detach().float().abs() * norms
            histogram = magnitude_histogram(score)
            if name in self.weighted:
                self.weighted[name] += histogram
            else:
                self.weighted[name] = histogram

        return hook

    def _gate_hook(self, name: str, act_fn):
        site = f"{name}.act_gate"

        def hook(module, args, output):
            self.site_of[name] = site
            self._observe(site, act_fn(output))

        return hook

    def end_first_window(self) -> None:
        self._grouping = False
        self._last = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def calibrate(
    model_dir: str | Path,
    data: list[str],
    output: str | Path,
    tokens: int = DEFAULT_TOKENS,
    window: int = DEFAULT_WINDOW,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: Callable[[int, int], None] | None = None,
    sources: list[TextSource] | None = None,
) -> dict:
    """Calibrate `model_dir` on `data` and write the statistics to `output`; returns the metadata.

    Windows of `window` tokens are drawn at random (with `seed`) across the whole tokenized text
    until `tokens` tokens are seen, so the statistics do not depend on the first pages only.
    """
    if tokens < window:
        raise MoyuError(f"--tokens {tokens} is smaller than one window of {window}; raise --tokens or lower --window")
    out = prepare_output(output, overwrite, [Path(model_dir)] + [Path(d) for d in data if Path(d).exists()])
    model, tokenizer = load_model(model_dir, dtype=dtype, allow_pickle=allow_pickle)
    sources = sources if sources is not None else [read_text(spec) for spec in data]
    ids = tokenize(tokenizer, sources)
    bos = tokenizer.bos_token_id if uses_bos(tokenizer) else None
    batch = windows(ids, window, bos_id=bos)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(batch.shape[0], generator=generator)[: max(1, tokens // window)]
    recorder = _Recorder(model)
    # The backbone (the module that contains the decoder layers) is enough: the LM head observes
    # nothing and, with Gemma's 262k vocabulary, costs more than all the layers together.
    backbone = model.get_submodule(recorder.layout.layers_path.rpartition(".")[0])
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            for step, index in enumerate(order.tolist()):
                backbone(input_ids=batch[index : index + 1], use_cache=False)
                if step == 0:
                    recorder.end_first_window()
                if progress is not None:
                    progress(step + 1, len(order))
    finally:
        recorder.remove()
    seen = len(order) * window
    if seen < tokens:
        logger.warning("the text has only %d windows of %d tokens, so calibration used %d tokens instead of %d; pass more text to reach --tokens", len(order), window, seen, tokens)
    metadata = {
        "format": CALIBRATION_FORMAT,
        "model": {"path": str(Path(model_dir).resolve()), "hash": checkpoint_hash(model_dir), "model_type": model.config.model_type},
        "data": [{"name": s.name, "sha256": s.sha256} for s in sources],
        "tokens": seen,
        "window": window,
        "bos": bos is not None,
        "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": round(time.perf_counter() - started, 1),
        "site_of": recorder.site_of,
        "weighted_of": {name: f"{name}.weighted" for name in recorder.weighted},
    }
    tensors = {}
    for site, stats in recorder.sites.items():
        tensors.update(stats.state(site))
    for name, histogram in recorder.weighted.items():
        tensors[f"{name}.weighted.histogram"] = histogram
    try:
        atomic_write_bytes(out, save(tensors, metadata={"moyu": json.dumps(metadata)}))
    except OSError as exc:
        raise MoyuError(f"failed to write calibration file {out}: {exc.strerror}; free disk space or choose another --output") from exc
    return metadata


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration file written by `calibrate`.

    Raises:
        CalibrationError: the file is missing, not a moyu calibration file, or corrupt.
    """
    file = Path(path)
    if not file.is_file():
        raise CalibrationError(f"calibration file not found: {file}; create it with: moyu calibrate MODEL_DIR --data TEXT --output {file}")
    try:
        with safe_open(file, framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {})["moyu"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (KeyError, json.JSONDecodeError, OSError, Exception) as exc:  # safetensors raises its own error type
        raise CalibrationError(f"{file} is not a readable moyu calibration file ({type(exc).__name__}); recalibrate") from exc
    # Files written before the weight-aware score existed have no "weighted_of" and load unchanged.
    weighted_of = metadata.get("weighted_of", {})
    weighted = {module: tensors[f"{site}.histogram"] for module, site in weighted_of.items()}
    weighted_sites = set(weighted_of.values())
    site_names = {key.rsplit(".", 1)[0] for key in tensors} - weighted_sites
    sites = {name: SiteStatistics.from_state(tensors, name) for name in site_names}
    return Calibration(sites=sites, site_of=metadata["site_of"], metadata=metadata, weighted=weighted)
