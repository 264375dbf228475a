"""The hidden cache's cost per step: re-projecting K/V from stored `x` over each hidden request's history.

A step that decodes hidden requests (or converts one to KV) runs, in every layer, the K/V projection
over `t` rows: the sum of those requests' histories. Sources:

- `VidurRecompute`: Vidur's measured `attn_pre_proj` (the fused QKV projection) for `t` tokens at TP
  degree `tp`, times the K/V share of its output `2·kv/(H + 2·kv)` (2/3 for multi-head), times the
  layers. The table's model has its own width; the time is scaled by `(H_model / H_table)²`
  (the projection's FLOPs), which is exact when compute-bound (large `t`, where recompute matters).
- `RooflineRecompute`: `max(4·t·H·kv / tp · L / (peak·mfu), weights of Wk, Wv / (bw·mbu))`.
- `LinearRecompute`: `fixed + per_token·t`, the engine's own start-up cost model (this CPU).

`alpha(block_size)` is the marginal seconds one block of hidden history adds to a step: the apt
policy's α, comparable with the α our engine measures at start-up.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from bench.simulator.calibration import vidur_operation
from bench.simulator.hardware import Device, ModelShape


class RecomputeCost(ABC):
    """Seconds to re-project K/V of `tokens` hidden rows through every layer in one step."""

    @abstractmethod
    def seconds(self, tokens: int) -> float: ...

    @abstractmethod
    def describe(self) -> dict[str, object]: ...

    def fixed_seconds(self) -> float:
        """The cost of the smallest recompute (one row): launch and weight-read bound."""
        return self.seconds(1)

    def alpha(self, block_size: int) -> float:
        """Marginal seconds per block of history, measured between 2,048 and 4,096 rows."""
        return (self.seconds(4096) - self.seconds(2048)) / 2048 * block_size


def _kv_share(model: ModelShape) -> float:
    kv = model.num_kv_heads * model.head_dim
    return 2 * kv / (model.hidden_size + 2 * kv)


class VidurRecompute(RecomputeCost):
    """Measured fused-QKV times (Vidur), K/V share, all layers, scaled to the model's width."""

    def __init__(self, device: Device, model: ModelShape, tp: int) -> None:
        if device.vidur_family is None:
            raise ValueError(f"no Vidur tables for {device.name}")
        table_file = "llama-2-7b-mlp" if model.hidden_size <= 4096 else "internlm-20b-mlp"
        self.op = vidur_operation(device.vidur_family, table_file, "attn_pre_proj")
        self.table_file, self.family = table_file, device.vidur_family
        self.model, self.tp = model, tp
        self.scale = _kv_share(model) * model.num_layers * (model.hidden_size / self.op.hidden_size) ** 2

    def seconds(self, tokens: int) -> float:
        return self.op.ms(tokens, self.tp) * self.scale / 1000.0

    def describe(self) -> dict[str, object]:
        return {"source": f"vidur/{self.family}/{self.table_file}.csv attn_pre_proj", "tp": self.tp,
                "scale": self.scale}


class RooflineRecompute(RecomputeCost):
    """The K/V projection's FLOPs or its weights' bytes, whichever bounds it."""

    def __init__(self, device: Device, model: ModelShape, tp: int, mfu: float, mbu: float) -> None:
        self.device, self.model, self.tp, self.mfu, self.mbu = device, model, tp, mfu, mbu

    def seconds(self, tokens: int) -> float:
        m = self.model
        kv = m.num_kv_heads * m.head_dim
        flops = 4 * tokens * m.hidden_size * kv / self.tp * m.num_layers
        weights = 2 * m.hidden_size * kv * 2 / self.tp * m.num_layers
        return max(flops / (self.device.peak_flops * self.mfu), weights / (self.device.hbm_bytes_per_s * self.mbu))

    def describe(self) -> dict[str, object]:
        return {"source": "roofline", "device": self.device.name, "mfu": self.mfu, "mbu": self.mbu}


class LinearRecompute(RecomputeCost):
    """`fixed + per_token·t` seconds, as the engine's start-up profile fits it."""

    def __init__(self, fixed_seconds: float, seconds_per_token: float, source: str) -> None:
        self.fixed, self.per_token, self.source = fixed_seconds, seconds_per_token, source

    def seconds(self, tokens: int) -> float:
        return self.fixed + self.per_token * tokens

    def describe(self) -> dict[str, object]:
        return {"source": self.source, "fixed_seconds": self.fixed, "seconds_per_token": self.per_token}
