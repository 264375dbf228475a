"""The simulator drives the production scheduler on a virtual clock: its timings follow the step-time
model exactly, a change to a policy changes its results, and the hidden cache costs recompute."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.simulator.api import SimConfig, simulate
from bench.simulator.calibration import FittedCoefficients
from bench.simulator.factory import build_step_time
from bench.simulator.hardware import parse_profile
from bench.simulator.loop import TraceRequest
from bench.simulator.step_time import FittedStepTime, StepShape
from hybrid_cache.plan import BatchPlan, CacheType, Conversion, SamplingParams, SequencePlan
from scheduler_service.policies.base import ScheduleDecision, SchedulerView
from scheduler_service.policies.fcfs import FCFSPolicy

COEFFS = FittedCoefficients(prefill=(20.0, 0.1, 1e-5), decode_small=(25.0, 0.001, 0.1),
                            decode_large=(20.0, 0.002, 0.2), threshold=4)


def _seq(start: int, new: int, cache_type: CacheType = CacheType.KV, conversion: Conversion | None = None):
    return SequencePlan(seq_id=start * 1000 + new, token_ids=[0] * new, start_pos=start, cache_type=cache_type,
                        block_table=[], sampling=SamplingParams(), conversion=conversion)


def test_step_shape_reads_prefills_decodes_and_recompute_from_the_plan() -> None:
    plan = BatchPlan([_seq(0, 100), _seq(0, 30, CacheType.HIDDEN), _seq(50, 1), _seq(70, 1, CacheType.HIDDEN),
                      _seq(40, 1, conversion=Conversion([], [], 40))])
    shape = StepShape.of(plan)
    assert (shape.num_prefill, shape.prefill_tokens, shape.prefill_sq) == (2, 130, 100**2 + 30**2)
    assert (shape.num_decode, shape.decode_context) == (3, 51 + 71 + 41)
    assert shape.recompute_tokens == 70 + 40  # a hidden decode's history and a conversion; not a prefill


def test_fitted_formulas_for_prefill_decode_and_mixed_steps() -> None:
    model = FittedStepTime(COEFFS, recompute=None)
    prefill = StepShape(num_prefill=2, prefill_tokens=300, prefill_sq=200**2 + 100**2)
    assert model.seconds(prefill) * 1000 == pytest.approx(20 + 0.1 * 300 + 1e-5 * 50_000)
    small = StepShape(num_decode=3, decode_context=3000)
    assert model.seconds(small) * 1000 == pytest.approx(25 + 0.001 * 3000 + 0.1 * 3)
    large = StepShape(num_decode=4, decode_context=4000)
    assert model.seconds(large) * 1000 == pytest.approx(20 + 0.002 * 4000 + 0.2 * 4)
    mixed = StepShape(num_prefill=1, prefill_tokens=100, prefill_sq=10_000, num_decode=3, decode_context=3000)
    assert model.seconds(mixed) * 1000 == pytest.approx(20 + 0.1 * 103 + 1e-5 * 10_000 + 0.001 * 3000)


def test_a_lone_request_sees_exactly_the_modelled_step_times() -> None:
    config = SimConfig(profile="a100-80g/opt-13b", tp=1, step_model="fitted")
    model = build_step_time("fitted", parse_profile(config.profile), 1)
    record = simulate(config, [TraceRequest(prompt_len=500, output_len=5, arrival=3.0)]).records[0]
    assert record.finished and record.num_tokens == 5
    assert record.ttft == pytest.approx(model.seconds(StepShape(1, 500, 250_000)))
    gaps = [model.seconds(StepShape(num_decode=1, decode_context=500 + i)) for i in range(1, 5)]
    assert record.gaps == pytest.approx(gaps)
    assert record.arrival == 3.0 and record.first_token_time > 3.0


def _memory_bound_trace(n: int = 40) -> list[TraceRequest]:
    return [TraceRequest(prompt_len=200 + 37 * (i % 7), output_len=40 + 11 * (i % 5), arrival=0.02 * i)
            for i in range(n)]


def _ttfts(config: SimConfig) -> list[float]:
    return [r.ttft for r in simulate(config, _memory_bound_trace()).records]


SMALL = SimConfig(profile="a100-80g/opt-13b", tp=1, num_blocks=120, ttft_slo_s=0.5, tbt_slo_s=0.1)


def test_a_change_to_the_production_policy_changes_the_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    before = _ttfts(SMALL)
    original = FCFSPolicy.schedule

    def prefill_only(self: FCFSPolicy, view: SchedulerView) -> ScheduleDecision:
        decision = original(self, view)
        if decision.prefill:
            decision.decode = []  # a step either prefills or decodes
        return decision

    monkeypatch.setattr(FCFSPolicy, "schedule", prefill_only)
    after = _ttfts(SMALL)
    assert after != before
    assert all(t is not None for t in after)


def test_policies_and_cache_modes_give_different_outcomes_when_memory_binds() -> None:
    fcfs = simulate(SMALL, _memory_bound_trace())
    apt = simulate(SMALL.model_copy(update={"policy": "apt"}), _memory_bound_trace())
    hybrid = simulate(SMALL.model_copy(update={"policy": "apt", "cache": "hybrid"}), _memory_bound_trace())
    assert [r.ttft for r in fcfs.records] != [r.ttft for r in apt.records]
    assert all(r.finished for r in fcfs.records + apt.records + hybrid.records)
    assert hybrid.tokens_by_cache_type["hidden"] > 0
    assert hybrid.step_stats.recompute_seconds > 0 and hybrid.alpha > 0
    assert fcfs.step_stats.recompute_seconds == 0


def test_capacity_comes_from_the_measured_table_and_hybrid_reserves_the_workspace() -> None:
    trace = [TraceRequest(10, 2, 0.0)]
    kv = simulate(SimConfig(profile="a100-80g/opt-13b", tp=1), trace)
    assert kv.num_blocks == 66144 // 16  # DistServe's vLLM capacity for OPT-13B on one A100-80GB
    hybrid = simulate(SimConfig(profile="a100-80g/opt-13b", tp=1, cache="hybrid"), trace)
    assert 0 < kv.num_blocks - hybrid.num_blocks < 100


def test_roofline_grows_with_work_and_pays_for_tensor_parallel_all_reduces() -> None:
    profile = parse_profile("a100-80g/opt-66b")
    tp4, tp8 = build_step_time("roofline", profile, 4), build_step_time("roofline", profile, 8)
    small, big = StepShape(num_decode=8, decode_context=8000), StepShape(num_decode=64, decode_context=64_000)
    assert tp4.seconds(big) > tp4.seconds(small) > 0
    assert tp8.seconds(small) < tp4.seconds(small)  # half the weights per GPU outweighs the all-reduces
    fitted = build_step_time("fitted", profile, 4)
    assert tp4.seconds(small) == pytest.approx(fitted.seconds(small), rel=0.5)  # the same order as measured


def test_fitted_refuses_a_device_it_has_no_measurements_for() -> None:
    with pytest.raises(ValueError, match="roofline"):
        build_step_time("fitted", parse_profile("h100-80g/llama-2-7b"), 1)


def test_cli_replays_a_workload_file_in_its_order(tmp_path) -> None:  # noqa: ANN001 - pytest's tmp_path
    from bench.simulator.cli import main

    workload = [{"prompt_len": 900, "output_len": 20, "start_time": 0.5},
                {"prompt_len": 50, "output_len": 3, "start_time": 0.0}]
    (tmp_path / "w.workload.json").write_text(json.dumps(workload))
    out = tmp_path / "out.json"
    assert main(["--profile", "a100-80g/opt-13b", "--tp", "1", "--policy", "fcfs", "--cache", "kv",
                 "--workload", str(tmp_path / "w.workload.json"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["prompt_len"], r["output_len"]) for r in rows] == [(900, 20), (50, 3)]
    assert rows[0]["ttft_ms"] > rows[1]["ttft_ms"] > 0 and rows[0]["tpot_ms"] > 0


def test_a_rate_sweep_finds_the_rate_where_attainment_breaks() -> None:
    from bench.datasets import Sample
    from bench.simulator.project import crossing
    from bench.simulator.sweep import sweep
    from bench.slo_metrics import SLO

    samples = [Sample(prompt="", prompt_len=300 + 50 * (i % 5), output_len=30) for i in range(60)]
    slo = SLO(ttft_s=0.3, tbt_s=0.2)
    config = SimConfig(profile="a100-80g/opt-13b", tp=1, ttft_slo_s=0.3, tbt_slo_s=0.2)
    result = sweep(config, samples, [0.5, 2.0, 200.0], cv=1.0, seed=0, slo=slo)
    attainment = result["attainment_by_rate"]
    assert attainment[0.5] == 1.0 and attainment[200.0] < 0.5
    assert result["effective_throughput"] in (0.5, 2.0)
    assert set(result["probes"]) == {"0.5", "2.0", "200.0"}
    assert crossing({1.0: 1.0, 2.0: 0.8}) == pytest.approx(1.5)
    assert crossing({1.0: 0.5}) == 0.0


def test_decompose_counts_the_prefills_that_land_inside_a_decode() -> None:
    """`bench.simulator.decompose.features`: a request whose first token comes while another decodes
    stalls it by its prefill time (the fitted line); one that comes after it ended does not."""
    from bench.simulator.decompose import features
    from bench.slo_metrics import RequestRecord

    def record(i: int, first: float, last: float, prompt: int, tokens: int) -> RequestRecord:
        times = list(np.linspace(first, last, tokens))
        return RequestRecord(str(i), arrival=first - 0.1, first_token_time=first, token_times=times,
                             finished=True, prompt_len=prompt, output_len=tokens)

    records = [record(0, 1.0, 2.0, 100, 11), record(1, 1.5, 1.8, 200, 4), record(2, 3.0, 3.5, 50, 6)]
    rows = features(records, (10.0, 0.1, 0.0))  # prefill ms = 10 + 0.1·p
    steps, n_sum, _, stall, landed, decode = rows[0]
    assert (steps, landed, decode) == (10, 1, pytest.approx(1.0))
    assert stall == pytest.approx((10 + 0.1 * 200) / 1000)
    assert n_sum >= steps  # itself at every step, plus request 1 during part of it
    assert rows[2][4] == 0 and rows[2][3] == 0.0  # nothing landed in the last one
