"""Per-step time of the Ray executor against the in-process executor, same model and batch.

    .venv/bin/python -m bench.executor_overhead [--model DIR] [--batch 16] [--prompt 128] [--output 64]

Runs, one after another in this process (Ray started once, on loopback), `--repeats` rounds
interleaved: in-process (TP=1, 2 torch threads), Ray TP=1 (one worker actor, 2 threads) and Ray TP=2
(two actors, 1 thread each). Each generates the same greedy batch. Reported per setup (best round):
the median decode step (engine.step wall time, after the prefill), and the executor overhead per
step: wall time minus rank 0's own model time (`timings()["model"]`), i.e. scheduling, plan
encoding, Ray calls and waiting for the other ranks — the part that does not depend on compute noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from bench.engine_throughput import DEFAULT_MODEL, ensure_dummy, make_prompts
from cluster import LLM, SamplingParams
from cluster.config import load_config

SETUPS = {  # name → (executor, tensor_parallel_size, threads per rank)
    "in-process": ("local", 1, 2),
    "ray tp=1": ("ray", 1, 2),
    "ray tp=2": ("ray", 2, 1),
}


def measure(model: Path, setup: str, prompts: list[list[int]], output_len: int) -> dict[str, float]:
    executor, tp, threads = SETUPS[setup]
    block_size = 32
    blocks = len(prompts) * (-(-(len(prompts[0]) + output_len) // block_size)) + 8
    config = load_config(overrides={"parallel.cpus_per_worker": threads})
    llm = LLM(str(model), dtype="float32", block_size=block_size, num_blocks=blocks, max_num_seqs=len(prompts),
              executor=executor, tensor_parallel_size=tp, num_threads=threads, config=config)
    try:
        llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
        engine = llm.engine
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        for prompt in prompts:
            engine.add_request(prompt, params)
        engine.step()  # the prefill of the whole batch
        model_before = engine.executor.timings()["model"]
        times = []
        while engine.has_unfinished():
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        model_seconds = engine.executor.timings()["model"] - model_before
        return {
            "median_step_ms": statistics.median(times) * 1e3,
            "overhead_per_step_ms": (sum(times) - model_seconds) / len(times) * 1e3,
            "steps": len(times),
        }
    finally:
        llm.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--output", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best is kept")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from cluster.ray_runtime import ensure_ray

    model = ensure_dummy(args.model) if args.model == DEFAULT_MODEL else args.model
    ensure_ray(num_cpus=2)
    prompts = make_prompts(args.batch, args.prompt, 10_000, seed=0)
    rounds: dict[str, list[dict[str, float]]] = {setup: [] for setup in SETUPS}
    for _ in tqdm(range(args.repeats), desc="rounds"):
        for setup in SETUPS:
            rounds[setup].append(measure(model, setup, prompts, args.output))
            tqdm.write(f"{setup}: {rounds[setup][-1]}")
    results = {setup: min(runs, key=lambda r: r["median_step_ms"]) for setup, runs in rounds.items()}
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
