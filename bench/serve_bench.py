"""`aptserve bench`: effective throughput of several serving systems on one trace, side by side.

    aptserve bench --systems aptserve:apt/hybrid,aptserve:fcfs/kv,vllm --model DIR --dataset sharegpt \\
        --cv 1 --ttft-slo 5 --tbt-slo 1 --rates 0.5,1,2 --num-blocks 64 --out results/bench/NAME

Systems run one after another, never at once. Each is started as its own server on 127.0.0.1 with the
same checkpoint, block size, block budget, `max_num_seqs` and threads, warmed up, and probed over the
same seeded trace family (docs/BENCHMARK_METHOD.md): at fixed rates (`--rates 0.5,1,2`: every system at every rate)
or at rates chosen by bisection (`--rates LOW:HIGH`). `--unloaded N` first times N requests sent one at
a time (the unloaded TTFT and TPOT that SLOs are stated against); `--calibrate` stops there. Before a
server stops, its `/metrics` page is saved (block counts, hidden-cache share, preemptions, the
engine's time by part), and each run gets a time split (`bench/server_metrics.py`). The
results folder gets per-request JSON for every probe, `summary.json` (effective throughput and
attainment at every rate, with the settings), `table.md` and plots (attainment vs rate; TTFT CDF).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from bench.bench_plots import plot_attainment, plot_ttft_cdf
from bench.datasets import load_samples
from bench.engine_throughput import ENGINE_ENV
from bench.load_client import run_trace
from bench.server_metrics import counters_since, scrape_metrics, time_split, time_split_table
from bench.slo_metrics import SLO, RequestRecord, bisect_rate, effective_throughput, percentile, summarize
from bench.thread_stats import ThreadStats
from bench.thread_stats import usage as thread_usage
from bench.traces import arrival_times

REPO = Path(__file__).resolve().parent.parent
PEER_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


@dataclass(frozen=True)
class System:
    """One server to measure: `aptserve:POLICY/CACHE`, optionally `@RUNTIME` (`server.runtime`, e.g.
    `aptserve:apt/hybrid@process`; Ray Serve when absent), or `vllm`."""

    spec: str

    @property
    def is_vllm(self) -> bool:
        return self.spec == "vllm"

    @property
    def name(self) -> str:
        return self.spec.replace(":", "-").replace("/", "-").replace("@", "-")

    def command(self, args: argparse.Namespace, port: int) -> list[str]:
        if self.is_vllm:
            if not PEER_PYTHON.exists():
                raise SystemExit("the vLLM peer environment is missing: run `make bench-peer` first")
            return [str(PEER_PYTHON), str(REPO / "bench" / "vllm_launcher.py"), "serve", args.model,
                    "--host", "127.0.0.1", "--port", str(port), "--block-size", str(args.block_size),
                    "--num-gpu-blocks-override", str(args.num_blocks), "--max-num-seqs", str(args.max_num_seqs),
                    "--dtype", args.dtype, "--served-model-name", "bench", "--gpu-memory-utilization", "0.5",
                    "--max-model-len", str(args.max_model_len)]
        policy_cache, _, runtime = self.spec.removeprefix("aptserve:").partition("@")
        policy, cache = policy_cache.split("/")
        sets = {"server.runtime": runtime or None,
                "cache.block_size": args.block_size, "cache.memory_bytes": args.memory_bytes,
                "cache.num_blocks": "null" if args.memory_bytes else args.num_blocks,
                "scheduler.max_num_seqs": args.max_num_seqs, "scheduler.max_waiting": 100_000,
                "scheduler.ttft_slo_s": args.ttft_slo, "scheduler.tbt_slo_s": args.tbt_slo,
                "model.num_threads": args.threads, "server.served_model_name": "bench",
                "server.grpc_port": port + 1}
        command = [sys.executable, "-m", "cluster.cli", "serve", "--model", args.model, "--policy", policy,
                   "--cache", cache, "--dtype", args.dtype, "--port", str(port)]
        for key, value in sets.items():
            if value is not None:
                command += ["--set", f"{key}={value}"]
        for extra in args.set:
            command += ["--set", extra]
        return command


def _environment(system: System, threads: int) -> dict[str, str]:
    # Both servers get the allocator settings `make serve` uses (ENGINE_ENV, docs/BENCHMARKS.md "Engine speed").
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false") | ENGINE_ENV
    if system.is_vllm:  # docs/BENCHMARK_METHOD.md: loopback, both cores, a private cache
        env |= {"VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
                "VLLM_CACHE_ROOT": str(REPO / ".vllm-cache"), "VLLM_TARGET_DEVICE": "cpu"}
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    return env


def _check_free(*ports: int, wait_s: float = 60.0) -> None:
    """Refuse to start while a port has a listener (waiting up to `wait_s` for the previous server to
    let go): a leftover server would answer in place of the new one."""
    deadline = time.monotonic() + wait_s
    for port in ports:
        while True:
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not a listener
                try:
                    probe.bind(("127.0.0.1", port))
                    break
                except OSError as err:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"port {port} is in use (a leftover server?): {err}") from err
            time.sleep(1)


def wait_healthy(base: str, process: subprocess.Popen | None, timeout_s: float) -> None:
    """Return once `base`/health answers 200; RuntimeError if `process` (when given) exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the server was not healthy within {timeout_s} s")


