"""`aptserve replay` end to end on a tiny OPT with SmolLM2's tokenizer and synthetic lengths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.replay import main as replay_main


@pytest.mark.parametrize(("policy", "cache"), [("fcfs", "kv"), ("apt", "hybrid")])
def test_replay_records_every_request(tiny_opt_with_tokenizer: Path, tmp_path: Path, policy: str, cache: str) -> None:
    out = tmp_path / "replay.json"
    code = replay_main([
        "--model", str(tiny_opt_with_tokenizer), "--dataset", "synthetic:24:16", "--rate", "20", "--cv", "2",
        "--duration", "2", "--policy", policy, "--cache", cache, "--num-blocks", "24",
        "--block-size", "4", "--ttft-slo", "1.0", "--tbt-slo", "0.2", "--json", str(out),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    summary, records = result["summary"], result["records"]
    assert summary["count"] == len(records) > 10
    assert 0.0 <= summary["attainment"] <= 1.0
    finished = [r for r in records if r["finished"]]
    assert finished, "some requests must finish"
    for record in finished:
        assert record["output_len"] == 16 and len(record["token_times"]) == 16
        assert record["first_token_time"] >= record["arrival"]
    assert summary["step_seconds"]["model"] > 0 and summary["step_seconds"]["scheduling"] > 0
    if cache == "hybrid":
        assert summary["tokens_by_cache_type"]["kv"] + summary["tokens_by_cache_type"]["hidden"] > 0


def test_replay_of_a_bench_probe_uses_its_arrivals_and_warms_up_first(
    tiny_opt_with_tokenizer: Path, tmp_path: Path
) -> None:
    from bench.traces import arrival_times

    out = tmp_path / "replay.json"
    code = replay_main([
        "--model", str(tiny_opt_with_tokenizer), "--dataset", "synthetic:24:16", "--rate", "20", "--cv", "2",
        "--requests", "12", "--warmup", "2", "--num-blocks", "24", "--block-size", "4",
        "--set", "scheduler.max_num_seqs=4", "--json", str(out),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    records = result["records"]
    assert [r["arrival"] for r in records] == pytest.approx(arrival_times(20, 2, 12, 0))
    # The engine generated the trace's tokens plus the warm-up's (2 requests of 16).
    generated = sum(result["summary"]["tokens_by_cache_type"].values())
    assert generated == sum(r["output_len"] for r in records) + 2 * 16
