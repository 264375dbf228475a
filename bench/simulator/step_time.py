"""How long one engine step takes, from its batch plan: the step-time models, selectable by name.

Every model answers `seconds(shape)` for a `StepShape` (what a plan asks the workers to compute) and
adds the hidden cache's K/V recompute through a `RecomputeCost` (see `recompute.py`). The formulas:

- `fitted` (`FittedStepTime` with DistServe's vLLM coefficients, A100-80GB, OPT-13B/66B), in ms:
  prefill-only `a + b·Σp + c·Σp²` (p: each prompt's tokens); decode-only `a + b·Σctx + c·n`
  (ctx: each sequence's context, n: sequences; small- or large-batch coefficients by n);
  a mixed step (decodes riding on a prefill) costs the prefill with the n decode tokens added to its
  token count, plus the decode attention `b_decode·Σctx`: one pass over the weights, not two.
  Optionally `h·n` more for a serving host's per-sequence work the forward-pass fits leave out
  (`host_per_seq_ms`; 0 by default, see `validate.py` for where a value comes from).
- `measured`: the same formulas with coefficients fitted to our own engine on this CPU (`measured.py`).
- `roofline` (`RooflineStepTime`): `overhead + n·per_seq + max(FLOPs / (peak·mfu), bytes / (bw·mbu))
  + 2·L·allreduce(tokens·H·2 bytes)`, FLOPs `2·params/tp·tokens + (2·L·H·Σp² + 4·L·H·Σctx)/tp`, bytes
  `params·2/tp + (Σctx + tokens)·kv_bytes_per_token/tp`; all-reduce times from Vidur's DGX table.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from bench.simulator.calibration import FittedCoefficients, all_reduce_ms
from bench.simulator.hardware import Device, ModelShape
from bench.simulator.recompute import RecomputeCost
from hybrid_cache.plan import BatchPlan, CacheType


@dataclass(frozen=True)
class StepShape:
    """What one plan computes: prompts prefilled, sequences decoded, hidden history recomputed."""

    num_prefill: int = 0
    prefill_tokens: int = 0  # Σ p
    prefill_sq: int = 0  # Σ p²
    num_decode: int = 0
    decode_context: int = 0  # Σ ctx (tokens attended over, the new one included)
    recompute_tokens: int = 0  # Σ hidden history re-projected to K/V (and conversions' tokens)

    @classmethod
    def of(cls, plan: BatchPlan) -> StepShape:
        """A sequence whose plan starts at position 0 or computes several tokens is a prefill."""
        n_pre = pre_tok = pre_sq = n_dec = dec_ctx = recompute = 0
        for seq in plan.seqs:
            new = len(seq.token_ids)
            if seq.start_pos == 0 or new > 1:
                n_pre += 1
                pre_tok += new
                pre_sq += new * new
            else:
                n_dec += 1
                dec_ctx += seq.start_pos + new
            if seq.cache_type is CacheType.HIDDEN:
                recompute += seq.start_pos
            if seq.conversion is not None:
                recompute += seq.conversion.num_tokens
        return cls(n_pre, pre_tok, pre_sq, n_dec, dec_ctx, recompute)


class StepTimeModel(ABC):
    """Seconds of one step. `recompute` adds the hidden cache's K/V recompute (None: not modelled)."""

    name: str

    def __init__(self, recompute: RecomputeCost | None) -> None:
        self.recompute = recompute

    @abstractmethod
    def compute_seconds(self, shape: StepShape) -> float:
        """The step without recompute."""

    def seconds(self, shape: StepShape) -> float:
        extra = self.recompute.seconds(shape.recompute_tokens) if self.recompute and shape.recompute_tokens else 0.0
        return self.compute_seconds(shape) + extra

    def describe(self) -> dict[str, object]:
        """The model's name, coefficients and recompute source, for a result file."""
        return {"name": self.name, "recompute": self.recompute.describe() if self.recompute else None}


