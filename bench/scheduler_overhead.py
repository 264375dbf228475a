"""Scheduling time per iteration with many queued requests (no model: the policy and its bookkeeping).

    .venv/bin/python -m bench.scheduler_overhead [--waiting 1000] [--running 64] [--iterations 200]

Prints the median and p99 time of `Scheduler.schedule` for each policy in `kv` and `hybrid` mode.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from tqdm import tqdm

from hybrid_cache import CacheLayout, CacheManager, CacheType, SamplingParams
from scheduler_service.config import SchedulerConfig
from scheduler_service.policies import make_policy
from scheduler_service.request import Request, RequestStatus
from scheduler_service.scheduler import Scheduler

# OPT-13B-like proportions per rank (multi-head, so r = 0.5); sizes only matter for block counts.
LAYOUT = CacheLayout(num_layers=40, hidden_size=5120, num_kv_heads=40, head_dim=128, block_size=32, dtype_bytes=2)


def build(policy: str, cache_mode: str, waiting: int, running: int, seed: int) -> Scheduler:
    rng = random.Random(seed)
    cache = CacheManager(LAYOUT, num_blocks=running * 8 + 64)
    config = SchedulerConfig(policy=policy, cache_mode=cache_mode, max_num_seqs=256)
    scheduler = Scheduler(config, cache, make_policy(policy), max_num_batched_tokens=8192, alpha=1e-4)
    for i in range(waiting + running):
        prompt = [1] * rng.randint(16, 512)
        request = Request(f"r{i}", i, prompt, SamplingParams(max_tokens=256), arrival_time=rng.random() * 10,
                          ttft_slo_s=5.0, tbt_slo_s=0.5)
        if i < running:
            cache_type = CacheType.HIDDEN if cache_mode == "hybrid" and i % 2 else CacheType.KV
            request.output_token_ids = [1] * rng.randint(1, 32)
            if cache.blocks_needed(request.num_tokens, cache_type) > cache.num_free:
                continue
            cache.allocate(request.seq_id, request.num_tokens - 1, cache_type)
            request.status, request.cache_type = RequestStatus.RUNNING, cache_type
            request.num_computed_tokens = request.num_tokens - 1
            request.token_times = [10 + rng.random()]
            scheduler.running.append(request)
        else:
            scheduler.waiting.append(request)
    return scheduler


def time_policy(policy: str, cache_mode: str, args: argparse.Namespace) -> list[float]:
    samples = []
    for i in range(args.iterations):
        scheduler = build(policy, cache_mode, args.waiting, args.running, seed=i)
        view_time = 12.0
        start = time.perf_counter()
        scheduler.policy.schedule(scheduler_view(scheduler, view_time))
        samples.append(time.perf_counter() - start)
    return samples


def scheduler_view(scheduler: Scheduler, now: float):  # noqa: ANN201 - SchedulerView
    from scheduler_service.policies import SchedulerView

    return SchedulerView(
        waiting=list(scheduler.waiting), running=list(scheduler.running), cache=scheduler.cache,
        config=scheduler.config, max_num_batched_tokens=scheduler.max_num_batched_tokens,
        alpha=scheduler.alpha, now=now,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--waiting", type=int, default=1000)
    parser.add_argument("--running", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=100)
    args = parser.parse_args(argv)
    cases = [(p, m) for p in ("fcfs", "apt") for m in ("kv", "hybrid")]
    print(f"{args.waiting} waiting + {args.running} running requests, {args.iterations} iterations each")
    for policy, mode in tqdm(cases, desc="policies"):
        samples = sorted(time_policy(policy, mode, args))
        p99 = samples[min(len(samples) - 1, int(0.99 * len(samples)))]
        tqdm.write(f"{policy}/{mode}: median {statistics.median(samples) * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
