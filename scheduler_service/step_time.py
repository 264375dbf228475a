"""How long a candidate step will take: the start-up step-time profile plus the recompute cost model.

The policies build a step piece by piece (a decode, a prompt chunk) into a `StepLoad` and ask a
`StepTimePredictor` what it costs; the scheduler asks the same of every step it plans, so the engine
can compare the prediction with the measured time (docs/ARCHITECTURE.md, "Step-time model").
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

from hybrid_cache.info import CostModel, StepCostModel, StepLoad, attended_keys


@dataclass(frozen=True)
class StepTimePredictor:
    """Predicted seconds of a step: `step.seconds(tokens, context, sequences)`, plus the K/V recompute of the
    hidden history (`recompute.fixed_seconds + recompute.seconds_per_token · history`) when there is any."""

    step: StepCostModel
    recompute: CostModel

    def seconds(self, load: StepLoad) -> float:
        seconds = self.step.seconds(load.tokens, load.context, load.sequences)
        if load.hidden_history:
            seconds += self.recompute.fixed_seconds + self.recompute.seconds_per_token * load.hidden_history
        return seconds

    def largest_chunk(self, load: StepLoad, start: int, hidden: bool, limit: int, budget_s: float) -> int:
        """The most tokens (0..`limit`) of a prompt at `start` that `load` can take within `budget_s`.

        The prediction grows with the chunk, so a binary search finds the largest that fits.
        """
        if limit <= 0 or self.seconds(load.plus(1, start, hidden)) > budget_s:
            return 0
        low, high = 1, limit  # low always fits
        while low < high:
            middle = (low + high + 1) // 2
            if self.seconds(load.plus(middle, start, hidden)) <= budget_s:
                low = middle
            else:
                high = middle - 1
        return low


@dataclass(frozen=True)
class StepTimeReport:
    """The step-time model and how well it predicted the steps run so far (seconds).

    `median_*` cover the last `window` steps; the cumulative sums cover all `num_steps`.
    """

    model: StepCostModel | None
    num_steps: int = 0
    predicted_seconds: float = 0.0
    measured_seconds: float = 0.0
    abs_error_seconds: float = 0.0
    median_abs_error_seconds: float | None = None
    median_rel_error: float | None = None  # |predicted - measured| / measured


__all__ = ["StepLoad", "StepTimePredictor", "StepTimeReport", "StepTimeTracker", "attended_keys"]


class StepTimeTracker:
    """Collects (predicted, measured) pairs of the engine's steps."""

    def __init__(self, model: StepCostModel | None, window: int) -> None:
        self.model = model
        self._recent: deque[tuple[float, float]] = deque(maxlen=window)
        self._count = 0
        self._predicted = self._measured = self._abs_error = 0.0

    def record(self, predicted: float, measured: float) -> None:
        self._count += 1
        self._predicted += predicted
        self._measured += measured
        self._abs_error += abs(predicted - measured)
        self._recent.append((predicted, measured))

    def report(self) -> StepTimeReport:
        if not self._recent:
            return StepTimeReport(self.model)
        errors = [abs(p - m) for p, m in self._recent]
        relative = [abs(p - m) / m for p, m in self._recent if m > 0]
        return StepTimeReport(
            self.model, self._count, self._predicted, self._measured, self._abs_error,
            statistics.median(errors), statistics.median(relative) if relative else None,
        )
