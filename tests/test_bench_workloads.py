"""Benchmark workloads: arrival traces, dataset loaders and SLO metrics (docs/BENCHMARK_METHOD.md)."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from bench.datasets import (
    Candidate,
    LengthFilter,
    Sample,
    humaneval_candidates,
    humaneval_path,
    iter_json_array,
    load_candidates,
    load_samples,
    measure_all,
    sharegpt_path,
)
from bench.slo_metrics import (
    SLO,
    RequestRecord,
    bisect_rate,
    effective_throughput,
    meets_goodput_slo,
    meets_paper_slo,
    percentile,
    summarize,
)
from bench.traces import arrival_times


def encode(text: str) -> list[str]:
    return text.split()


# ----------------------------------------------------------------------------------------------- traces


def test_traces_are_seeded_and_increasing():
    a = arrival_times(2.0, 1.5, 200, seed=7)
    assert a == arrival_times(2.0, 1.5, 200, seed=7)
    assert a != arrival_times(2.0, 1.5, 200, seed=8)
    assert len(a) == 200 and all(isinstance(t, float) for t in a)
    assert a[0] > 0 and all(b > c for b, c in zip(a[1:], a[:-1]))
    assert arrival_times(1.0, 1.0, 0, seed=0) == []


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0, 4.0])
def test_trace_gap_mean_and_cv(cv):
    # The sample mean's relative error is ~cv/sqrt(n): scale n with cv² so 3% stays >= 4 standard errors.
    # rate != 1 so that swapping shape and scale (same mean, CV sqrt(rate)/cv) is caught by the CV check.
    rate, n = 4.0, 20_000 * max(1, int(cv * cv))
    times = np.asarray(arrival_times(rate, cv, n, seed=123))
    gaps = np.diff(np.concatenate([[0.0], times]))
    mean = gaps.mean()
    assert mean == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / mean == pytest.approx(cv, rel=0.05)


def test_trace_rejects_bad_arguments():
    for rate, cv, n in [(0, 1, 5), (-1, 1, 5), (1, 0, 5), (1, -2, 5), (1, 1, -1), (float("inf"), 1, 5),
                        (1, float("nan"), 5), (1, 1, 2.5)]:
        with pytest.raises(ValueError):
            arrival_times(rate, cv, n, seed=0)


# ----------------------------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def sharegpt_candidates_all() -> list[Candidate]:
    return load_candidates("sharegpt")


def test_sharegpt_file_is_found_and_truncated():
    path = sharegpt_path()
    assert path.name == "ShareGPT_V3_unfiltered_cleaned_split.json" and path.is_file()
    with open(path, "rb") as f:
        f.seek(-200, 2)
        tail = f.read().rstrip()
    assert not tail.endswith(b"]")  # the packaged file really is cut off


def test_sharegpt_loader_returns_complete_samples(sharegpt_candidates_all):
    samples = measure_all(sharegpt_candidates_all, encode)
    assert len(samples) > 1000
    for s in samples:
        assert isinstance(s.prompt, str) and s.prompt
        assert 4 <= s.prompt_len <= 1024 and s.output_len >= 4 and s.prompt_len + s.output_len <= 2048
        assert s.prompt_len == len(encode(s.prompt))
    tight = measure_all(sharegpt_candidates_all[:2000], encode, max_prompt=64, max_output=128, max_total=150)
    assert tight and all(s.prompt_len <= 64 and s.output_len <= 128 and s.prompt_len + s.output_len <= 150
                         for s in tight)


def test_load_samples_sharegpt_seeded(sharegpt_candidates_all, monkeypatch):
    import bench.datasets as ds

    monkeypatch.setattr(ds, "load_candidates", lambda name, progress=False: sharegpt_candidates_all)
    a = load_samples("sharegpt", encode, 50, seed=3, max_prompt=512, max_output=256)
    assert a == load_samples("sharegpt", encode, 50, seed=3, max_prompt=512, max_output=256)
    assert a != load_samples("sharegpt", encode, 50, seed=4, max_prompt=512, max_output=256)
    assert len(a) == 50 and len({s.prompt for s in a}) == 50
    assert all(s.prompt_len <= 512 and s.output_len <= 256 for s in a)


def _conversation(i: int) -> dict:
    return {"id": f"c{i}", "conversations": [{"from": "human", "value": f"question number {i} please answer"},
                                             {"from": "gpt", "value": f"answer {i} " + "word " * (i + 3)}]}


def test_truncated_json_keeps_exactly_the_complete_records(tmp_path, caplog):
    records = [_conversation(i) for i in range(6)]
    records.insert(2, {"id": "x", "conversations": [{"from": "gpt", "value": "gpt first: skipped at all lengths"},
                                                    {"from": "human", "value": "hi there you all"}]})
    text = json.dumps(records, indent=2)
    cut = text.rfind('"answer 5')  # inside the last record
    path = tmp_path / "cut.json"
    path.write_text(text[:cut + 5], encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        # A tiny chunk size exercises elements that straddle chunk boundaries.
        decoded = list(iter_json_array(path, chunk_chars=7))
    assert decoded == records[:-1]
    assert "truncated" in caplog.text
    samples = load_samples(str(path), encode, 5, seed=0)
    assert sorted(s.prompt for s in samples) == sorted(f"question number {i} please answer" for i in range(5))
    assert {s.output_len for s in samples} == {i + 5 for i in range(5)}

    whole = tmp_path / "whole.json"
    whole.write_text(text, encoding="utf-8")
    assert list(iter_json_array(whole, chunk_chars=5)) == records
    cut_between = tmp_path / "between.json"
    cut_between.write_text(text[: text.rfind("},") + 2], encoding="utf-8")
    assert list(iter_json_array(cut_between)) == records[:-1]


def test_humaneval_has_164_problems():
    assert humaneval_path().name == "HumanEval.jsonl.gz"
    candidates = humaneval_candidates()
    assert len(candidates) == 164
    samples = measure_all(candidates, encode, min_output=1)
    assert len(samples) == 164
    assert all("def " in s.prompt and s.output_len >= 1 for s in samples)
    picked = load_samples("humaneval", encode, 164, seed=1, min_output=1)
    assert len({s.prompt for s in picked}) == 164  # without replacement


def test_jsonl_path(tmp_path):
    rows = [{"prompt": "a b c d e", "output_len": 7}, {"prompt": "one two three four", "output": "x y z w v u"},
            {"prompt": "too short", "output_len": 9}]
    path = tmp_path / "reqs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    samples = load_samples(str(path), encode, 2, seed=0)
    assert sorted(samples, key=lambda s: s.prompt) == [Sample("a b c d e", 5, 7), Sample("one two three four", 4, 6)]
    gz = tmp_path / "reqs.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    assert len(load_candidates(str(gz))) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "no output"}), encoding="utf-8")
    with pytest.raises(ValueError):
        load_samples(str(bad), encode, 1, seed=0)


def test_sampling_with_replacement_warns(tmp_path, caplog):
    path = tmp_path / "few.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"p {i} q r", "output_len": 5}) for i in range(3)),
                    encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        samples = load_samples(str(path), encode, 10, seed=0)
    assert len(samples) == 10 and len({s.prompt for s in samples}) == 3
    assert "with replacement" in caplog.text
    with pytest.raises(ValueError):
        load_samples(str(path), encode, 1, seed=0, min_prompt=100)
    with pytest.raises(FileNotFoundError):
        load_samples(str(tmp_path / "missing.json"), encode, 1, seed=0)


def test_synthetic_lengths():
    fixed = load_samples("synthetic:128:64", encode, 20, seed=0)
    assert len(fixed) == 20 and all(s.prompt_len == 128 == len(encode(s.prompt)) and s.output_len == 64
                                    for s in fixed)
    assert len({s.prompt for s in fixed}) > 1
    ranged = load_samples("synthetic:10-20:5-9", encode, 200, seed=1)
    assert all(10 <= s.prompt_len <= 20 and 5 <= s.output_len <= 9 for s in ranged)
    assert {s.prompt_len for s in ranged} == set(range(10, 21)) and {s.output_len for s in ranged} == set(range(5, 10))
    assert ranged == load_samples("synthetic:10-20:5-9", encode, 200, seed=1)

    def bos_encode(text: str) -> list[str]:  # a tokenizer that adds a special token
        return ["<s>"] + text.split()

    s = load_samples("synthetic:50:8", bos_encode, 1, seed=0)[0]
    assert s.prompt_len == 50 == len(bos_encode(s.prompt))
    for spec in ["synthetic:0:5", "synthetic:10", "synthetic:9-3:4", "synthetic:a:4"]:
        with pytest.raises(ValueError):
            load_samples(spec, encode, 1, seed=0)


def test_length_filter_defaults_match_vllm():
    f = LengthFilter()
    assert f.accepts(Sample("", 4, 4)) and f.accepts(Sample("", 1024, 1024))
    assert not f.accepts(Sample("", 3, 10)) and not f.accepts(Sample("", 10, 3))
    assert not f.accepts(Sample("", 1025, 10)) and not f.accepts(Sample("", 1000, 1049))


# ----------------------------------------------------------------------------------------------- metrics


def _record(times, arrival=0.0, **kw) -> RequestRecord:
    defaults = dict(first_token_time=times[0] if times else None, finished=True, error=None, prompt_len=8,
                    output_len=len(times))
    defaults |= kw
    return RequestRecord(request_id="r", arrival=arrival, token_times=list(times), **defaults)


def test_record_latencies_by_hand():
    r = _record([10.5, 10.6, 10.8, 11.1], arrival=10.0)
    assert r.ttft == pytest.approx(0.5)
    assert r.gaps == pytest.approx([0.1, 0.2, 0.3])
    assert r.e2e == pytest.approx(1.1)
    assert r.tpot == pytest.approx(0.2)  # (1.1 - 0.5) / 3
    # P99 of [0.1, 0.2, 0.3]: rank 0.99 * 2 = 1.98 -> 0.2 + 0.98 * 0.1.
    assert percentile(r.gaps, 99) == pytest.approx(0.298)
    assert percentile([], 99) is None and percentile([4.0], 99) == 4.0

    assert meets_paper_slo(r, SLO(ttft_s=0.5, tbt_s=0.299))
    assert not meets_paper_slo(r, SLO(ttft_s=0.5, tbt_s=0.297))
    assert not meets_paper_slo(r, SLO(ttft_s=0.49, tbt_s=1.0))
    # The mean (TPOT 0.2) hides the slow 0.3 gap that the paper's P99 catches.
    assert meets_goodput_slo(r, SLO(ttft_s=0.5, tbt_s=0.25))
    assert not meets_paper_slo(r, SLO(ttft_s=0.5, tbt_s=0.25))
    assert not meets_goodput_slo(r, SLO(ttft_s=0.5, tbt_s=0.19))


def test_single_token_and_misses():
    one = _record([0.3])
    assert one.gaps == [] and one.tpot is None and one.ttft == pytest.approx(0.3)
    assert meets_paper_slo(one, SLO(0.3, 0.0001)) and meets_goodput_slo(one, SLO(0.3, 0.0001))
    assert not meets_paper_slo(one, SLO(0.2, 10))
    slo = SLO(100, 100)
    for miss in [_record([0.1, 0.2], error="boom"), _record([0.1, 0.2], finished=False), _record([]),
                 _record([], first_token_time=0.1)]:
        assert not meets_paper_slo(miss, slo) and not meets_goodput_slo(miss, slo)


def test_summarize():
    records = [
        _record([0.5, 0.6, 0.8, 1.1]),              # paper miss at tbt 0.25 (P99 0.298), goodput hit
        _record([1.2, 1.3, 1.4], arrival=1.0),      # ttft 0.2, gaps 0.1: hit both
        _record([2.5], arrival=2.0),                # one token: ttft only, hit
        _record([3.1, 3.2], arrival=3.0, error="x"),
        _record([], arrival=3.5, finished=False),
    ]
    s = summarize(records, SLO(ttft_s=0.5, tbt_s=0.25), duration_s=5.0)
    json.dumps(s, allow_nan=False)
    assert s["count"] == 5 and s["finished"] == 4 and s["errors"] == 1
    assert s["attainment"] == pytest.approx(2 / 5)
    assert s["goodput_fraction"] == pytest.approx(3 / 5) and s["goodput_rps"] == pytest.approx(3 / 5)
    assert s["throughput_rps"] == pytest.approx(3 / 5)
    assert s["output_tok_per_s"] == pytest.approx(10 / 5)
    assert s["ttft_p50_s"] == pytest.approx(0.5)  # ttfts 0.5, 0.2, 0.5
    assert s["tpot_p50_s"] == pytest.approx(0.15) and s["tpot_p99_s"] == pytest.approx(0.1 + 0.99 * 0.1)
    assert s["itl_p50_s"] == pytest.approx(0.1)
    empty = summarize([], SLO(1, 1), 1.0)
    assert empty["count"] == 0 and empty["ttft_p99_s"] is None and empty["attainment"] == 0.0
    with pytest.raises(ValueError):
        summarize(records, SLO(1, 1), 0.0)


def test_effective_throughput_envelope():
    table = {1.0: 1.0, 2.0: 0.95, 3.0: 0.9, 4.0: 0.85, 5.0: 0.93}
    assert effective_throughput(table) == 3.0  # 5.0 passes but lies above a failing rate
    assert effective_throughput(table, target=0.96) == 1.0
    assert effective_throughput({1.0: 0.5, 2.0: 0.95}) is None
    assert effective_throughput({}) is None


def test_bisect_rate_finds_threshold():
    threshold = 3.7

    def measure(rate: float) -> float:
        return 1.0 if rate <= threshold else max(0.0, 1.0 - (rate - threshold))

    best, probes = bisect_rate(measure, 1.0, 10.0, target=0.9, iterations=10)
    assert best <= threshold + 0.1 + 1e-9 and threshold + 0.1 - best <= 9.0 / 2**10 + 1e-9
    assert probes[1.0] == 1.0 and 10.0 in probes and len(probes) == 12
    assert effective_throughput(probes) == best
    assert bisect_rate(measure, 5.0, 8.0)[0] == 0.0
    assert bisect_rate(measure, 1.0, 3.0)[0] == 3.0
    with pytest.raises(ValueError):
        bisect_rate(measure, 2.0, 1.0)


def test_modules_need_no_model(tmp_path: Path):
    # Guard: nothing here reads a model directory; the tokenizer is any callable.
    assert load_samples("synthetic:4:4", lambda s: list(range(len(s.split()))), 1, seed=0)[0].prompt_len == 4


def test_bench_rates_are_bounds_or_a_list():
    from bench.serve_bench import parse_rates

    assert parse_rates("0.5:2") == (0.5, 2.0)
    assert parse_rates("2,0.5,1") == [0.5, 1.0, 2.0]


def test_rescore_recomputes_attainment_at_other_slos(tmp_path, capsys):
    from dataclasses import asdict

    from bench.rescore import main as rescore

    fast = RequestRecord("a", 0.0, 0.5, [0.5, 0.6, 0.7], True, None, 3, 3)  # TTFT 0.5 s, gaps 0.1 s
    slow = RequestRecord("b", 0.0, 4.0, [4.0, 4.1, 4.2], True, None, 3, 3)  # TTFT 4 s
    (tmp_path / "vllm-rate1.json").write_text(json.dumps({"records": [asdict(fast), asdict(slow)]}))
    unloaded = {"ttft_p50_s": 0.2, "tpot_p50_s": 0.01}
    (tmp_path / "summary.json").write_text(json.dumps(
        {"systems": {"vllm": {"unloaded": unloaded, "attainment_by_rate": {"1.0": 0.5}}}}))
    assert rescore([str(tmp_path), "--scales", "10x20,25x20"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "| vllm |" in line]
    # 10× → TTFT 2 s: only the fast request; 25× → 5 s: both (TBT 20× = 0.2 s ≥ every gap).
    assert rows[0].endswith("| 0 | 1: 0.50 |") and rows[1].endswith("| 1 | 1: 1.00 |")