def probe_file(out: Path, spec: str, rate: float) -> Path:
    """Where a probe's summary and per-request records are kept."""
    return out / f"{System(spec).name}-rate{rate:.4g}.json"


def load_records(path: Path) -> list[RequestRecord]:
    return [RequestRecord(**record) for record in json.loads(path.read_text())["records"]]


@dataclass(frozen=True)
class RunningServer:
    base: str  # its URL
    pid: int  # its process (the root of its process tree)


@contextmanager
def running_server(system: System, args: argparse.Namespace, out: Path, warmup: Sequence) -> Iterator[RunningServer]:
    """Start `system` on 127.0.0.1:`args.port` (its log in `out`), wait until healthy, warm it up with
    `warmup` samples sent at once, and yield it; afterwards stop it with SIGINT, the clean shutdown
    (Serve, engines, Ray)."""
    port = args.port
    _check_free(port, port + 1)
    log = (out / f"{system.name}.log").open("w")
    process = subprocess.Popen(system.command(args, port), cwd=REPO, env=_environment(system, args.threads),
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, process, args.start_timeout)
        asyncio.run(run_trace(base, "bench", warmup, [0.0] * len(warmup), grace_s=300, desc="warm-up"))
        yield RunningServer(base, process.pid)
    finally:
        process.send_signal(2)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def measure_system(system: System, args: argparse.Namespace, samples, slo: SLO, out: Path) -> dict:  # noqa: ANN001
    with running_server(system, args, out, warmup=samples[:4]) as server:
        base = server.base
        probes: dict[float, dict] = {}
        records: list[RequestRecord] = []  # every probe's, for the time split

        def probe(rate: float) -> float:
            arrivals = arrival_times(rate, args.cv, args.requests, args.seed)
            threads_before, start = ThreadStats.of(server.pid), time.monotonic()
            probe_records = asyncio.run(run_trace(base, "bench", samples, arrivals, args.grace,
                                                  desc=f"{system.spec} @ {rate:.3g} req/s"))
            # the server's threads over the probe: the serving machinery's share of the cores
            threads = thread_usage(threads_before, ThreadStats.of(server.pid), time.monotonic() - start)
            summary = summarize(probe_records, slo, arrivals[-1]) | {"threads": threads}
            probes[rate] = summary
            records.extend(probe_records)
            probe_file(out, system.spec, rate).write_text(
                json.dumps({"summary": summary, "records": [asdict(r) for r in probe_records]}))
            print(f"{system.spec} @ {rate:.3g} req/s: attainment {summary['attainment']:.3f}", flush=True)
            return summary["attainment"]

        result: dict = {"command": " ".join(system.command(args, args.port))}
        if args.unloaded:
            result["unloaded"] = unloaded_latency(base, samples[: args.unloaded])
            print(f"{system.spec} unloaded: {result['unloaded']}", flush=True)
        before = scrape_metrics(base)  # the probes' share of the counters is what they add to this
        if not args.calibrate:
            if isinstance(args.rates, tuple):
                _, attainment = bisect_rate(probe, *args.rates, target=0.9, iterations=args.iterations)
            else:
                attainment = {rate: probe(rate) for rate in args.rates}
            result |= {"effective_throughput_rps": effective_throughput(attainment) or 0.0,
                       "attainment_by_rate": dict(sorted(attainment.items())), "probes": probes}
        result["server_metrics"] = scrape_metrics(base, out / f"{system.name}-metrics.txt")
        result["time_split"] = time_split(counters_since(result["server_metrics"], before), records)
        return result


def unloaded_latency(base: str, samples, model: str = "bench") -> dict[str, float | None]:  # noqa: ANN001
    """Median TTFT and TPOT of `samples` sent one at a time (each alone on the server)."""
    records: list[RequestRecord] = []
    for sample in samples:
        records += asyncio.run(run_trace(base, model, [sample], [0.0], grace_s=300, desc="unloaded"))
    good = [r for r in records if r.ok]
    return {"requests": len(records), "ttft_p50_s": percentile([r.ttft for r in good], 50),
            "tpot_p50_s": percentile([t for t in (r.tpot for r in good) if t is not None], 50)}


def parse_rates(text: str) -> tuple[float, float] | list[float]:
    """`LOW:HIGH` (bisection bounds) or `R1,R2,...` (fixed rates, probed in increasing order)."""
    if ":" in text:
        low, high = (float(x) for x in text.split(":"))
        return low, high
    return sorted(float(x) for x in text.split(","))


