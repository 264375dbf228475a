"""Seeded arrival traces: Gamma-distributed inter-arrival gaps (docs/BENCHMARK_METHOD.md).

A trace with rate `r` and coefficient of variation `cv` has gaps with mean `1/r` and standard deviation
`cv/r`: a Gamma distribution with shape `1/cv²` and scale `cv²/r`. `cv = 1` is a Poisson process;
vLLM's `--burstiness` is `1/cv²`.
"""

from __future__ import annotations

import math

import numpy as np


def _check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def arrival_times(rate: float, cv: float, num_requests: int, seed: int) -> list[float]:
    """Return `num_requests` increasing arrival times in seconds, the first one equal to the first gap.

    The same arguments always give the same trace (numpy's default Generator seeded with `seed`).
    Raises ValueError for a non-positive rate or cv, or a negative/non-integer number of requests.
    """
    _check_positive("rate", rate)
    _check_positive("cv", cv)
    if isinstance(num_requests, bool) or not isinstance(num_requests, (int, np.integer)) or num_requests < 0:
        raise ValueError(f"num_requests must be an integer >= 0, got {num_requests!r}")
    if num_requests == 0:
        return []
    rng = np.random.default_rng(seed)
    shape = 1.0 / (cv * cv)
    scale = (cv * cv) / rate
    gaps = rng.gamma(shape, scale, size=int(num_requests))
    return [float(t) for t in np.cumsum(gaps)]
