"""The measured vLLM traces load in the workload's order, their records reproduce what vLLM measured,
and the simulator stays within its recorded error on the lightest trace (docs/SIMULATOR.md)."""

from __future__ import annotations

import json

import pytest

from bench.simulator.api import SimConfig
from bench.simulator.calibration import calibration_dir
from bench.simulator.validate import compare, load_trace

FOLDER = calibration_dir() / "a100-80g-opt" / "vllm-measured"  # in the repository: never skipped


def test_measured_records_reproduce_the_measured_ttft_and_tpot() -> None:
    trace = load_trace("vllm-100-1")
    raw = sorted(json.loads((FOLDER / "vllm-100-1.measured.json").read_text()), key=lambda r: r["issue_time"])
    assert len(trace.measured) == len(trace.workload) == 100
    for record, row in zip(trace.measured, raw):
        assert record.ttft * 1000 == pytest.approx(row["ttft_ms"], abs=1e-6)
        if row["output_len"] > 1:
            assert record.tpot * 1000 == pytest.approx(row["tpot_ms"], rel=1e-6)


def test_fitted_vllm_model_on_the_lightest_trace_stays_within_its_recorded_error() -> None:
    result = compare(load_trace("vllm-100-1"), SimConfig(profile="a100-80g/opt-13b", tp=1, policy="fcfs", cache="kv"))
    error = result["error"]
    assert result["measured"]["goodput_fraction"] == pytest.approx(0.68)
    assert abs(error["goodput_fraction"]) <= 0.10
    assert abs(error["tpot_p50_s"]) <= 0.10
    assert abs(error["ttft_p50_s"]) <= 0.25
