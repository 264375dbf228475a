"""The `measured` step-time model: fitted to our own engine on this CPU, then the simulator checked
against that engine on one seeded trace.

    flock /tmp/bench.lock .venv/bin/python -m bench.sim_measured [--duration 60] [--json results/simulator/cpu.json]

1. Profile: a seeded trace replayed on the real engine with fcfs/kv; every `Engine.step` is timed whole
   (scheduling, model, bookkeeping) with the shape of its plan. One least-squares fit over all steps
   gives prefill `a + b·Σp + c·Σp²` and decode `a + b·Σctx + c·n` (ms), mixed steps by the same
   formula as `fitted`; the recompute cost is the engine's own start-up profile (α). Written to
   bench/simulator/measured_cpu.json.
2. Check: the same requests and arrivals simulated with the `measured` model; attainment and TTFT/TPOT
   percentiles are compared (`bench.slo_metrics.summarize` on both). The step model is fitted on the
   same run because this machine's speed drifts with other load (a profile taken minutes earlier in a
   separate run was 2-4x off; docs/SIMULATOR.md): the check is of the scheduling and queueing, given
   step times.

It lives outside `bench/simulator` because it builds the real engine (the model code).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.datasets import load_samples
from bench.replay import replay
from bench.simulator.api import SimConfig, simulate
from bench.simulator.factory import MEASURED_FILE
from bench.simulator.loop import TraceRequest
from bench.simulator.step_time import StepShape
from bench.slo_metrics import SLO, summarize
from bench.traces import arrival_times
from cluster.config import DEFAULT_CONFIG, load_config
from cluster.engine_builder import build_engine

MODEL = "data/models/dummy-opt-125m"
KEYS = ("attainment", "goodput_fraction", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_p50_s", "tpot_p90_s")


def engine_for(policy: str, args: argparse.Namespace):  # noqa: ANN201 - (Engine, Tokenizer)
    overrides = {"model.path": MODEL, "model.dtype": "float32", "scheduler.policy": policy,
                 "scheduler.cache_mode": "kv", "cache.num_blocks": args.num_blocks, "cache.block_size": 32,
                 "scheduler.ttft_slo_s": args.ttft_slo, "scheduler.tbt_slo_s": args.tbt_slo,
                 "scheduler.max_waiting": 100_000}
    return build_engine(load_config(str(DEFAULT_CONFIG), overrides))


def timed_run(policy: str, seed: int, args: argparse.Namespace) -> tuple[list, list, list, object]:
    """Replay a seeded trace on the real engine; returns (steps as (shape, seconds), records, workload, stats)."""
    engine, tokenizer = engine_for(policy, args)
    steps: list[tuple[StepShape, float]] = []
    executor, shapes = engine.executor, []
    original_execute, original_step = executor.execute, engine.step

    def execute(plan):  # noqa: ANN001, ANN202 - the Executor interface
        shapes.append(StepShape.of(plan))
        return original_execute(plan)

    def step():  # noqa: ANN202
        shapes.clear()
        started = time.perf_counter()
        out = original_step()
        if shapes and shapes[0].num_prefill + shapes[0].num_decode:
            steps.append((shapes[0], time.perf_counter() - started))
        return out

    executor.execute, engine.step = execute, step
    arrivals = [t for t in arrival_times(args.rate, args.cv, int(args.rate * args.duration * 2) + 5, seed)
                if t <= args.duration]
    samples = load_samples("sharegpt", tokenizer.encode, len(arrivals), seed, progress=False,
                           max_prompt=args.max_prompt, max_output=args.max_output)
    slo = SLO(args.ttft_slo, args.tbt_slo)
    records, _ = replay(engine, tokenizer.encode, samples, arrivals, slo, grace_s=60.0)
    workload = [TraceRequest(r.prompt_len, s.output_len, a) for r, s, a in zip(records, samples, arrivals)]
    return steps, records, workload, engine.stats()


def fit(steps: list[tuple[StepShape, float]]) -> dict[str, object]:
    """Prefill `(a, b, c)` and decode `(a, b, c)` in ms, fitted jointly by least squares to every timed
    step with the `FittedStepTime` formulas: prefill-only, decode-only and mixed rows share the coefficients."""
    rows, ys = [], []
    for s, seconds in steps:
        if s.num_prefill and s.num_decode:
            rows.append([1, s.prefill_tokens + s.num_decode, s.prefill_sq, 0, s.decode_context, 0])
        elif s.num_prefill:
            rows.append([1, s.prefill_tokens, s.prefill_sq, 0, 0, 0])
        else:
            rows.append([0, 0, 0, 1, s.decode_context, s.num_decode])
        ys.append(seconds * 1000)
    x, y = np.array(rows, float), np.array(ys)
    keep = [j for j in range(x.shape[1]) if x[:, j].any()]
    while True:  # least squares with every coefficient >= 0: drop a term fitted negative and refit
        beta = np.linalg.lstsq(x[:, keep], y, rcond=None)[0]
        if beta.min() >= 0 or len(keep) == 1:
            break
        keep.pop(int(np.argmin(beta)))
    theta = [0.0] * x.shape[1]
    for index, value in zip(keep, beta):
        theta[index] = max(float(value), 0.0)
    kinds = [int(sum(1 for r in rows if r[0] and r[3] == 0 and r[4])), int(sum(1 for r in rows if r[3]))]
    return {"prefill": theta[:3], "decode_small": theta[3:], "decode_large": theta[3:], "threshold": 10**9,
            "steps": len(rows), "mixed_and_decode_steps": kinds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of trace per run")
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--cv", type=float, default=1.0)
    parser.add_argument("--num-blocks", type=int, default=24, help="a memory-bound budget (blocks of 32 tokens)")
    parser.add_argument("--ttft-slo", type=float, default=2.0)
    parser.add_argument("--tbt-slo", type=float, default=0.5)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--max-output", type=int, default=128)
    parser.add_argument("--json", type=Path, help="the comparison, with both runs' summaries")
    args = parser.parse_args(argv)

    steps, records, workload, stats = timed_run("fcfs", 0, args)
    coefficients = fit(steps)
    block = stats.block_size
    MEASURED_FILE.write_text(json.dumps({
        "model": "opt-125m", "source": f"bench.sim_measured on this CPU, {len(steps)} engine steps of fcfs/kv",
        "coefficients_ms": coefficients,
        "recompute": {"fixed_seconds": stats.recompute_fixed_seconds, "seconds_per_token": stats.alpha / block},
    }, indent=2))
    print("fitted:", json.dumps(coefficients))
    slo = SLO(args.ttft_slo, args.tbt_slo)
    real = summarize(records, slo, args.duration)
    config = SimConfig(profile="cpu/opt-125m", step_model="measured", policy="fcfs", cache="kv", block_size=block,
                       num_blocks=stats.cache.num_blocks, ttft_slo_s=args.ttft_slo, tbt_slo_s=args.tbt_slo)
    sim = summarize(simulate(config, workload).records, slo, args.duration)
    table = {k: {"engine": real[k], "simulator": sim[k]} for k in KEYS}
    for k, row in table.items():
        e, s = row["engine"], row["simulator"]
        row["error"] = None if e is None or s is None else (s - e if k in ("attainment", "goodput_fraction")
                                                              else (s - e) / e)
    print(json.dumps(table, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "comparison": table,
                                         "coefficients_ms": coefficients}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
