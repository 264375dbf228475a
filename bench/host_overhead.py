"""Scheduler and host overhead as a share of a decode step (issue 13, "a cheap host side").

Our engine as the offline benchmark runs it (OPT-125m dummy, `cpu_paged`, prepacked GEMMs, greedy,
`ignore_eos`), `--batch` requests decoding together; after the prefill and a warm-up, `--steps`
decode steps are timed one by one. Each step's wall time (`Engine.step()`) is split into:

- scheduling: the scheduler's `schedule()` (the engine's own timer);
- metadata: the attention backend's `build_metadata` (the step's index arrays);
- model: the rest of the runner's step (embedding, layers, LM head, sampling), tensor work;
- host rest: everything else — the executor call, applying tokens, stop checks, detokenization,
  outputs (step wall − scheduling − the runner's step).

Host overhead = scheduling + metadata + host rest. The median of each part over the steps is printed.

    flock /tmp/bench.lock flock /tmp/heavy.lock .venv/bin/python -m bench.host_overhead --batch 64 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from bench.engine_throughput import DEFAULT_MODEL, ENGINE_ENV, ensure_dummy, make_prompts


def measure(model: Path, dtype: str, batch: int, steps: int, threads: int, prompt_len: int) -> dict[str, float]:
    """Median seconds per decode step of each part (see the module docstring)."""
    import torch

    from cluster import LLM, SamplingParams
    from cluster.config import load_config, with_overrides

    torch.set_num_threads(threads)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(batch, prompt_len, vocab - 1, seed=0)
    longest = prompt_len + steps + 16
    overrides = {"cache.attention_backend": "cpu_paged", "model.prepack": True, "scheduler.max_waiting": None}
    llm = LLM(str(model), dtype=dtype, block_size=32, num_blocks=batch * (-(-longest // 32)) + 8, cache_mode="kv",
              max_num_seqs=batch, config=with_overrides(load_config(), overrides))
    engine = llm.engine
    runner = engine.executor.runner
    backend = runner.backend
    meta_seconds = [0.0]
    build = backend.build_metadata

    def timed_build(*args):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            return build(*args)
        finally:
            meta_seconds[0] += time.perf_counter() - start

    backend.build_metadata = timed_build  # type: ignore[method-assign]
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    for prompt in prompts:
        engine.add_request(prompt, params)
    engine.step()  # the prefill
    for _ in range(4):
        engine.step()
    parts: dict[str, list[float]] = {"step": [], "scheduling": [], "metadata": [], "model": [], "host rest": []}
    timer = runner.cache.workspace.timer
    for _ in range(steps):
        sched0, model0, meta0 = engine.timer.totals["scheduling"], timer.totals["model"], meta_seconds[0]
        start = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - start
        sched = engine.timer.totals["scheduling"] - sched0
        runner_step = timer.totals["model"] - model0
        meta = meta_seconds[0] - meta0
        parts["step"].append(wall)
        parts["scheduling"].append(sched)
        parts["metadata"].append(meta)
        parts["model"].append(runner_step - meta)
        parts["host rest"].append(wall - sched - runner_step)
    llm.shutdown()
    result = {name: statistics.median(values) for name, values in parts.items()}
    host = [s + m + r for s, m, r in zip(parts["scheduling"], parts["metadata"], parts["host rest"])]
    result["host overhead"] = statistics.median(host)
    result["host share"] = statistics.median(h / w for h, w in zip(host, parts["step"]))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if any(os.environ.get(k) != v for k, v in ENGINE_ENV.items()):
        # The allocator settings must be in place before the process starts: run again with them.
        os.execve(sys.executable, [sys.executable, "-m", "bench.host_overhead", *(argv or sys.argv[1:])],
                  os.environ | ENGINE_ENV)
    model = ensure_dummy(args.model) if args.model == DEFAULT_MODEL else args.model
    result = measure(model, args.dtype, args.batch, args.steps, args.threads, args.prompt_len)
    print(f"{args.dtype}, batch {args.batch}, median of {args.steps} decode steps (ms):")
    for name, value in result.items():
        print(f"  {name:>14}: {value * 100:.1f}%" if name == "host share" else f"  {name:>14}: {value * 1e3:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "result": result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
