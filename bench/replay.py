"""In-process SLO replay: feed a seeded trace into the engine on the real clock and measure SLOs.

    aptserve replay --model DIR --dataset sharegpt|humaneval|synthetic:P:O|FILE --rate R --cv C \\
        --policy apt|fcfs --cache kv|hybrid --num-blocks N --duration S [--json out.json]

`--requests N --warmup 4` replays exactly the trace of one `aptserve bench` probe (its samples, arrivals
and warm-up) with no server and no load client, which separates the engine's share of a served result
from the serving path's (docs/BENCHMARKS.md, "Again with the one-process runtime").

Requests arrive at their trace times (Gamma gaps, docs/BENCHMARK_METHOD.md); each is stamped with its scheduled
arrival, so time spent waiting for the engine's current step counts against its TTFT. Output lengths
come from the dataset and are enforced (`max_tokens` = the reference length, `ignore_eos`). A request
still unfinished `--grace` seconds after the trace ends is aborted and counts as a miss.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from bench.datasets import Sample, load_samples
from bench.slo_metrics import SLO, RequestRecord, summarize
from bench.traces import arrival_times
from cluster.cli import config_overrides
from cluster.config import DEFAULT_CONFIG, AptServeConfig, load_config
from cluster.engine_builder import build_engine
from hybrid_cache.plan import SamplingParams
from scheduler_service.engine import Engine


def replay(
    engine: Engine, encode, samples: list[Sample], arrivals: list[float], slo: SLO, grace_s: float
) -> tuple[list[RequestRecord], float]:
    """Run the trace; return one record per request (in arrival order) and the wall time taken."""
    start = time.monotonic()
    records: dict[str, RequestRecord] = {}
    order: list[str] = []
    prompts = [encode(s.prompt) for s in samples]  # tokenized before the clock matters
    next_index = 0
    end_of_trace = arrivals[-1] if arrivals else 0.0
    bar = tqdm(total=len(samples), desc="replay", unit="req")
    while True:
        now = time.monotonic() - start
        while next_index < len(samples) and arrivals[next_index] <= now:
            sample, arrival = samples[next_index], arrivals[next_index]
            params = SamplingParams(max_tokens=max(1, sample.output_len), temperature=0.0, ignore_eos=True)
            request_id = engine.add_request(
                prompts[next_index], params, ttft_slo_s=slo.ttft_s, tbt_slo_s=slo.tbt_s, arrival_time=start + arrival
            )
            records[request_id] = RequestRecord(
                request_id=request_id, arrival=arrival, first_token_time=None, token_times=[], finished=False,
                error=None, prompt_len=len(prompts[next_index]), output_len=0,
            )
            order.append(request_id)
            next_index += 1
        if engine.has_unfinished():
            outputs = engine.step()
            stamp = time.monotonic() - start
            for out in outputs:
                record = records[out.request_id]
                for _ in out.new_token_ids:
                    record.token_times.append(stamp)
                if record.first_token_time is None and record.token_times:
                    record.first_token_time = record.token_times[0]
                record.output_len = len(out.token_ids)
                if out.finished:
                    record.finished = out.finish_reason in ("stop", "length")
                    if out.finish_reason == "abort":
                        record.error = "unfinished at the end of the replay"
                    bar.update()
        elif next_index < len(samples):
            time.sleep(max(0.0, min(arrivals[next_index] - now, 0.05)))
        else:
            break
        if now > end_of_trace + grace_s:
            for request_id in list(engine.requests):
                engine.abort(request_id)
            grace_s = float("inf")  # the aborts are delivered by the next step; then the loop ends
    bar.close()
    return [records[i] for i in order], time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aptserve replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", default="sharegpt")
    parser.add_argument("--rate", type=float, required=True, help="mean requests per second")
    parser.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of the gaps")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--duration", type=float, help="seconds of trace")
    length.add_argument("--requests", type=int,
                        help="this many requests, drawn as `aptserve bench` draws a probe's (samples, arrivals)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="first send the first N samples at once and wait for them (as `aptserve bench` warms up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy", choices=["fcfs", "apt"], default="fcfs")
    parser.add_argument("--cache", choices=["kv", "hybrid"], default="kv")
    parser.add_argument("--num-blocks", type=int)
    parser.add_argument("--block-size", type=int, help="tokens per KV block (cache.block_size)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--ttft-slo", type=float, default=5.0, help="seconds")
    parser.add_argument("--tbt-slo", type=float, default=1.0, help="seconds")
    parser.add_argument("--grace", type=float, default=60.0, help="seconds after the trace before aborting")
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--max-output", type=int, default=256)
    parser.add_argument("--json", type=Path, help="write the summary and per-request records here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    args = parser.parse_args(argv)

    overrides = config_overrides(args) | {"scheduler.ttft_slo_s": args.ttft_slo, "scheduler.tbt_slo_s": args.tbt_slo}
    if args.block_size:
        overrides["cache.block_size"] = args.block_size
    config: AptServeConfig = load_config(args.config, overrides)
    engine, tokenizer = build_engine(config)
    if tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer: replay needs one to measure prompts")
    if args.requests:
        arrivals = arrival_times(args.rate, args.cv, args.requests, args.seed)
    else:  # enough requests for the duration at the mean rate, cut by the trace times
        arrivals = arrival_times(args.rate, args.cv, max(1, int(args.rate * args.duration * 1.5) + 10), args.seed)
        arrivals = [t for t in arrivals if t <= args.duration]
    samples = load_samples(args.dataset, tokenizer.encode, len(arrivals), args.seed,
                           max_prompt=args.max_prompt, max_output=args.max_output)
    slo = SLO(ttft_s=args.ttft_slo, tbt_s=args.tbt_slo)
    if args.warmup:
        replay(engine, tokenizer.encode, samples[: args.warmup], [0.0] * args.warmup, slo, args.grace)
    records, wall = replay(engine, tokenizer.encode, samples, arrivals, slo, args.grace)
    summary = summarize(records, slo, args.duration or (arrivals[-1] if arrivals else 0.0))
    stats = engine.stats()
    summary |= {"policy": args.policy, "cache": args.cache, "rate": args.rate, "cv": args.cv, "seed": args.seed,
                "wall_seconds": wall, "num_blocks": stats.cache.num_blocks, "preemptions": stats.num_preemptions,
                "conversions": stats.num_conversions, "tokens_by_cache_type": stats.tokens_by_cache_type,
                "alpha": stats.alpha, "step_seconds": stats.step_seconds}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "records": [asdict(r) for r in records]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
