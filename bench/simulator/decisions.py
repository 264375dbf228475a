"""A digest of every decision the production scheduler makes on a seeded trace, to check that a
change meant to be a speed-up (or a refactor) changes no decision.

    .venv/bin/python -m bench.simulator.decisions [--requests 2000] [--rate 8] [--json OUT]

For fcfs/kv, apt/kv, fcfs/hybrid and apt/hybrid it simulates the same seeded ShareGPT trace (OPT-13B
on one A100-80GB, memory shrunk so that requests are preempted and made hidden) and hashes each step's
plan: every sequence's id, position, token count, cache type and conversion, and the ended sequences.
Equal digests before and after a change mean the same steps in the same order.
"""

from __future__ import annotations

import argparse
import hashlib
import json

from bench.simulator.api import SimConfig, simulate
from bench.simulator.loop import SimExecutor, TraceRequest
from bench.simulator.sweep import dataset_lengths, workload
from hybrid_cache.plan import BatchPlan

SYSTEMS = (("fcfs", "kv"), ("apt", "kv"), ("fcfs", "hybrid"), ("apt", "hybrid"))


def plan_key(plan: BatchPlan) -> str:
    """What a step decided, as text: one entry per sequence, then the ended sequences."""
    seqs = ";".join(
        f"{s.seq_id}@{s.start_pos}+{len(s.token_ids)}{s.cache_type.value[0]}"
        f"{'c' if s.conversion is not None else ''}"
        for s in plan.seqs
    )
    return f"{seqs}|{sorted(plan.finished_seq_ids)}"


def digest(config: SimConfig, load: list[TraceRequest]) -> dict:
    """The run's digest, its number of steps and what it preempted and converted."""
    sha, steps = hashlib.sha256(), [0]
    original = SimExecutor.execute

    def execute(self: SimExecutor, plan: BatchPlan) -> list[int]:
        if plan.seqs:
            sha.update(plan_key(plan).encode())
            steps[0] += 1
        return original(self, plan)

    SimExecutor.execute = execute  # type: ignore[method-assign]
    try:
        result = simulate(config, load)
    finally:
        SimExecutor.execute = original  # type: ignore[method-assign]
    return {"digest": sha.hexdigest()[:16], "steps": steps[0], "preemptions": result.num_preemptions,
            "conversions": result.num_conversions, "scheduler_s": round(result.scheduling_seconds, 2),
            "wall_s": round(result.wall_seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=8.0)
    parser.add_argument("--num-blocks", type=int, default=1500, help="a small cache, so memory binds")
    parser.add_argument("--systems", default=",".join(f"{p}/{c}" for p, c in SYSTEMS), help="POLICY/CACHE,...")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    load = workload(dataset_lengths("sharegpt", args.requests, 0, 1024, 2048), args.rate, 2.0, 0)
    out = {}
    for policy, cache in (item.split("/") for item in args.systems.split(",")):
        config = SimConfig(profile="a100-80g/opt-13b", tp=1, policy=policy, cache=cache, num_blocks=args.num_blocks,
                           ttft_slo_s=0.5, tbt_slo_s=0.2)
        out[f"{policy}/{cache}"] = digest(config, load)
        print(json.dumps({f"{policy}/{cache}": out[f"{policy}/{cache}"]}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
