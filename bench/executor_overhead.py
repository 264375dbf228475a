"""Per-step dispatch overhead of the Ray executor against the in-process executor, in one run.

    .venv/bin/python -m bench.executor_overhead [--batch 16] [--prompt 32] [--output 64] [--rounds 5]

Three engines run side by side in this process over the same tiny dummy OPT (hidden 64, 2 layers,
written once under data/models/; a small model keeps compute, and so compute noise, out of the
figures): in-process (TP=1), Ray TP=1 (one rank actor) and Ray TP=2 (two rank actors in a gloo
group). Ray starts once, on loopback. Each round gives every engine the same greedy batch, then runs
the decode steps interleaved, one step of each engine in turn, so the machine's noise falls on all
three alike. It records the wall time of every decode step (`engine.step()`) and the model time of
each on rank 0 (the change of `timings()["model"]` across the step, read after the timed window: the
Ray executor knows rank 0's timings from its answer, so reading them asks nothing of the ranks).

Reported per setup, over every decode step of every round:
  step              median wall time of a step
  overhead          median of each step's wall time minus its model time: scheduling, plan encoding,
                    transport, decoding on the rank, waiting for the other ranks
  dispatch          overhead minus the in-process executor's: what the Ray executor adds to a step
  mean dispatch     the same with means instead of medians (a few slow steps, e.g. another process
                    taking the core, move it; the median is what a typical step pays)
  step - local      the plain difference of the median step times; for TP=2 it also holds the
                    all-reduces and the split compute, which are model time, not dispatch
Each setup also reports whether it generated exactly the in-process executor's tokens.

    .venv/bin/python -m bench.executor_overhead --transports

compares instead the ways a step could reach the ranks, on echo actors (no model): a Ray call per
rank after `ray.put` (the executor's old path), a Ray Compiled Graph (shared-memory channels) and the
step channel (a loopback TCP connection per rank), each with a 16-sequence decode plan, at 1 and 2
ranks; it reports the median and 90th percentile round trip.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.engine_throughput import TOKENIZER_DIR, make_prompts
from cluster import LLM, SamplingParams
from cluster.config import load_config
from hybrid_cache.plan import BatchPlan, CacheType, SequencePlan
from hybrid_cache.plan import SamplingParams as PlanSampling
from hybrid_cache.plan_codec import decode_plan, encode_plan, encode_sampled
from worker.step_channel import StepClient, StepServer

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = REPO / "data/models/dummy-opt-tiny"
LOCAL = "in-process"
# One torch thread everywhere: with more, one engine's OpenMP threads spin-wait after its step and
# take the cores from the next engine's step (interleaved, on 2 cores), which then measures the
# spinning, not the dispatch. The tiny model gains nothing from a second thread anyway.
SETUPS = {  # name → (executor, tensor_parallel_size, torch threads per rank)
    LOCAL: ("local", 1, 1),
    "ray tp=1": ("ray", 1, 1),
    "ray tp=2": ("ray", 2, 1),
}


def ensure_tiny(path: Path) -> Path:
    """The tiny OPT (SmolLM2's tokenizer, float32), written once."""
    if not (path / "config.json").is_file():
        from worker.dummy import Shape, write_dummy_checkpoint

        write_dummy_checkpoint("opt", "125m", path, TOKENIZER_DIR, seed=0, dtype="float32", init_std=0.3,
                               shape=Shape(hidden=64, layers=2, heads=4, kv_heads=4, ffn=128))
    return path


@dataclass
class Steps:
    """One setup's decode steps: the wall and model seconds of each, the tokens made."""

    wall: list[float] = field(default_factory=list)
    model: list[float] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)


def build(setup: str, model: Path, batch: int, blocks: int, block_size: int) -> LLM:
    executor, tp, threads = SETUPS[setup]
    config = load_config(overrides={"parallel.cpus_per_worker": threads, "scheduler.max_waiting": None})
    return LLM(str(model), dtype="float32", block_size=block_size, num_blocks=blocks, max_num_seqs=batch,
               executor=executor, tensor_parallel_size=tp, num_threads=threads, config=config)


def run_round(llms: dict[str, LLM], prompts: list[list[int]], output_len: int, steps: dict[str, Steps]) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    finished: dict[str, dict[str, list[int]]] = {setup: {} for setup in llms}
    order: dict[str, list[str]] = {}
    for setup, llm in llms.items():
        order[setup] = [llm.engine.add_request(prompt, params) for prompt in prompts]
        llm.engine.step()  # the prefill of the whole batch: not a decode step
    model = {setup: llm.engine.executor.timings()["model"] for setup, llm in llms.items()}
    while any(llm.engine.has_unfinished() for llm in llms.values()):
        for setup, llm in llms.items():
            if not llm.engine.has_unfinished():
                continue
            start = time.perf_counter()
            outputs = llm.engine.step()
            steps[setup].wall.append(time.perf_counter() - start)
            model_after = llm.engine.executor.timings()["model"]
            steps[setup].model.append(model_after - model[setup])
            model[setup] = model_after
            finished[setup].update({o.request_id: o.token_ids for o in outputs if o.finished})
    for setup in llms:
        steps[setup].tokens += [finished[setup][request_id] for request_id in order[setup]]


