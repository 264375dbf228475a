"""The load client against a real server (the HTTP app over a tiny OPT): records what it observed, and
a request still running at the end of a probe is cancelled and counted as a miss."""

from __future__ import annotations

import asyncio
from pathlib import Path

from test_http_server import MODEL, running_server, wait_idle

from bench.datasets import Sample
from bench.load_client import run_trace
from bench.serve_bench import unloaded_latency
from bench.server_metrics import scrape_metrics
from bench.slo_metrics import SLO, summarize


def test_records_every_request(tiny_opt_with_tokenizer: Path) -> None:
    samples = [Sample("Once upon a time", 4, 12), Sample("The capital of France is", 5, 20), Sample("Hi", 1, 1)]
    arrivals = [0.0, 0.05, 0.1]
    with running_server(tiny_opt_with_tokenizer) as (base, engine):
        records = asyncio.run(run_trace(base, MODEL, samples, arrivals, grace_s=60))
        wait_idle(engine)
    for sample, record in zip(samples, records):
        assert record.finished and record.error is None
        assert record.output_len == sample.output_len  # from the usage chunk
        assert 0 < record.ttft < 30 and 1 <= record.num_tokens <= sample.output_len
        assert record.token_times == sorted(record.token_times) and record.token_times[0] >= record.arrival
    assert summarize(records, SLO(ttft_s=30, tbt_s=30), duration_s=1.0)["attainment"] == 1.0


def test_unfinished_requests_are_cut_and_missed(tiny_opt_with_tokenizer: Path) -> None:
    samples = [Sample("Tell me a very long story", 6, 480)]
    with running_server(tiny_opt_with_tokenizer) as (base, engine):
        records = asyncio.run(run_trace(base, MODEL, samples, [0.0], grace_s=0.2))
        wait_idle(engine)  # the cancelled stream aborted its request and freed its blocks
    assert not records[0].finished and records[0].error == "unfinished at the end of the probe"
    assert summarize(records, SLO(ttft_s=30, tbt_s=30), duration_s=1.0)["attainment"] == 0.0


def test_bench_times_unloaded_requests_and_reads_server_metrics(tiny_opt_with_tokenizer: Path, tmp_path: Path) -> None:
    samples = [Sample("Once upon a time", 4, 6), Sample("Hello there", 3, 9)]
    with running_server(tiny_opt_with_tokenizer) as (base, engine):
        unloaded = unloaded_latency(base, samples, model=MODEL)
        wait_idle(engine)
        found = scrape_metrics(base, tmp_path / "metrics.txt")
        num_blocks = engine.stats().cache.num_blocks
    assert unloaded["requests"] == 2 and 0 < unloaded["ttft_p50_s"] < 30 and 0 < unloaded["tpot_p50_s"] < 30
    assert found["num_cache_blocks"] == num_blocks and found["generation_tokens"] == 6 + 9
    assert found["hidden_token_share"] == found.get("hidden_generation_tokens", 0.0) / 15
    assert "aptserve:num_preemptions_total" in (tmp_path / "metrics.txt").read_text()
    assert found["engine_e2e_count"] == 2 and found["engine_e2e_seconds_sum"] > 0
    assert found["step_seconds_execute"] >= found["step_seconds_model"] >= found["step_seconds_attention"] > 0
    assert found["step_seconds_scheduling"] > 0


def test_bench_system_spec_names_policy_cache_and_runtime() -> None:
    import argparse

    from bench.serve_bench import System

    args = argparse.Namespace(model="m", dtype="bfloat16", block_size=32, memory_bytes=None, num_blocks=32,
                              max_num_seqs=16, ttft_slo=1.5, tbt_slo=None, threads=2, set=[])
    process = System("aptserve:apt/hybrid@process")
    command = process.command(args, 8100)
    assert process.name == "aptserve-apt-hybrid-process"
    assert command[command.index("--policy") + 1:command.index("--policy") + 4] == ["apt", "--cache", "hybrid"]
    assert "server.runtime=process" in command and "scheduler.ttft_slo_s=1.5" in command
    assert not any(part.startswith("server.runtime") for part in System("aptserve:fcfs/kv").command(args, 8100))
