"""User-facing errors: one family, printed by the CLI as a single line with the fix."""

from __future__ import annotations


class MoyuError(Exception):
    """A mistake in the user's input or environment; the message names the bad value and the fix."""


class CheckpointError(MoyuError):
    """A checkpoint directory is missing, corrupt, or in a format moyu does not load."""


class UnsupportedArchitectureError(MoyuError):
    """The model's architecture has no decoder layout moyu can sparsify."""


class RecipeError(MoyuError):
    """A recipe file is missing, does not parse, or fails validation."""


class DataError(MoyuError):
    """Calibration or evaluation text is missing, empty, unreadable or unreachable."""


class CalibrationError(MoyuError):
    """A calibration file is missing, corrupt, or does not match the model."""


class OutputExistsError(MoyuError):
    """The output path exists and --overwrite was not given."""


class RecoveryInterrupted(KeyboardInterrupt):
    """Recovery fine-tuning was interrupted after saving its state; the message names the file and how to resume."""