def summarize(steps: dict[str, Steps]) -> dict[str, dict[str, object]]:
    def ms(seconds: float) -> float:
        return round(seconds * 1e3, 3)

    def overheads(s: Steps) -> list[float]:
        return [wall - model for wall, model in zip(s.wall, s.model, strict=True)]

    local = steps[LOCAL]
    local_median, local_mean = statistics.median(overheads(local)), statistics.mean(overheads(local))
    results = {}
    for setup, s in steps.items():
        overhead, mean_overhead = statistics.median(overheads(s)), statistics.mean(overheads(s))
        results[setup] = {
            "steps": len(s.wall),
            "step_ms": ms(statistics.median(s.wall)),
            "mean_step_ms": ms(statistics.mean(s.wall)),
            "model_ms": ms(statistics.median(s.model)),
            "overhead_ms": ms(overhead),
            "dispatch_ms": ms(overhead - local_median),
            "mean_overhead_ms": ms(mean_overhead),
            "mean_dispatch_ms": ms(mean_overhead - local_mean),
            "step_minus_local_ms": ms(statistics.median(s.wall) - statistics.median(local.wall)),
            "same_tokens_as_local": s.tokens == local.tokens,
        }
    return results


def table(results: dict[str, dict[str, object]]) -> str:
    lines = ["| setup | steps | median step | median model | overhead | dispatch | mean dispatch | step - local "
             "| same tokens |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for setup, r in results.items():
        lines.append(f"| {setup} | {r['steps']} | {r['step_ms']:.2f} ms | {r['model_ms']:.2f} ms | "
                     f"{r['overhead_ms']:.2f} ms | {r['dispatch_ms']:.2f} ms | {r['mean_dispatch_ms']:.2f} ms | "
                     f"{r['step_minus_local_ms']:.2f} ms | {'yes' if r['same_tokens_as_local'] else 'NO'} |")
    return "\n".join(lines)


class EchoRank:
    """A rank without a model: decodes the plan and answers with its sequence ids (rank 0) or nothing."""

    def __init__(self, rank: int) -> None:
        self.rank, self.server = rank, None

    def execute(self, plan: dict) -> dict:
        seq_ids = [s.seq_id for s in decode_plan(plan).seqs]
        return encode_sampled(seq_ids if self.rank == 0 else [])

    def open_step_channel(self, token: str) -> tuple[str, int]:
        self.server = StepServer("127.0.0.1", token, self.execute, hello_timeout_s=60)
        return self.server.address


def _round_trips(call, repeats: int) -> dict[str, float]:  # noqa: ANN001 - a callable
    for _ in range(repeats // 10):
        call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"median_ms": round(statistics.median(times) * 1e3, 3),
            "p90_ms": round(times[int(0.9 * len(times))] * 1e3, 3)}


def transports(repeats: int) -> dict[str, dict[str, float]]:
    greedy = PlanSampling(temperature=0.0)
    plan = encode_plan(BatchPlan([SequencePlan(i, [100 + i], 40, CacheType.KV, list(range(6 * i, 6 * i + 6)),
                                               greedy) for i in range(16)]))
    return _transports_at(1, plan, repeats) | _transports_at(2, plan, repeats)


def _transports_at(ranks: int, plan: dict, repeats: int) -> dict[str, dict[str, float]]:
    import ray
    from ray.dag import InputNode, MultiOutputNode

    actors = [ray.remote(EchoRank).options(num_cpus=0).remote(rank) for rank in range(ranks)]
    ray.get([a.execute.remote(plan) for a in actors])

    def ray_calls() -> list:
        ref = ray.put(plan)
        return ray.get([a.execute.remote(ref) for a in actors])

    results = {f"ray calls, {ranks} rank(s)": _round_trips(ray_calls, repeats)}
    with InputNode() as step:
        graph = MultiOutputNode([a.execute.bind(step) for a in actors]).experimental_compile()
    results[f"compiled graph, {ranks} rank(s)"] = _round_trips(lambda: ray.get(graph.execute(plan)), repeats)
    graph.teardown()
    token = "bench"
    addresses = ray.get([a.open_step_channel.remote(token) for a in actors])
    client = StepClient([tuple(a) for a in addresses], token, timeout_s=60)
    results[f"step channel, {ranks} rank(s)"] = _round_trips(lambda: client.run(plan), repeats)
    client.close()
    for actor in actors:
        ray.kill(actor)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=TINY_MODEL)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--output", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="batches per engine; the steps of all are pooled")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--transports", action="store_true", help="compare transports on echo actors instead")
    parser.add_argument("--repeats", type=int, default=400, help="round trips per transport (--transports)")
    args = parser.parse_args(argv)
    from cluster.ray_runtime import ensure_ray

    if args.transports:
        ensure_ray(num_cpus=2)
        found = transports(args.repeats)
        print(json.dumps(found, indent=2))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(found, indent=2))
        return 0

    model = ensure_tiny(args.model) if args.model == TINY_MODEL else args.model
    # Ray's CPU count is bookkeeping here: the TP=1 and TP=2 groups are placed side by side.
    ensure_ray(num_cpus=sum(tp * threads for executor, tp, threads in SETUPS.values() if executor == "ray"))
    prompts = make_prompts(args.batch, args.prompt, 10_000, seed=0)
    block_size = 16
    blocks = args.batch * -(-(args.prompt + args.output) // block_size) + 8
    llms: dict[str, LLM] = {}
    try:
        for setup in SETUPS:
            llms[setup] = build(setup, model, args.batch, blocks, block_size)
        run_round(llms, prompts[:2], 4, {setup: Steps() for setup in SETUPS})  # warm-up, not recorded
        steps = {setup: Steps() for setup in SETUPS}
        for index in range(args.rounds):
            run_round(llms, prompts, args.output, steps)
            print(f"round {index + 1}/{args.rounds} done", flush=True)
    finally:
        for llm in llms.values():
            llm.shutdown()
    results = summarize(steps)
    print(table(results))
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