def package_versions() -> dict[str, str]:
    """Versions of what was measured: ours (this environment) and the peer's vLLM (its environment)."""
    from importlib.metadata import version

    found = {name: version(name) for name in ("torch", "ray", "transformers")}
    if PEER_PYTHON.exists():
        probe = [str(PEER_PYTHON), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"]
        found["vllm-cpu"] = subprocess.run(probe, capture_output=True, text=True).stdout.strip()
    return found


def build_parser(prog: str = "aptserve bench", description: str | None = __doc__) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", required=True,
                        help="comma-separated: aptserve:POLICY/CACHE[@RUNTIME] (server.runtime; ray when absent), vllm")
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", default="sharegpt")
    parser.add_argument("--cv", type=float, default=1.0)
    parser.add_argument("--ttft-slo", type=float, required=True, help="seconds")
    parser.add_argument("--tbt-slo", type=float, required=True, help="seconds")
    parser.add_argument("--rates", required=True,
                        help="req/s: LOW:HIGH (the bisection's bounds) or R1,R2,... (fixed, for every system)")
    parser.add_argument("--iterations", type=int, default=4, help="bisection steps after the two bounds")
    parser.add_argument("--requests", type=int, default=200, help="requests per probe")
    parser.add_argument("--grace", type=float, default=60.0, help="seconds after the last arrival per probe")
    parser.add_argument("--num-blocks", type=int, default=64)
    parser.add_argument("--memory-bytes", type=int, help="our budget in bytes (workspace included)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=1024, help="vLLM's context (its cache must hold one)")
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--max-output", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for our servers (repeatable), e.g. cache.recompute_chunk_tokens=256")
    parser.add_argument("--unloaded", type=int, default=0, help="first time N requests sent one at a time")
    parser.add_argument("--calibrate", action="store_true", help="only the unloaded timing (needs --unloaded)")
    parser.add_argument("--out", type=Path, required=True)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    args.rates = parse_rates(args.rates)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def bench_samples(args: argparse.Namespace) -> list:
    """The seeded requests of a run (the same for every system), lengths counted by the model's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    return load_samples(args.dataset, tokenizer.encode, args.requests, args.seed,
                        max_prompt=args.max_prompt, max_output=args.max_output)


def markdown_tables(results: dict[str, dict]) -> str:
    """Effective throughput and attainment by rate, each probe's latencies, then the time split."""
    lines = ["| system | effective throughput (req/s) | attainment by rate | unloaded TTFT / TPOT p50 |",
             "| --- | ---: | --- | --- |"]
    for name, result in results.items():
        by_rate = result.get("attainment_by_rate", {})
        unloaded = result.get("unloaded") or {}
        timing = (f"{unloaded['ttft_p50_s']:.3f} s / {1000 * unloaded['tpot_p50_s']:.1f} ms"
                  if unloaded.get("ttft_p50_s") and unloaded.get("tpot_p50_s") else "")
        effective = result.get("effective_throughput_rps")
        if effective is None:
            shown = ""
        elif effective == 0 and by_rate:
            shown = f"< {min(by_rate):.3g}"  # no probed rate reached the target
        else:
            shown = f"{effective:.3g}"
        rates = ", ".join(f"{r:.3g}: {a:.2f}" for r, a in by_rate.items())
        lines.append(f"| {name} | {shown} | {rates} | {timing} |")
    lines += ["", "| system | rate | attainment | goodput fraction | finished | TTFT p50 / p90 (s) | TPOT p50 (ms) "
              "| ITL p99 (s) | output tok/s |", "| --- |" + " ---: |" * 8]
    for name, result in results.items():
        for rate, p in sorted(result.get("probes", {}).items()):
            tpot = "" if p["tpot_p50_s"] is None else f"{1000 * p['tpot_p50_s']:.0f}"
            ttft = "" if p["ttft_p50_s"] is None else f"{p['ttft_p50_s']:.2f} / {p['ttft_p90_s']:.2f}"
            itl = "" if p["itl_p99_s"] is None else f"{p['itl_p99_s']:.2f}"
            lines.append(f"| {name} | {rate:.3g} | {p['attainment']:.2f} | {p['goodput_fraction']:.2f} "
                         f"| {p['finished']}/{p['count']} | {ttft} | {tpot} | {itl} | {p['output_tok_per_s']:.1f} |")
    return "\n".join(lines) + "\n\n" + time_split_table(results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    samples = bench_samples(args)
    slo = SLO(ttft_s=args.ttft_slo, tbt_s=args.tbt_slo)
    results = {}
    for spec in args.systems.split(","):
        results[spec] = measure_system(System(spec), args, samples, slo, args.out)
    settings = {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items()}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    summary = {"settings": settings, "git_commit": commit, "versions": package_versions(), "slo": asdict(slo),
               "systems": {k: {kk: vv for kk, vv in v.items() if kk != "probes"} for k, v in results.items()}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = markdown_tables(results)
    (args.out / "table.md").write_text(table)
    print(table)
    if not args.calibrate:
        plot_attainment(results, args.out)
        common = set.intersection(*(set(r["attainment_by_rate"]) for r in results.values()))
        if common:
            rate = max(common)
            ttfts = {name: [r.ttft for r in load_records(probe_file(args.out, name, rate))] for name in results}
            plot_ttft_cdf(ttfts, rate, args.ttft_slo, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
