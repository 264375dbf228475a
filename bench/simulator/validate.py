"""The simulator against reality: replay measured vLLM traces and compare per request.

    .venv/bin/python -m bench.simulator.validate [--out docs/images/simulator] [--json FILE]

Each `vllm-measured/vllm-N-R.workload.json` (OPT-13B, one A100-80GB, ShareGPT, N requests at R req/s)
is simulated with fcfs/kv and compared with its `.measured.json`: attainment of TTFT < 200 ms and
TPOT < 100 ms (vLLM-style goodput), and the median and P90 of TTFT and TPOT — all computed by
`bench.slo_metrics.summarize` on both sides (a measured request becomes a record with its tokens spread
evenly between its first token and its completion, which reproduces its TTFT and TPOT exactly).

Two step-time settings are reported:
- `fitted`: DistServe's vLLM table as published;
- `fitted+host`: the same table with two corrections calibrated on the lightest trace only
  (vllm-100-1), the other three traces held out: the prefill slope refitted to its requests that arrived
  more than 1 s after the previous one, the intercept and a per-sequence host cost per decode step
  chosen so that its median TTFT and TPOT match (`calibrate`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.simulator.api import SimConfig, simulate
from bench.simulator.calibration import calibration_dir
from bench.simulator.loop import TraceRequest
from bench.slo_metrics import SLO, RequestRecord, summarize
from scheduler_service.policies.base import ScheduleDecision, SchedulerView
from scheduler_service.policies.fcfs import FCFSPolicy

SLO_VLLM = SLO(ttft_s=0.2, tbt_s=0.1)
TRACES = ("vllm-100-1", "vllm-100-2", "vllm-150-1.5", "vllm-200-2")
TRAIN_TRACE = "vllm-100-1"
METRICS = ("goodput_fraction", "ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s")


@dataclass
class Trace:
    """A measured trace: the workload to simulate and what vLLM measured, in the same order."""

    name: str
    workload: list[TraceRequest]
    measured: list[RequestRecord]
    issue_gaps: list[float]  # seconds since the previous request's issue


def load_workload(path: Path) -> list[TraceRequest]:
    """A `*.workload.json`: a list of {prompt_len, output_len, start_time (s)}."""
    return [TraceRequest(int(r["prompt_len"]), int(r["output_len"]), float(r["start_time"]))
            for r in json.loads(Path(path).read_text())]


def load_trace(name: str, folder: Path | None = None) -> Trace:
    folder = folder or calibration_dir() / "a100-80g-opt" / "vllm-measured"
    workload = load_workload(folder / f"{name}.workload.json")
    measured = sorted(json.loads((folder / f"{name}.measured.json").read_text()), key=lambda r: r["issue_time"])
    if [(r["prompt_len"], r["output_len"]) for r in measured] != [(w.prompt_len, w.output_len) for w in workload]:
        raise ValueError(f"{name}: measured requests do not match the workload in issue order")
    t0 = measured[0]["issue_time"]
    records = [measured_record(i, r, t0) for i, r in enumerate(measured)]
    gaps = [9e9] + [b["issue_time"] - a["issue_time"] for a, b in zip(measured, measured[1:])]
    return Trace(name, workload, records, gaps)


def measured_record(index: int, row: dict, t0: float) -> RequestRecord:
    """A measured request as a record: tokens evenly spaced from the first token to completion."""
    n = int(row["output_len"])
    first, last = row["first_token_time"] - t0, row["complete_time"] - t0
    times = list(np.linspace(first, last, n)) if n > 1 else [first]
    return RequestRecord(request_id=str(index), arrival=row["issue_time"] - t0, first_token_time=first,
                         token_times=[float(t) for t in times], finished=True, prompt_len=int(row["prompt_len"]),
                         output_len=n)


def metrics(records: list[RequestRecord], duration_s: float) -> dict[str, float]:
    summary = summarize(records, SLO_VLLM, duration_s)
    return {k: float(summary[k]) for k in METRICS}  # type: ignore[arg-type]


def compare(trace: Trace, config: SimConfig) -> dict[str, dict[str, float]]:
    """Simulated and measured metrics, and the error of each (absolute for attainment, relative else)."""
    result = simulate(config, trace.workload)
    duration = max(w.arrival for w in trace.workload) or 1.0
    sim, real = metrics(result.records, duration), metrics(trace.measured, duration)
    error = {k: (sim[k] - real[k]) if k == "goodput_fraction" else (sim[k] - real[k]) / real[k] for k in METRICS}
    return {"simulated": sim, "measured": real, "error": error}


def refit_prefill(trace: Trace, min_gap_s: float = 1.0) -> tuple[float, float, float]:
    """A line `a + b·p` (ms) through the TTFT of requests that arrived `min_gap_s` after the previous one."""
    rows = [(r.prompt_len, r.ttft * 1000) for r, gap in zip(trace.measured, trace.issue_gaps)
            if gap > min_gap_s and r.ttft is not None]
    p = np.array([x for x, _ in rows], float)
    design = np.stack([np.ones_like(p), p], axis=1)
    a, b = np.linalg.lstsq(design, np.array([y for _, y in rows]), rcond=None)[0]
    return float(a), float(b), 0.0


def _bisect(run, target: float, low: float, high: float, iterations: int = 12) -> float:
    """The x in [low, high] where the increasing function `run(x)` meets `target`."""
    for _ in range(iterations):
        mid = (low + high) / 2
        low, high = (mid, high) if run(mid) < target else (low, mid)
    return (low + high) / 2


def calibrate(trace: Trace, base: SimConfig) -> SimConfig:
    """`base` tuned on `trace` alone: the prefill slope from its lone requests, the prefill intercept
    bisected to its median TTFT, then the host cost per decoding sequence bisected to its median TPOT."""
    real = metrics(trace.measured, 1.0)
    _, slope, _ = refit_prefill(trace)

    def sim(config: SimConfig, key: str) -> float:
        return metrics(simulate(config, trace.workload).records, 1.0)[key]

    intercept = _bisect(lambda a: sim(base.model_copy(update={"prefill_ms": (a, slope, 0.0)}), "ttft_p50_s"),
                        real["ttft_p50_s"], 0.0, 100.0)
    config = base.model_copy(update={"prefill_ms": (round(intercept, 3), round(slope, 5), 0.0)})
    host = _bisect(lambda h: sim(config.model_copy(update={"host_per_seq_ms": h}), "tpot_p50_s"),
                   real["tpot_p50_s"], 0.0, 5.0)
    return config.model_copy(update={"host_per_seq_ms": round(host, 4)})


@contextmanager
def prefill_only_steps() -> Iterator[None]:
    """A what-if, not our engine: the production FCFS decision with its decodes dropped whenever it
    admits someone, so that a step is prefill-only or decode-only as in vLLM before chunked prefill."""
    original = FCFSPolicy.schedule

    def schedule(self: FCFSPolicy, view: SchedulerView) -> ScheduleDecision:
        decision = original(self, view)
        if decision.prefill:
            decision.decode = []
        return decision

    FCFSPolicy.schedule = schedule  # type: ignore[method-assign]
    try:
        yield
    finally:
        FCFSPolicy.schedule = original  # type: ignore[method-assign]


def error_table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown: per setting and trace, simulated / measured / error for every metric."""
    lines = ["| setting | trace | attainment sim / real (err) | TTFT p50 ms | TTFT p90 ms | TPOT p50 ms "
             "| TPOT p90 ms |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for setting, by_trace in results.items():
        for name, r in by_trace.items():
            s, m, e = r["simulated"], r["measured"], r["error"]
            cells = [f"{s['goodput_fraction']:.2f} / {m['goodput_fraction']:.2f} ({e['goodput_fraction']:+.2f})"]
            for k in METRICS[1:]:
                cells.append(f"{s[k] * 1000:.0f} / {m[k] * 1000:.0f} ({e[k] * 100:+.0f}%)")
            lines.append(f"| {setting} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.simulator.validate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args(argv)
    traces = {name: load_trace(name) for name in TRACES}
    base = SimConfig(profile="a100-80g/opt-13b", tp=1, policy="fcfs", cache="kv", step_model="fitted")
    tuned = calibrate(traces[TRAIN_TRACE], base)
    results = {"fitted": {n: compare(t, base) for n, t in traces.items()},
               "fitted+host": {n: compare(t, tuned) for n, t in traces.items()}}
    with prefill_only_steps():
        results["fitted, prefill-only steps (what-if)"] = {n: compare(t, base) for n, t in traces.items()}
        results["fitted+host, prefill-only steps (what-if)"] = {n: compare(t, tuned) for n, t in traces.items()}
    print(error_table(results))
    print(f"\nfitted+host: prefill (a, b, c) = {tuned.prefill_ms} ms, host {tuned.host_per_seq_ms} ms per decoding "
          f"sequence per step, both from {TRAIN_TRACE}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "calibrated": {
            "prefill_ms": tuned.prefill_ms, "host_per_seq_ms": tuned.host_per_seq_ms, "trained_on": TRAIN_TRACE}},
            indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
