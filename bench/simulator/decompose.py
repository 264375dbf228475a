"""Where the simulated per-token time parts from vLLM's measured one: each request's decode time split
into the stalls that other requests' prefills cause and the rest, on both sides, and a linear model
of the measured decode times checked trace by trace.

    .venv/bin/python -m bench.simulator.decompose [--json FILE]

For every request with at least 3 output tokens, over its decode (first token to completion):
- `n`: how many requests were decoding, averaged over its steps (tokens evenly spaced);
- `landings`: other requests whose first token came inside it, per 100 of its tokens;
- `stall`: those prefills' time by DistServe's fitted vLLM prefill (`a + b·p + c·p²`), per token;
- `rest`: its time per token minus `stall`: what decode steps cost while it ran.
Medians over requests; `measured` from the `.measured.json` files, `simulated` from the same
workloads run by `validate.py`'s `fitted+host` setting (our FCFS, and the prefill-only what-if).

The regression fits each measured request's decode time to `a·steps + b·Σn + c·Σcontext + d·Σstall`
over three traces and predicts the median TPOT of the fourth (leave one trace out): if the per-step
costs were the problem, it would miss too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.simulator.api import SimConfig, simulate
from bench.simulator.calibration import fitted_coefficients
from bench.simulator.validate import TRACES, TRAIN_TRACE, calibrate, load_trace, prefill_only_steps
from bench.slo_metrics import RequestRecord


def features(records: list[RequestRecord], prefill_ms: tuple[float, float, float]) -> np.ndarray:
    """Per request with ≥ 3 tokens: steps, Σn, Σcontext, Σstall (s) over its decode, and its decode time (s)."""
    first = np.array([r.first_token_time for r in records], dtype=np.float64)
    last = np.array([r.token_times[-1] for r in records], dtype=np.float64)
    prompt = np.array([r.prompt_len for r in records], dtype=np.float64)
    out = np.array([len(r.token_times) for r in records], dtype=np.float64)
    a, b, c = prefill_ms
    prefill_s = (a + b * prompt + c * prompt**2) / 1000
    rows = []
    for i in range(len(records)):
        steps = int(out[i]) - 1
        if steps < 2:
            continue
        at = np.linspace(first[i], last[i], steps + 1)[1:]
        active = (first[None, :] <= at[:, None]) & (last[None, :] >= at[:, None])
        progress = np.clip((at[:, None] - first[None, :]) / np.maximum(last - first, 1e-9)[None, :], 0, 1)
        context = ((prompt[None, :] + progress * out[None, :]) * active).sum()
        landed = (first > first[i]) & (first < last[i])
        landed[i] = False
        rows.append((steps, active.sum(), context, prefill_s[landed].sum(), landed.sum(), last[i] - first[i]))
    return np.array(rows)


def summary(rows: np.ndarray) -> dict[str, float]:
    steps, n, _, stall, landed, decode = rows.T
    return {"n": float((n / steps).mean()), "landings_per_100_tokens": float(np.median(landed / steps) * 100),
            "stall_ms_per_token": float(np.median(stall / steps) * 1000),
            "rest_ms_per_token": float(np.median((decode - stall) / steps) * 1000),
            "tpot_p50_ms": float(np.median(decode / steps) * 1000)}


def leave_one_out(by_trace: dict[str, np.ndarray]) -> dict[str, dict]:
    """Fit on the other traces, predict this one's median TPOT; coefficients in ms."""
    out = {}
    for held in by_trace:
        train = np.vstack([r for name, r in by_trace.items() if name != held])
        beta = np.linalg.lstsq(train[:, :4], train[:, 5], rcond=None)[0]
        test = by_trace[held]
        predicted, real = np.median(test[:, :4] @ beta / test[:, 0]), np.median(test[:, 5] / test[:, 0])
        out[held] = {"coefficients_ms": dict(zip(("per_step", "per_seq_step", "per_context_token", "per_stall_ms"),
                                                 (float(beta[0] * 1000), float(beta[1] * 1000),
                                                  float(beta[2] * 1000), float(beta[3])))),
                     "tpot_p50_error": float((predicted - real) / real)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    traces = {name: load_trace(name) for name in TRACES}
    base = SimConfig(profile="a100-80g/opt-13b", tp=1, policy="fcfs", cache="kv", step_model="fitted")
    tuned = calibrate(traces[TRAIN_TRACE], base)
    prefill = fitted_coefficients("facebook/opt-13b", 1).prefill
    measured = {name: features(t.measured, prefill) for name, t in traces.items()}
    result: dict[str, dict] = {"measured": {n: summary(r) for n, r in measured.items()}}
    result["simulated, fitted+host"] = {n: summary(features(simulate(tuned, t.workload).records, prefill))
                                        for n, t in traces.items()}
    with prefill_only_steps():
        result["simulated, fitted+host, prefill-only"] = {
            n: summary(features(simulate(tuned, t.workload).records, prefill)) for n, t in traces.items()}
    result["leave_one_trace_out"] = leave_one_out(measured)
    print("| source | trace | n | landings /100 tok | stall ms/tok | rest ms/tok | TPOT p50 ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for source in list(result)[:3]:
        for name, s in result[source].items():
            print(f"| {source} | {name} | {s['n']:.1f} | {s['landings_per_100_tokens']:.1f} | "
                  f"{s['stall_ms_per_token']:.1f} | {s['rest_ms_per_token']:.1f} | {s['tpot_p50_ms']:.1f} |")
    print("\nleave one trace out (measured decode times):")
    for name, fit in result["leave_one_trace_out"].items():
        coef = ", ".join(f"{k} {v:.4g}" for k, v in fit["coefficients_ms"].items())
        print(f"  {name}: TPOT p50 error {fit['tpot_p50_error'] * 100:+.1f}%  ({coef})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