class FittedStepTime(StepTimeModel):
    """Table-driven step time (ms coefficients); `name` is `fitted` (vLLM on A100) or `measured` (this CPU)."""

    def __init__(self, coefficients: FittedCoefficients, recompute: RecomputeCost | None, name: str = "fitted",
                 source: str = "", host_per_seq_ms: float = 0.0) -> None:
        super().__init__(recompute)
        self.c = coefficients
        self.name = name
        self.source = source
        self.host_per_seq_ms = host_per_seq_ms

    def _decode(self, n: int) -> tuple[float, float, float]:
        return self.c.decode_large if n >= self.c.threshold else self.c.decode_small

    def compute_seconds(self, s: StepShape) -> float:
        pa, pb, pc = self.c.prefill
        if s.num_prefill and s.num_decode:
            db = self._decode(s.num_decode)[1]
            ms = pa + pb * (s.prefill_tokens + s.num_decode) + pc * s.prefill_sq + db * s.decode_context
        elif s.num_prefill:
            ms = pa + pb * s.prefill_tokens + pc * s.prefill_sq
        elif s.num_decode:
            da, db, dc = self._decode(s.num_decode)
            ms = da + db * s.decode_context + dc * s.num_decode
        else:
            ms = 0.0
        return (ms + self.host_per_seq_ms * s.num_decode) / 1000.0

    def describe(self) -> dict[str, object]:
        return super().describe() | {"coefficients_ms": self.c.__dict__, "source": self.source,
                                     "host_per_seq_ms": self.host_per_seq_ms}


@dataclass(frozen=True)
class RooflineEfficiency:
    """What share of the peaks real kernels reach, and the per-step and per-sequence host overheads.

    Derived once from DistServe's vLLM fit for OPT-13B on one A100-80GB and carried to other devices:
    prefill slope 0.1405 ms/token = 2·12.8e9 FLOP / (312 TFLOP/s · mfu) → mfu 0.59; decode slope
    0.00059 ms per context token = 819,200 KV bytes / (2,039 GB/s · mbu) → mbu 0.68; decode intercept
    23.5 ms = 25.7 GB of weights / (2,039 GB/s · 0.68) + 5 ms of overhead; 0.06 ms per sequence.
    """

    mfu: float = 0.59
    mbu: float = 0.68
    step_overhead_s: float = 5e-3
    per_seq_s: float = 6e-5


class RooflineStepTime(StepTimeModel):
    """Compute-or-memory bound per step, plus TP all-reduces measured by Vidur (see the module doc)."""

    name = "roofline"

    def __init__(self, device: Device, model: ModelShape, tp: int, recompute: RecomputeCost | None,
                 efficiency: RooflineEfficiency = RooflineEfficiency(), dtype_bytes: int = 2) -> None:
        super().__init__(recompute)
        self.device, self.model, self.tp, self.eff, self.dtype_bytes = device, model, tp, efficiency, dtype_bytes
        self.weight_bytes = model.num_params * dtype_bytes / tp
        self.kv_bytes = model.kv_bytes_per_token(tp, dtype_bytes)

    def compute_seconds(self, s: StepShape) -> float:
        if not (s.num_prefill or s.num_decode):
            return 0.0
        m, tp = self.model, self.tp
        tokens = s.prefill_tokens + s.num_decode
        flops = 2 * m.num_params / tp * tokens + (2 * m.num_layers * m.hidden_size * s.prefill_sq
                                                  + 4 * m.num_layers * m.hidden_size * s.decode_context) / tp
        memory = self.weight_bytes + (s.decode_context + tokens) * self.kv_bytes
        device = self.device
        busy = max(flops / (device.peak_flops * self.eff.mfu), memory / (device.hbm_bytes_per_s * self.eff.mbu))
        comm = 0.0
        if tp > 1:
            family = self.device.vidur_family or "a100"
            comm = 2 * m.num_layers * all_reduce_ms(family, tokens * m.hidden_size * self.dtype_bytes, tp) / 1000.0
        return self.eff.step_overhead_s + (s.num_prefill + s.num_decode) * self.eff.per_seq_s + busy + comm

    def describe(self) -> dict[str, object]:
        return super().describe() | {"device": self.device.name, "source": self.device.source,
                                     "efficiency": self.eff.__dict__, "tp": self.tp}
