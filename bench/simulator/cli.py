"""`aptserve simulate`: the production scheduler on a virtual clock with a GPU step-time model.

Replay a trace (the calibration traces' format) and write one record per request, in the workload's order:

    aptserve simulate --profile a100-80g/opt-13b --tp 1 --policy fcfs --cache kv \\
        --workload FILE.workload.json --json OUT.json

Sweep request rates on a dataset and print the effective throughput (≥ 90% attainment):

    aptserve simulate --profile a100-80g/opt-66b --tp 8 --policy apt --cache hybrid \\
        --dataset sharegpt --rates 1:20 --cv 2 --out DIR

SLOs are absolute (`--ttft-slo`, `--tbt-slo`, seconds) or `--slo-scale K` times the unloaded median
TTFT and TPOT that the same model gives one request at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from bench.serve_bench import parse_rates
from bench.simulator.api import SimConfig, simulate
from bench.simulator.sweep import dataset_lengths, mean_lengths, sweep, unloaded
from bench.simulator.validate import load_workload
from bench.slo_metrics import SLO


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aptserve simulate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="a100-80g/opt-13b", help="DEVICE/MODEL (hardware.py lists them)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--policy", choices=["fcfs", "apt"], default="fcfs")
    parser.add_argument("--cache", choices=["kv", "hybrid", "hidden"], default="kv")
    parser.add_argument("--step-model", choices=["fitted", "roofline", "measured"], default=None,
                        help="default: fitted where a fit exists (a100-80g OPT), else roofline")
    parser.add_argument("--recompute", choices=["vidur", "roofline"], default="vidur")
    parser.add_argument("--host-per-seq-ms", type=float, default=0.0)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--workload", type=Path, help="a *.workload.json trace to replay")
    parser.add_argument("--json", type=Path, help="with --workload: per-request records here")
    parser.add_argument("--dataset", help="sharegpt, humaneval, synthetic:P:O or a file (bench.datasets)")
    parser.add_argument("--rates", help="LOW:HIGH (bisection) or R1,R2,... (req/s)")
    parser.add_argument("--cv", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=1000, help="requests per probed rate")
    parser.add_argument("--iterations", type=int, default=6, help="bisection steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ttft-slo", type=float, help="seconds")
    parser.add_argument("--tbt-slo", type=float, help="seconds")
    parser.add_argument("--slo-scale", type=float, default=10.0, help="SLOs = K x unloaded TTFT and TPOT")
    parser.add_argument("--max-prompt", type=int, default=1024)
    parser.add_argument("--max-total", type=int, default=2048)
    parser.add_argument("--out", type=Path, help="with --dataset: summary.json and attainment.png here")
    return parser


def config_from(args: argparse.Namespace) -> SimConfig:
    step_model = args.step_model
    if step_model is None:
        fitted = args.profile.startswith("a100-80g/opt-") and not args.profile.endswith("125m")
        step_model = "fitted" if fitted else "roofline"
    return SimConfig(profile=args.profile, tp=args.tp, policy=args.policy, cache=args.cache, step_model=step_model,
                     recompute=args.recompute, block_size=args.block_size, num_blocks=args.num_blocks,
                     max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                     host_per_seq_ms=args.host_per_seq_ms)


def replay_workload(args: argparse.Namespace, config: SimConfig) -> int:
    workload = load_workload(args.workload)
    result = simulate(config, workload, progress=sys.stderr.isatty())
    rows = []
    for item, record in zip(workload, result.records):
        ttft, tpot = record.ttft, record.tpot
        rows.append({"prompt_len": item.prompt_len, "output_len": record.output_len, "start_time": item.arrival,
                     "first_token_time": record.first_token_time,
                     "complete_time": record.token_times[-1] if record.token_times else None,
                     "ttft_ms": None if ttft is None else ttft * 1000, "tpot_ms": None if tpot is None else tpot * 1000,
                     "latency_ms": None if record.e2e is None else record.e2e * 1000, "error": record.error})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(json.dumps({"requests": len(rows), "preemptions": result.num_preemptions, "num_blocks": result.num_blocks,
                      "simulated_seconds": result.virtual_seconds, "wall_seconds": result.wall_seconds}))
    return 0


def sweep_dataset(args: argparse.Namespace, config: SimConfig) -> int:
    if not args.rates or not args.out:
        raise SystemExit("--dataset needs --rates and --out")
    samples = dataset_lengths(args.dataset, args.requests, args.seed, args.max_prompt, args.max_total)
    base = unloaded(config, samples)
    slo = SLO(args.ttft_slo or args.slo_scale * base.ttft_s, args.tbt_slo or args.slo_scale * base.tpot_s)
    config = config.model_copy(update={"ttft_slo_s": slo.ttft_s, "tbt_slo_s": slo.tbt_s})
    rates = parse_rates(args.rates)
    steps = args.iterations + 2 if isinstance(rates, tuple) else len(rates)
    with tqdm(total=steps, desc=f"{config.policy}/{config.cache} rates", unit="probe") as bar:
        def shown(rate: float, attained: float) -> None:
            bar.set_postfix_str(f"{rate:.3g} req/s: {attained:.2f}")
            bar.update()

        result = sweep(config, samples, rates, args.cv, args.seed, slo, args.iterations, on_probe=shown)
    name = f"{config.policy}/{config.cache}"
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"config": config.model_dump(), "dataset": args.dataset, "cv": args.cv, "requests": args.requests,
               "seed": args.seed, "unloaded": asdict(base), "slo": asdict(slo), "lengths": mean_lengths(samples),
               "systems": {name: result}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    from bench.bench_plots import plot_attainment

    plot_attainment({name: result}, args.out)
    print(f"{name} on {config.profile} x{config.tp}: effective throughput {result['effective_throughput']:.3g} "
          f"req/s (SLO TTFT {slo.ttft_s * 1000:.0f} ms, TBT {slo.tbt_s * 1000:.0f} ms); {args.out}/summary.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from(args)
    if args.workload:
        return replay_workload(args, config)
    if args.dataset:
        return sweep_dataset(args, config)
    raise SystemExit("give --workload FILE or --dataset NAME")


if __name__ == "__main__":
    raise SystemExit(main())
