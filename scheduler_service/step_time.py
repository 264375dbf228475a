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
    hidden history (`recompute.fixed_seconds + recompute.seconds_per_token · history`) when there is any,
    times `scale`: the online correction (`StepTimeTracker.scale`; 1 until steps have been measured)."""

    step: StepCostModel
    recompute: CostModel
    scale: float = 1.0

    def seconds(self, load: StepLoad) -> float:
        seconds = self.step.seconds(load.tokens, load.context, load.sequences)
        if load.hidden_history:
            seconds += self.recompute.fixed_seconds + self.recompute.seconds_per_token * load.hidden_history
        return seconds * self.scale

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
    scale: float = 1.0  # what the model's predictions are multiplied by now (`StepTimeTracker.scale`)
    num_steps: int = 0
    predicted_seconds: float = 0.0
    measured_seconds: float = 0.0
    abs_error_seconds: float = 0.0
    median_abs_error_seconds: float | None = None
    median_rel_error: float | None = None  # |predicted - measured| / measured


__all__ = ["StepLoad", "StepTimePredictor", "StepTimeReport", "StepTimeTracker", "attended_keys"]


class StepTimeTracker:
    """Collects (predicted, measured) pairs of the engine's steps, and the online correction of the model.

    The start-up profile times each step shape at its best, on an idle host; a serving engine shares its
    cores with the ingress and the clients' streams, so its steps run longer (on the 2-core development
    machine, 1.4-1.7x the prediction over a benchmark run). `scale` is the median of measured ÷ the model's own
    prediction over the last `window` steps: multiplying by it keeps the prediction's shape (tokens,
    context) and takes its level from what the steps really cost (docs/ARCHITECTURE.md, "Step-time model").
    """

    def __init__(self, model: StepCostModel | None, window: int) -> None:
        self.model = model
        self._recent: deque[tuple[float, float]] = deque(maxlen=window)
        self._ratios: deque[float] = deque(maxlen=window)  # measured ÷ unscaled prediction
        self._count = 0
        self._predicted = self._measured = self._abs_error = 0.0

    def record(self, predicted: float, measured: float, scale: float = 1.0) -> None:
        """One step: its prediction (made with `scale`) and its measured seconds."""
        self._count += 1
        self._predicted += predicted
        self._measured += measured
        self._abs_error += abs(predicted - measured)
        self._recent.append((predicted, measured))
        if predicted > 0 and measured > 0 and scale > 0:  # a clock that did not move measured nothing
            self._ratios.append(measured * scale / predicted)

    def scale(self) -> float:
        """The correction for the next predictions: median measured ÷ model over the recent steps (1 before any)."""
        return statistics.median(self._ratios) if self._ratios else 1.0

    def report(self, scale: float = 1.0) -> StepTimeReport:
        """The report, with `scale` the correction in use (1 when the engine does not adapt the model)."""
        if not self._recent:
            return StepTimeReport(self.model, scale)
        errors = [abs(p - m) for p, m in self._recent]
        relative = [abs(p - m) / m for p, m in self._recent if m > 0]
        return StepTimeReport(
            self.model, scale, self._count, self._predicted, self._measured, self._abs_error,
            statistics.median(errors), statistics.median(relative) if relative else None,
        )
