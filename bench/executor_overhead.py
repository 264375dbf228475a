"""Per-step time of the Ray executor against the in-process executor, same model and batch.

    .venv/bin/python -m bench.executor_overhead [--model DIR] [--batch 16] [--prompt 128] [--output 64]

Runs, one after another in this process (Ray started once, on loopback): in-process (TP=1, 2 torch
threads), Ray TP=1 (one worker actor, 2 threads) and Ray TP=2 (two actors, 1 thread each). Each
generates the same greedy batch; the median decode step (engine.step wall time, after the prefill) is
reported, and Ray's overhead is its difference from in-process at equal threads.
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


def step_times(model: Path, setup: str, prompts: list[list[int]], output_len: int) -> list[float]:
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
        times = []
        while engine.has_unfinished():
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        return times[1:]  # decode steps only (the first step prefills the batch)
    finally:
        llm.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--output", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from cluster.ray_runtime import ensure_ray

    model = ensure_dummy(args.model) if args.model == DEFAULT_MODEL else args.model
    ensure_ray(num_cpus=2)
    prompts = make_prompts(args.batch, args.prompt, 10_000, seed=0)
    results = {}
    for setup in tqdm(SETUPS, desc="executors"):
        times = step_times(model, setup, prompts, args.output)
        results[setup] = {"median_step_ms": statistics.median(times) * 1e3, "steps": len(times)}
        tqdm.write(f"{setup}: median decode step {results[setup]['median_step_ms']:.1f} ms over {len(times)} steps")
    base = results["in-process"]["median_step_ms"]
    for setup in ("ray tp=1", "ray tp=2"):
        results[setup]["vs_in_process_ms"] = results[setup]["median_step_ms"] - base
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
