"""`aptserve replay` end to end on a tiny OPT with SmolLM2's tokenizer and synthetic lengths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SMOLLM2_DIR

from bench.replay import main as replay_main
from worker import dummy


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-opt-replay")
    dummy.write_dummy_checkpoint("opt", "125m", path, SMOLLM2_DIR, seed=0, dtype="float32",
                                 shape=dummy.Shape(hidden=64, layers=2, heads=4, kv_heads=4, ffn=128))
    return path


@pytest.mark.parametrize(("policy", "cache"), [("fcfs", "kv"), ("apt", "hybrid")])
def test_replay_records_every_request(tiny_opt: Path, tmp_path: Path, policy: str, cache: str) -> None:
    out = tmp_path / "replay.json"
    code = replay_main([
        "--model", str(tiny_opt), "--dataset", "synthetic:24:16", "--rate", "20", "--cv", "2",
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
