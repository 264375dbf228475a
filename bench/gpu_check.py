"""The GPU check: one prepared run that says whether our GPU path works and how fast it is (docs/GPU.md).

    bench/gpu_check.sh [--out results/gpu_check] [--budget-s 450]

Sections, each written to `gpu_check.json` and `gpu_check.md` in `--out`:

0. build (without a GPU) — both Triton kernels compiled for sm_90 (H100/H200) down to a cubin;
1. parity — greedy tokens of the `triton` backend (CUDA, decode steps on CUDA graphs) equal the CPU
   reference (`torch` backend, CPU, float32) in the kv, hidden and hybrid cache modes, prompts chunked
   and mixed with decodes, on a small random model written here;
2. decode — decode step time of dummy OPT-1.3B, 6.7B and 13B in bfloat16 at batch 1, 16, 64 and 256,
   beside the floor: bytes of weights read per step ÷ the HBM bandwidth measured here by a copy
   kernel (also with the step's K/V reads added);
3. alpha — the hidden cache's recompute cost α (worker/cost_model.py), profiled on the GPU;
4. served — a short in-process replay (bench/replay.py) of apt/hybrid against fcfs/kv on dummy
   OPT-13B with a cache budget too small for the load (memory-bound), SLO attainment and goodput.

Weights are random, drawn on the device (speed does not depend on their values; nothing is read from
disk or downloaded). Without a GPU the same code runs at tiny sizes on the CPU — parity of the
`triton` backend under Triton's interpreter, and the plumbing of sections 2–4 — and the report says
plainly that no GPU figure was measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.gpu_check_setup import (
    build,
    constant_step_profile,
    free,
    random_weights,
    synchronize,
    write_config,
    write_small_checkpoint,
)

REPO = Path(__file__).resolve().parent.parent
OPT_VOCAB = 50272  # OPT's own vocabulary: the LM head costs what it costs in the real model


# -- 1. parity --------------------------------------------------------------------------------------
def generate(model_dir: Path, overrides: dict[str, Any], prompts: list[list[int]], max_new: list[int],
             cache_types: list[str | None]) -> list[list[int]]:
    from cluster import LLM, SamplingParams
    from cluster.config import load_config

    base = {"scheduler.max_waiting": None, "cache.profile_token_counts": [16, 64], "cache.profile_repeats": 1,
            "model.dtype": "float32", "cache.block_size": 16, "cache.num_blocks": 256,
            "cache.recompute_chunk_tokens": 48, "model.cuda_graph_batch_sizes": [1, 2, 4, 8]}
    llm = LLM(str(model_dir), config=load_config(None, base | overrides))
    try:
        inputs = [{"prompt_token_ids": p} | ({"cache_type": c} if c else {}) for p, c in zip(prompts, cache_types)]
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_new]
        return [out.token_ids for out in llm.generate(inputs, params)]
    finally:
        llm.shutdown()


def parity(gpu: bool, interpreted: bool, work: Path) -> dict[str, Any]:
    """Greedy tokens of the triton backend on the device against the CPU reference, per cache mode."""
    import random

    model_dir = write_small_checkpoint(work / "parity-opt", "opt")
    rng = random.Random(0)
    lengths, max_new, batched = ([5, 40, 17, 90, 3, 64, 33, 8], [12, 8, 16, 10, 14, 6, 9, 11], 48) if gpu else (
        [5, 20, 9], [4, 3, 5], 16)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]
    device = "cuda" if gpu else "cpu"
    rows = []
    for mode in ("kv", "hidden", "hybrid"):
        # hybrid: requests alternate between the two cache types, in the same steps.
        types: list[str | None] = [("kv", "hidden")[i % 2] for i in range(len(prompts))] if mode == "hybrid" else [
            None] * len(prompts)
        common = {"scheduler.cache_mode": mode, "scheduler.max_num_batched_tokens": batched}
        reference = generate(model_dir, common | {"model.device": "cpu", "cache.attention_backend": "torch"},
                             prompts, max_new, types)
        with constant_step_profile(interpreted):
            subject = generate(model_dir, common | {"model.device": device, "cache.attention_backend": "triton",
                                                    "model.cuda_graphs": gpu}, prompts, max_new, types)
        mismatches = [i for i, (a, b) in enumerate(zip(subject, reference)) if a != b]
        rows.append({"mode": mode, "requests": len(prompts), "tokens": sum(len(t) for t in subject),
                     "equal": not mismatches, "mismatched_requests": mismatches})
    subject_name = "triton backend on CUDA, decode steps on CUDA graphs" if gpu else (
        "triton backend on CPU under TRITON_INTERPRET=1 (no CUDA graphs)")
    return {"subject": subject_name, "reference": "torch backend on CPU, float32", "rows": rows,
            "ok": all(r["equal"] for r in rows)}


# -- 2./3. decode step time, floor, alpha ------------------------------------------------------------
def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes per second moved by a device copy (each copy reads and writes `nbytes`)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    free(device)
    return 2 * nbytes / best


def decode_plan(batch: int, context: int, block_size: int) -> Any:
    """`batch` KV requests each decoding its token at position `context` on disjoint blocks (greedy)."""
    from hybrid_cache.plan import BatchPlan, CacheType, SamplingParams, SequencePlan

    per_seq = -(-(context + 1) // block_size)
    return BatchPlan([
        SequencePlan(seq_id=s, token_ids=[1], start_pos=context, cache_type=CacheType.KV,
                     block_table=list(range(s * per_seq, (s + 1) * per_seq)), sampling=SamplingParams(temperature=0.0))
        for s in range(batch)
    ])


def decode_times(model_dir: Path, device: torch.device, dtype: str, backend: str, batches: list[int],
                 context: int, iterations: int, bandwidth: float, graphs: bool) -> dict[str, Any]:
    """Median decode step of each batch size (the engine's whole step: forward, LM head, sampling),
    beside its floors; and α from the runner's start-up profile."""
    from hybrid_cache.config import CacheConfig
    from worker.config import ModelConfig
    from worker.model_runner import ModelRunner

    block_size = 16
    num_blocks = max(batches) * -(-(context + 1) // block_size) + 4
    model_config = ModelConfig(path=str(model_dir), dtype=dtype, device=str(device), cuda_graphs=graphs,
                               cuda_graph_batch_sizes=batches)
    cache_config = CacheConfig(block_size=block_size, num_blocks=num_blocks, attention_backend=backend,
                               recompute_chunk_tokens=2048, profile_token_counts=[256, 1024, 2048], profile_repeats=3)
    started = time.perf_counter()
    with random_weights():
        runner = ModelRunner(model_config, cache_config)
    startup = time.perf_counter() - started
    spec = runner.model.spec
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv_token_bytes = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * runner.layout.dtype_bytes
    rows = []
    for batch in batches:
        plan = decode_plan(batch, context, block_size)
        for _ in range(3):
            runner.execute(plan)
        samples = []
        for _ in range(iterations):
            synchronize(device)
            start = time.perf_counter()
            runner.execute(plan)  # ends with the sampled ids on the host: the step is complete
            samples.append(time.perf_counter() - start)
        step = sorted(samples)[len(samples) // 2]
        floor = weight_bytes / bandwidth
        floor_kv = (weight_bytes + batch * (context + 1) * kv_token_bytes) / bandwidth
        rows.append({"batch": batch, "step_ms": step * 1e3, "floor_ms": floor * 1e3, "floor_with_kv_ms": floor_kv * 1e3,
                     "over_floor": step / floor, "over_floor_with_kv": step / floor_kv,
                     "graph": runner.graphs is not None and runner.graphs.accepts(plan)})
    result = {"weight_bytes": weight_bytes, "context": context, "startup_s": startup, "rows": rows,
              "alpha_s_per_block": runner.cost.alpha, "recompute_fixed_s": runner.cost.fixed_seconds,
              "recompute_s_per_token": runner.cost.seconds_per_token, "block_size": block_size}
    del runner
    free(device)
    return result


# -- 4. served run ----------------------------------------------------------------------------------
def served(model_dir: Path, device: str, dtype: str, backend: str, systems: list[tuple[str, str]], num_blocks: int,
           rate: float, cv: float, duration: float, lengths: tuple[int, int, int, int], slo_s: tuple[float, float],
           ) -> list[dict[str, Any]]:
    """Replay one seeded trace into each system in turn (in-process engine, real clock)."""
    import numpy as np

    from bench.datasets import Sample
    from bench.replay import replay
    from bench.slo_metrics import SLO, summarize
    from bench.traces import arrival_times
    from cluster.config import load_config
    from cluster.engine_builder import build_engine

    arrivals = [t for t in arrival_times(rate, cv, int(rate * duration * 1.5) + 4, seed=0) if t <= duration]
    rng = np.random.default_rng(0)
    p_lo, p_hi, o_lo, o_hi = lengths
    prompts = [rng.integers(3, 500, size=int(rng.integers(p_lo, p_hi + 1))).tolist() for _ in arrivals]
    samples = [Sample(prompt=str(i), prompt_len=len(p), output_len=int(rng.integers(o_lo, o_hi + 1)))
               for i, p in enumerate(prompts)]
    slo = SLO(ttft_s=slo_s[0], tbt_s=slo_s[1])
    results = []
    for policy, cache in systems:
        overrides = {"model.path": str(model_dir), "model.device": device, "model.dtype": dtype,
                     "cache.attention_backend": backend, "cache.num_blocks": num_blocks, "cache.block_size": 16,
                     "scheduler.policy": policy, "scheduler.cache_mode": cache, "scheduler.max_waiting": None,
                     "scheduler.ttft_slo_s": slo.ttft_s, "scheduler.tbt_slo_s": slo.tbt_s}
        with random_weights():
            engine, _ = build_engine(load_config(None, overrides))
        records, wall = replay(engine, lambda text: prompts[int(text)], samples, arrivals, slo, grace_s=duration)
        stats = engine.stats()
        results.append({"system": f"{policy}/{cache}", "requests": len(records), "wall_s": wall,
                        "num_blocks": stats.cache.num_blocks, "preemptions": stats.num_preemptions,
                        "alpha": stats.alpha, **summarize(records, slo, duration)})
        engine.executor.shutdown()
        del engine
        free(torch.device(device))
    return results


# -- the report -------------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU check, {report['date']}", "",
             f"Device: {report['device']} · torch {report['torch']} · triton {report['triton']}", ""]
    if not report["gpu"]:
        lines += ["**No GPU on this machine: no GPU figure was measured.** What ran: the CPU-checkable parts "
                  "(parity under Triton's interpreter, the plumbing of the other sections at tiny sizes).", ""]
    for line in report["skipped"]:
        lines.append(f"- skipped: {line}")
    sections = report["sections"]
    if "build" in sections:
        b = sections["build"]
        lines += ["", f"## The kernels compiled for {b['arch']} (H100/H200) by Triton {b['triton']}", "",
                  "| variant | cubin bytes | shared memory bytes |", "| --- | --- | --- |"]
        lines += [f"| {r['variant']} | {r['cubin_bytes']} | {r['shared_bytes']} |" for r in b["rows"]]
    if "parity" in sections:
        p = sections["parity"]
        lines += ["", f"## Parity: {p['subject']} vs {p['reference']}", "", "| mode | requests | tokens | equal |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {r['mode']} | {r['requests']} | {r['tokens']} | {'yes' if r['equal'] else 'NO'} |"
                  for r in p["rows"]]
    if "decode" in sections:
        d = sections["decode"]
        lines += ["", f"## Decode step ({d['dtype']}, context {d['context']}; copy bandwidth "
                  f"{d['bandwidth_gb_s']:.0f} GB/s)", "",
                  "| model | batch | step ms | floor ms (weights) | × floor | floor ms (+K/V) | × floor (+K/V) "
                  "| graph |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, m in d["models"].items():
            lines += [f"| {name} | {r['batch']} | {r['step_ms']:.2f} | {r['floor_ms']:.2f} | {r['over_floor']:.2f} | "
                      f"{r['floor_with_kv_ms']:.2f} | {r['over_floor_with_kv']:.2f} | {'yes' if r['graph'] else 'no'} |"
                      for r in m["rows"]]
        lines += ["", "| model | α (ms per block of hidden history per step) | recompute fixed ms |",
                  "| --- | --- | --- |"]
        lines += [f"| {name} | {m['alpha_s_per_block'] * 1e3:.4f} | {m['recompute_fixed_s'] * 1e3:.3f} |"
                  for name, m in d["models"].items()]
    if "served" in sections:
        s = sections["served"]
        lines += ["", f"## Served run: {s['model']}, {s['num_blocks']} blocks, rate {s['rate']}/s, cv {s['cv']}, "
                  f"{s['duration_s']} s, SLO TTFT {s['slo'][0]} s / TBT {s['slo'][1]} s", "",
                  "| system | requests | finished | SLO attainment | goodput req/s | TTFT p50 s | ITL p50 s "
                  "| preemptions |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in s["rows"]:
            lines.append(f"| {r['system']} | {r['requests']} | {r['finished']} | {r['attainment']:.3f} | "
                         f"{r['goodput_rps']:.3f} | {_fmt(r.get('ttft_p50_s'))} | {_fmt(r.get('itl_p50_s'))} | "
                         f"{r['preemptions']} |")
    for name, error in report["errors"].items():
        lines += ["", f"## {name}: FAILED", "", "```", error.strip()[-2000:], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "gpu_check")
    parser.add_argument("--budget-s", type=float, default=450.0, help="a section that would start later is skipped")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    interpreted = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    if not gpu and not interpreted:
        raise SystemExit("no GPU: set TRITON_INTERPRET=1 (bench/gpu_check.sh does) to check the triton backend on CPU")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "gpu": gpu,
        "device": torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "triton": triton_version, "interpreter": interpreted,
        "sections": {}, "skipped": [], "errors": {},
    }
    if not gpu:
        report["skipped"] += [
            "parity on CUDA and CUDA graphs (checked here: the triton backend on CPU under the interpreter)",
            "decode step times of OPT-1.3B/6.7B/13B in bfloat16 at batch 1/16/64/256 and their HBM floor "
            "(ran here: the same code on a tiny model in float32 on the CPU — plumbing, not a figure)",
            "α on the GPU (ran here: α of the tiny model on the CPU)",
            "the served run on OPT-13B (ran here: the same replay on the tiny model for a few seconds)",
        ]

    def write() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        (args.out / "gpu_check.md").write_text(markdown(report))

    def section(name: str, reserve_s: float, run: Callable[[], Any]) -> None:
        if time.monotonic() + reserve_s > deadline:
            report["skipped"].append(f"{name}: not started, the time budget (--budget-s) was nearly spent")
            return
        try:
            report["sections"][name] = run()
        except Exception:  # a failed section is reported; the others still run
            report["errors"][name] = traceback.format_exc()
        write()  # after every section: a run cut short by the outer timeout keeps what it measured

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        if gpu:  # the kernels compile for the device itself in the parity section
            report["skipped"].append("build: cross-compiling for sm_90 (the kernels compile for this GPU in parity)")
        else:
            section("build", 30, lambda: build(90))
        section("parity", 30, lambda: parity(gpu, interpreted, work))
        section("decode", 60, lambda: run_decode(gpu, device, work, deadline))
        section("served", 100 if gpu else 10, lambda: run_served(gpu, work))

    write()
    print(markdown(report))
    parity_ok = report["sections"].get("parity", {}).get("ok", False)
    return 0 if parity_ok and not report["errors"] else 1


def run_decode(gpu: bool, device: torch.device, work: Path, deadline: float) -> dict[str, Any]:
    if gpu:
        bandwidth = copy_bandwidth(device, 2 << 30)
        models = {f"opt-{size}": write_config(work / f"opt-{size}", "opt", size, OPT_VOCAB, "bfloat16")
                  for size in ("1.3b", "6.7b", "13b")}
        dtype, backend, batches, context, iterations = "bfloat16", "triton", [1, 16, 64, 256], 128, 20
    else:
        from worker.dummy import Shape

        bandwidth = copy_bandwidth(device, 64 << 20)
        shape = Shape(hidden=64, layers=2, heads=4, kv_heads=4, ffn=128)
        models = {"tiny-opt": write_config(work / "tiny-opt", "opt", "125m", 512, "float32", shape)}
        dtype, backend, batches, context, iterations = "float32", "torch", [1, 4], 16, 3
    result: dict[str, Any] = {"dtype": dtype, "backend": backend, "context": context,
                              "bandwidth_gb_s": bandwidth / 1e9, "models": {}}
    for name, path in models.items():
        if time.monotonic() + 40 > deadline:
            result.setdefault("not_run", []).append(name)
            continue
        result["models"][name] = decode_times(path, device, dtype, backend, batches, context, iterations,
                                              bandwidth, graphs=gpu)
    return result


def run_served(gpu: bool, work: Path) -> dict[str, Any]:
    systems = [("apt", "hybrid"), ("fcfs", "kv")]
    if gpu:
        model = write_config(work / "opt-13b-served", "opt", "13b", OPT_VOCAB, "bfloat16")
        # KV room for about a quarter of the requests the trace keeps in flight: memory binds.
        setup = dict(device="cuda", dtype="bfloat16", backend="triton", num_blocks=600, rate=16.0, cv=2.0,
                     duration=30.0, lengths=(128, 512, 32, 256), slo_s=(2.0, 0.1), name="dummy OPT-13B")
    else:
        from worker.dummy import Shape

        shape = Shape(hidden=64, layers=2, heads=4, kv_heads=4, ffn=128)
        model = write_config(work / "tiny-opt-served", "opt", "125m", 512, "float32", shape)
        setup = dict(device="cpu", dtype="float32", backend="torch", num_blocks=12, rate=4.0, cv=1.0,
                     duration=2.0, lengths=(8, 32, 2, 8), slo_s=(2.0, 0.5), name="tiny OPT (plumbing)")
    rows = served(model, setup["device"], setup["dtype"], setup["backend"], systems, setup["num_blocks"],
                  setup["rate"], setup["cv"], setup["duration"], setup["lengths"], setup["slo_s"])
    return {"model": setup["name"], "num_blocks": setup["num_blocks"], "rate": setup["rate"], "cv": setup["cv"],
            "duration_s": setup["duration"], "slo": list(setup["slo_s"]), "rows": rows}


if __name__ == "__main__":
    raise SystemExit(main())
