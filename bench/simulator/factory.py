"""From a profile, a TP degree and a model name to a step-time model and a cache capacity.

Capacity (tokens of KV per rank): `fitted` takes DistServe's measured vLLM capacity on A100-80GB;
`roofline` estimates `(memory·0.92 − weights/tp) / kv_bytes_per_token`, where 0.92 is the share of
an 80 GiB A100 that DistServe's capacities imply for OPT-13B (TP 1) and OPT-66B (TP 4) (vLLM's
memory-utilization setting less activations); `measured` takes the budget given in blocks.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from bench.simulator.calibration import FittedCoefficients, fitted_coefficients, kv_capacity_tokens
from bench.simulator.hardware import Profile
from bench.simulator.recompute import LinearRecompute, RecomputeCost, RooflineRecompute, VidurRecompute
from bench.simulator.step_time import FittedStepTime, RooflineEfficiency, RooflineStepTime, StepTimeModel

STEP_MODELS = ("fitted", "roofline", "measured")
MEMORY_SHARE = 0.92
MEASURED_FILE = Path(__file__).with_name("measured_cpu.json")


def recompute_cost(profile: Profile, tp: int, source: str = "vidur") -> RecomputeCost | None:
    """The hidden cache's recompute on this profile: `vidur` (measured GPU ops) or `roofline`."""
    device = profile.device
    if device is None:
        return None
    if source == "vidur" and device.vidur_family is not None:
        return VidurRecompute(device, profile.model, tp)
    eff = RooflineEfficiency()
    return RooflineRecompute(device, profile.model, tp, eff.mfu, eff.mbu)


def load_measured(path: Path = MEASURED_FILE) -> tuple[FittedCoefficients, LinearRecompute, dict]:
    """Coefficients `measured.py` fitted to our CPU engine, and the engine's own recompute cost."""
    data = json.loads(path.read_text())
    c = data["coefficients_ms"]
    coeffs = FittedCoefficients(tuple(c["prefill"]), tuple(c["decode_small"]), tuple(c["decode_large"]),
                                int(c["threshold"]))
    cost = data["recompute"]
    return coeffs, LinearRecompute(cost["fixed_seconds"], cost["seconds_per_token"], "engine start-up profile"), data


def build_step_time(name: str, profile: Profile, tp: int, recompute_source: str = "vidur",
                    host_per_seq_ms: float = 0.0, prefill_ms: tuple[float, float, float] | None = None
                    ) -> StepTimeModel:
    """The named step-time model; ValueError when it cannot describe this profile.

    `host_per_seq_ms` and `prefill_ms` adjust the table-driven models (`fitted`, `measured`): a serving
    host's per-sequence cost per decode step, and other prefill coefficients `(a, b, c)` in ms."""
    if name == "measured":
        coeffs, recompute, data = load_measured()
        if profile.model.name != data["model"]:
            raise ValueError(f"the measured model was fitted to {data['model']}, not {profile.model.name}")
        coeffs = replace(coeffs, prefill=prefill_ms) if prefill_ms else coeffs
        return FittedStepTime(coeffs, recompute, name="measured", source=data["source"],
                              host_per_seq_ms=host_per_seq_ms)
    device = profile.device
    if device is None:
        raise ValueError(f"the {name!r} model needs a GPU profile; use --step-model measured for cpu/...")
    recompute = recompute_cost(profile, tp, recompute_source)
    if name == "fitted":
        if device.name != "a100-80g":
            raise ValueError(f"fitted step times exist for a100-80g only, not {device.name}; use roofline")
        try:
            coeffs = fitted_coefficients(profile.model.hf_name, tp)
        except KeyError as err:
            raise ValueError(str(err.args[0])) from None
        coeffs = replace(coeffs, prefill=prefill_ms) if prefill_ms else coeffs
        return FittedStepTime(coeffs, recompute, source="DistServe simdistserve profile_data (vLLM, A100-80GB)",
                              host_per_seq_ms=host_per_seq_ms)
    if name == "roofline":
        return RooflineStepTime(device, profile.model, tp, recompute)
    raise ValueError(f"unknown step-time model {name!r}; choose from {', '.join(STEP_MODELS)}")


def capacity_tokens(name: str, profile: Profile, tp: int) -> int | None:
    """KV tokens per rank the model's memory holds (None for `measured`: give --num-blocks)."""
    if name == "measured" or profile.device is None:
        return None
    if name == "fitted":
        return kv_capacity_tokens(profile.model.hf_name, tp)
    m = profile.model
    free = profile.device.memory_bytes * MEMORY_SHARE - m.num_params * 2 / tp
    if free <= 0:
        raise ValueError(f"{m.name} does not fit on {tp} x {profile.device.name}")
    return int(free // m.kv_bytes_per_token(tp))
