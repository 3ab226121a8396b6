"""moyu: convert dense LLM checkpoints into activation-sparse models."""

__version__ = "0.1.0"

from .export import load  # noqa: E402

__all__ = ["load", "__version__"]
