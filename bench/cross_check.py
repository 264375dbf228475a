"""Cross-check our load client against vLLM's own (`vllm bench serve`) on one server and one rate.

    python -m bench.cross_check --systems aptserve:fcfs/kv --rates 1 --requests 100 --model DIR \\
        --ttft-slo 3 --tbt-slo 0.7 ... --out results/bench/cross-check

Takes `aptserve bench`'s flags; uses the first system and the first rate. One server is started; our
client runs the seeded trace, then `vllm bench serve --backend openai` (peer environment) sends the
same prompts with the same output lengths at the same rate and burstiness, with its own arrival draw.
Both medians (TTFT, TPOT) and their ratios go to `cross-check.json`.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

from bench.load_client import run_trace
from bench.serve_bench import PEER_PYTHON, REPO, System, bench_samples, build_parser, parse_args, running_server
from bench.slo_metrics import SLO, summarize
from bench.traces import arrival_times


def vllm_bench_serve(base: str, dataset: Path, args, rate: float, out: Path) -> dict:  # noqa: ANN001
    command = [str(PEER_PYTHON), str(REPO / "bench" / "vllm_launcher.py"), "bench", "serve",
               "--backend", "openai", "--base-url", base, "--endpoint", "/v1/completions", "--model", "bench",
               "--tokenizer", args.model, "--dataset-name", "custom", "--dataset-path", str(dataset),
               "--custom-output-len", "-1", "--skip-chat-template", "--num-prompts", str(args.requests),
               "--request-rate", str(rate), "--burstiness", str(1 / args.cv**2), "--ignore-eos",
               "--seed", str(args.seed), "--disable-shuffle", "--save-result", "--result-dir", str(out),
               "--result-filename", "vllm-bench-serve.json"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_TARGET_DEVICE="cpu", TOKENIZERS_PARALLELISM="false")
    subprocess.run(command, cwd=REPO, check=True, env=env)
    return {"command": " ".join(command), **json.loads((out / "vllm-bench-serve.json").read_text())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser("python -m bench.cross_check", __doc__), argv)
    system, rate = System(args.systems.split(",")[0]), sorted(args.rates)[0]
    samples = bench_samples(args)
    dataset = args.out / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": s.prompt, "output_tokens": s.output_len}) + "\n"
                               for s in samples))
    with running_server(system, args, args.out, warmup=samples[:4]) as server:
        arrivals = arrival_times(rate, args.cv, args.requests, args.seed)
        records = asyncio.run(run_trace(server.base, "bench", samples, arrivals, args.grace, desc=f"ours @ {rate:g}"))
        ours = summarize(records, SLO(args.ttft_slo, args.tbt_slo), arrivals[-1])
        theirs = vllm_bench_serve(server.base, dataset, args, rate, args.out)
    pairs = {"ttft_p50_s": (ours["ttft_p50_s"], theirs["median_ttft_ms"] / 1000),
             "tpot_p50_s": (ours["tpot_p50_s"], theirs["median_tpot_ms"] / 1000)}
    report = {"system": system.spec, "rate": rate, "cv": args.cv, "requests": args.requests,
              "medians": {k: {"ours": a, "vllm_bench_serve": b, "ratio": a / b if a and b else None}
                          for k, (a, b) in pairs.items()},
              "vllm_bench_serve_command": theirs["command"]}
    (args.out / "cross-check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["medians"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
