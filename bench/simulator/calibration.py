"""Readers of the published GPU measurements in `calibration/` (its README gives sources and licenses).

- `fitted_coefficients`: DistServe's fits of vLLM's step time on A100-80GB (milliseconds);
- `kv_capacity_tokens`: tokens of KV cache that fit, per model and TP degree (DistServe);
- `VidurTable`: Microsoft Vidur's per-operation times (ms) by token count and TP degree, and its
  all-reduce times by bytes and GPUs on DGX nodes.

The folder is `$APTSERVE_CALIBRATION` if set, else the repository's `calibration/`.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def calibration_dir() -> Path:
    """The calibration folder; FileNotFoundError saying where it was looked for if absent."""
    env = os.environ.get("APTSERVE_CALIBRATION")
    path = Path(env) if env else REPO / "calibration"
    if not path.is_dir():
        raise FileNotFoundError(f"calibration data not found at {path} (set APTSERVE_CALIBRATION)")
    return path


@dataclass(frozen=True)
class FittedCoefficients:
    """vLLM's step time in ms: prefill `a + b·Σtokens + c·Σlen²`; decode `a + b·Σcontext + c·batch`,
    with the large-batch coefficients from `threshold` requests on."""

    prefill: tuple[float, float, float]
    decode_small: tuple[float, float, float]
    decode_large: tuple[float, float, float]
    threshold: int


@cache
def fitted_coefficients(hf_name: str, tp: int, engine: str = "vllm") -> FittedCoefficients:
    """The fit for `hf_name` at TP `tp`; KeyError listing what exists when there is none."""
    table = json.loads((calibration_dir() / "a100-80g-opt" / f"step-time-{engine}.json").read_text())
    if hf_name not in table or str(tp) not in table[hf_name]:
        have = {m: sorted(v) for m, v in table.items()}
        raise KeyError(f"no fitted {engine} step time for {hf_name} at TP {tp} (have {have}); use --model roofline")
    row = table[hf_name][str(tp)]
    return FittedCoefficients(tuple(row["prefill"]), tuple(row["decoding_smallbs"]),  # type: ignore[arg-type]
                              tuple(row["decoding_largebs"]), int(row["decoding_large_small_bs_threshold"]))


@cache
def kv_capacity_tokens(hf_name: str, tp: int, pp: int = 1) -> int:
    """Tokens of KV cache vLLM fits on A100-80GB for the model at (tp, pp); KeyError if not listed."""
    with open(calibration_dir() / "a100-80g-opt" / "kv-capacity-tokens.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["model"] == hf_name and int(row["tp"]) == tp and int(row["pp"]) == pp:
                return int(row["max_num_tokens"])
    raise KeyError(f"no KV capacity listed for {hf_name} at TP {tp}, PP {pp}")


class VidurOperation:
    """One operation's median time (ms) by token count, per TP degree, piecewise linear in tokens.

    Beyond the largest profiled count (4,096) the time grows linearly with the slope of the last
    doubling (the GEMM is compute-bound there).
    """

    def __init__(self, tokens_by_tp: dict[int, tuple[np.ndarray, np.ndarray]], hidden_size: int) -> None:
        self._table = tokens_by_tp
        self.hidden_size = hidden_size

    def ms(self, num_tokens: float, tp: int) -> float:
        if tp not in self._table:
            raise KeyError(f"Vidur profiled TP {sorted(self._table)}, not {tp}")
        tokens, times = self._table[tp]
        if num_tokens <= tokens[-1]:
            return float(np.interp(num_tokens, tokens, times))
        half = np.searchsorted(tokens, tokens[-1] / 2)
        slope = (times[-1] - times[half]) / (tokens[-1] - tokens[half])
        return float(times[-1] + slope * (num_tokens - tokens[-1]))


@cache
def vidur_operation(family: str, model_file: str, operation: str) -> VidurOperation:
    """`operation` (e.g. `attn_pre_proj`) from `vidur/{family}/{model_file}.csv`."""
    rows: dict[int, list[tuple[int, float]]] = {}
    hidden = 0
    with open(calibration_dir() / "vidur" / family / f"{model_file}.csv", newline="") as f:
        for row in csv.DictReader(f):
            tp = int(row["num_tensor_parallel_workers"])
            rows.setdefault(tp, []).append((int(row["num_tokens"]), float(row[f"time_stats.{operation}.median"])))
            hidden = int(row["n_embd"])
    table = {}
    for tp, pairs in rows.items():
        pairs.sort()
        table[tp] = (np.array([p[0] for p in pairs], float), np.array([p[1] for p in pairs], float))
    return VidurOperation(table, hidden)


@cache
def _all_reduce_rows(family: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    rows: dict[int, list[tuple[int, float]]] = {}
    with open(calibration_dir() / "vidur" / family / "all-reduce-dgx.csv", newline="") as f:
        for row in csv.DictReader(f):
            workers = int(row["num_workers"])
            if int(row["devices_per_node"]) != workers:
                continue  # only all-reduces within one node (NVLink)
            rows.setdefault(workers, []).append((int(row["size"]), float(row["time_stats.all_reduce.median"])))
    return {w: (np.array([p[0] for p in sorted(v)], float), np.array([p[1] for p in sorted(v)], float))
            for w, v in rows.items()}


def all_reduce_ms(family: str, num_bytes: float, workers: int) -> float:
    """Measured all-reduce time of `num_bytes` over `workers` GPUs of one DGX node (0 for one GPU).

    Interpolated linearly in bytes; beyond the largest profiled size, scaled in proportion to bytes.
    """
    if workers <= 1:
        return 0.0
    table = _all_reduce_rows(family)
    if workers not in table:
        raise KeyError(f"Vidur's {family} all-reduce table has {sorted(table)} GPUs, not {workers}")
    sizes, times = table[workers]
    if num_bytes > sizes[-1]:
        return float(times[-1] * num_bytes / sizes[-1])
    return float(np.interp(num_bytes, sizes, times))
