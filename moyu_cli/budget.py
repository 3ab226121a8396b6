"""Quality budget: the highest model-wide sparsity whose perplexity increase fits a budget.

`moyu convert --max-ppl-increase 5%` calls `search_sparsity`: a binary search over the recipe's
sparsity, each trial measured on calibration text against the dense model on the same windows.
The search assumes the perplexity increase grows with sparsity, so the result is the largest
sparsity measured within budget, to `tolerance`; every trial is reported.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from typing import Callable

from torch import nn

from .evaluate import perplexity
from .modeling import ModulePlan, apply_plan

logger = logging.getLogger(__name__)


def parse_increase(text: str) -> float:
    """Parse a relative perplexity increase: "5%" or "0.05" both give 0.05.

    Raises:
        ValueError: the text is not a number or percentage, or is not positive.
    """
    value = text.strip()
    try:
        number = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise ValueError(f"invalid perplexity increase {text!r}; pass a percentage such as 5% or a fraction such as 0.05") from None
    if not number > 0:
        raise ValueError(f"invalid perplexity increase {text!r}; it must be positive")
    return number


@dataclass
class BudgetResult:
    """The sparsity chosen for a perplexity budget, and every trial of the search."""

    max_increase: float
    sparsity: float
    perplexity: float
    dense_perplexity: float
    windows: int
    protocol: str
    trials: list[dict] = field(default_factory=list)

    @property
    def increase(self) -> float:
        return self.perplexity / self.dense_perplexity - 1.0

    def to_dict(self) -> dict:
        return asdict(self) | {"increase": self.increase}


def search_sparsity(
    model: nn.Module,
    tokenizer,
    sources,
    plan_for: Callable[[float], dict[str, ModulePlan]],
    max_increase: float,
    upper: float,
    windows: int = 8,
    window: int = 512,
    tolerance: float = 0.01,
    protocol: str = "strict",
) -> BudgetResult:
    """Binary-search the highest sparsity in [0, upper] whose perplexity increase is at most `max_increase`.

    Args:
        model: the dense model; each trial applies `plan_for(sparsity)` to a copy of it.
        sources: calibration text; the first `windows` windows of `window` tokens are scored.
        plan_for: builds the plan of the recipe at a sparsity.
        max_increase: relative increase over the dense perplexity, 0.05 for 5%.
        tolerance: the search stops when the bracket is narrower than this.

    Returns:
        The highest sparsity measured within budget (0.0, the dense model, when none is).
    """
    dense = perplexity(model, tokenizer, sources, window=window, max_windows=windows, protocol=protocol).perplexity
    low, high = 0.0, upper
    best = BudgetResult(max_increase, 0.0, dense, dense, windows, protocol)

    def measure(sparsity: float) -> float:
        trial = copy.deepcopy(model)
        apply_plan(trial, plan_for(sparsity), backend="torch")
        value = perplexity(trial, tokenizer, sources, window=window, max_windows=windows, protocol=protocol).perplexity
        best.trials.append({"sparsity": sparsity, "perplexity": value, "increase": value / dense - 1.0})
        logger.info("sparsity %.3f: perplexity %.3f (dense %.3f)", sparsity, value, dense)
        return value

    # The upper end first: when it fits, no search is needed.
    value = measure(high)
    if value / dense - 1.0 <= max_increase:
        best.sparsity, best.perplexity = high, value
        return best
    while high - low > tolerance:
        middle = round((low + high) / 2, 6)
        value = measure(middle)
        if value / dense - 1.0 <= max_increase:
            low = middle
            best.sparsity, best.perplexity = middle, value
        else:
            high = middle
    return best
