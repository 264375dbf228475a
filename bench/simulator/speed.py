"""How fast the simulator runs, and where its time goes.

    .venv/bin/python -m bench.simulator.speed [--requests 10000] [--rate 4] [--profile a100-80g/opt-13b]

Simulates `--requests` ShareGPT requests (Poisson arrivals) for fcfs/kv and apt/hybrid, and prints the
wall time (and the process's CPU time: on a shared machine the wall time includes waiting for a
core) split into the production scheduler (`Scheduler.schedule`, timed by the engine), the
step-time model, and the rest of the engine loop (token bookkeeping, outputs, metrics) plus the
simulator's own loop.
"""

from __future__ import annotations

import argparse
import json
import time

from bench.simulator.api import SimConfig, simulate
from bench.simulator.sweep import dataset_lengths, workload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--profile", default="a100-80g/opt-13b")
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args(argv)
    samples = dataset_lengths("sharegpt", args.requests, 0, 1024, 2048)
    load = workload(samples, args.rate, 1.0, 0)
    rows = {}
    for policy, cache in (("fcfs", "kv"), ("apt", "hybrid")):
        config = SimConfig(profile=args.profile, tp=args.tp, policy=policy, cache=cache, ttft_slo_s=1.0, tbt_slo_s=0.2)
        cpu = time.process_time()
        result = simulate(config, load, progress=True)
        cpu = time.process_time() - cpu
        tokens = sum(r.num_tokens for r in result.records)
        model = result.step_stats.model_wall_seconds
        rows[f"{policy}/{cache}"] = {
            "requests": len(load), "output_tokens": tokens, "steps": sum(result.step_stats.steps.values()),
            "wall_s": round(result.wall_seconds, 2), "cpu_s": round(cpu, 2),
            "scheduler_s": round(result.scheduling_seconds, 2),
            "step_model_s": round(model, 2),
            "engine_rest_s": round(result.wall_seconds - result.scheduling_seconds - model, 2),
            "us_per_token": round(result.wall_seconds / tokens * 1e6, 2),
            "simulated_s": round(result.virtual_seconds, 1),
        }
        print(json.dumps({f"{policy}/{cache}": rows[f"{policy}/{cache}"]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
