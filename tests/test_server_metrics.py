"""The benchmark's reading of /metrics pages and its time split, against hand-computed cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.serve_bench import markdown_tables
from bench.server_metrics import counters_since, parse_metrics, time_split
from bench.slo_metrics import RequestRecord

VLLM_PAGE = """\
# HELP vllm:num_preemptions_total Preemptions.
vllm:num_preemptions_total{engine="0",model_name="bench"} 3.0
vllm:generation_tokens_total{engine="0",model_name="bench"} 100.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="bench"} 9.6
vllm:e2e_request_latency_seconds_count{engine="0",model_name="bench"} 4.0
vllm:cache_config_info{block_size="32",num_gpu_blocks="32",num_cpu_blocks="0"} 1.0
"""

OUR_PAGE = """\
aptserve:num_cache_blocks{model="bench",replica="0"} 31.0
aptserve:num_preemptions_total{model="bench",replica="0"} 2.0
aptserve:generation_tokens_total{model="bench",replica="0"} 40.0
aptserve:generation_tokens_by_cache_type_total{cache_type="kv",model="bench",replica="0"} 30.0
aptserve:generation_tokens_by_cache_type_total{cache_type="hidden",model="bench",replica="0"} 10.0
aptserve:e2e_request_latency_seconds_sum{model="bench",replica="0"} 5.0
aptserve:e2e_request_latency_seconds_count{model="bench",replica="0"} 2.0
aptserve:step_seconds_total{model="bench",part="scheduling",replica="0"} 0.5
aptserve:step_seconds_total{model="bench",part="execute",replica="0"} 12.0
aptserve:step_seconds_total{model="bench",part="model",replica="0"} 9.0
aptserve:step_seconds_total{model="bench",part="attention",replica="0"} 3.0
aptserve:step_seconds_total{model="bench",part="recompute",replica="0"} 1.0
"""


def finished(arrival: float, last: float) -> RequestRecord:
    return RequestRecord("r", arrival, token_times=[arrival + 0.1, last], finished=True)


def test_a_vllm_page_reads_blocks_preemptions_and_engine_latency() -> None:
    found = parse_metrics(VLLM_PAGE)
    assert found["num_cache_blocks"] == 32 and found["preemptions"] == 3 and found["generation_tokens"] == 100
    assert "hidden_token_share" not in found  # vLLM has no hidden cache: no share, not a 0% one
    # Client mean e2e (2.0 + 3.0) / 2 = 2.5 s against the engine's 9.6 / 4 = 2.4 s: 100 ms of serving.
    split = time_split(found, [finished(0.0, 2.0), finished(1.0, 4.0), RequestRecord("cut", 0.0, token_times=[9.0])])
    assert split == {"serving_overhead_ms": pytest.approx(100.0)}


def test_the_probes_counters_are_what_they_added_after_warm_up() -> None:
    warm = {"engine_e2e_count": 1.0, "engine_e2e_seconds_sum": 0.4, "preemptions": 1.0, "num_cache_blocks": 32.0}
    since = counters_since(parse_metrics(VLLM_PAGE), warm)
    assert since["engine_e2e_count"] == 3 and since["engine_e2e_seconds_sum"] == pytest.approx(9.2)
    assert since["preemptions"] == 2 and "num_cache_blocks" not in since  # a size, not a counter


def test_our_page_reads_the_step_split_and_hidden_share() -> None:
    found = parse_metrics(OUR_PAGE)
    assert found["num_cache_blocks"] == 31 and found["hidden_token_share"] == pytest.approx(0.25)
    split = time_split(found, [finished(0.0, 2.8)])
    assert split["executor_overhead_s"] == pytest.approx(3.0) and split["model_s"] == 9.0
    assert split["serving_overhead_ms"] == pytest.approx(300.0)  # 2.8 s against 5.0 / 2


def test_the_tables_say_below_the_lowest_rate_and_show_each_probe() -> None:
    probe = {"attainment": 0.93, "goodput_fraction": 0.96, "finished": 199, "count": 200, "ttft_p50_s": 0.43,
             "ttft_p90_s": 1.414, "tpot_p50_s": 0.0594, "itl_p99_s": 1.15, "output_tok_per_s": 14.04}
    results = {"vllm": {"effective_throughput_rps": 0.5, "attainment_by_rate": {0.5: 0.93, 1.0: 0.4},
                        "probes": {0.5: probe}},
               "aptserve:apt/hybrid": {"effective_throughput_rps": 0.0, "attainment_by_rate": {0.5: 0.7},
                                       "time_split": time_split(parse_metrics(OUR_PAGE), [])}}
    table = markdown_tables(results)
    assert "| vllm | 0.5 | 0.5: 0.93, 1: 0.40 |" in table
    assert "| aptserve:apt/hybrid | < 0.5 | 0.5: 0.70 |" in table
    assert "| vllm | 0.5 | 0.93 | 0.96 | 199/200 | 0.43 / 1.41 | 59 | 1.15 | 14.0 |" in table
    assert "| aptserve:apt/hybrid | 0.5 | 12.0 | 9.0 | 3.0 | 1.0 | 3.0 |  |  |" in table


def test_the_headline_crossing_interpolates_between_the_last_pass_and_the_first_fail(tmp_path: Path) -> None:
    import json

    from bench.headline import crossing, headline_table, load_runs

    assert crossing({3.0: 0.99, 6.0: 0.95, 9.0: 0.45, 15.0: 0.2}) == pytest.approx(6.3)  # 6 + 3·0.05/0.5
    assert crossing({3.0: 0.99, 6.0: 0.5, 9.0: 0.95}) == pytest.approx(3 + 3 * 0.09 / 0.49)  # 9 is noise
    assert crossing({3.0: 0.95, 6.0: 0.92}) == 6.0  # nothing failed: the highest probe
    assert crossing({3.0: 0.5, 6.0: 0.2}) is None
    for seed, (vllm, ours) in enumerate([({3: 1.0, 9: 0.9, 15: 0.2}, {3: 1.0, 6: 0.95, 9: 0.45}),
                                         ({3: 1.0, 9: 0.95, 12: 0.5}, {3: 1.0, 6: 0.9, 9: 0.6})]):
        run = tmp_path / f"s{seed}"
        run.mkdir()
        systems = {name: {"effective_throughput_rps": max(r for r, a in curve.items() if a >= 0.9),
                          "attainment_by_rate": {str(r): a for r, a in curve.items()}}
                   for name, curve in (("vllm", vllm), ("ours", ours))}
        run.joinpath("summary.json").write_text(json.dumps(
            {"settings": {"dataset": "sharegpt", "cv": 1.0, "seed": seed}, "systems": systems}))
    (tmp_path / "s0" / "ours-metrics.txt").write_text(
        '# TYPE aptserve:step_time_median_rel_error gauge\n'
        'aptserve:step_time_median_rel_error{model="bench",replica="0"} 0.25\n')
    table, data = headline_table(load_runs([tmp_path / "s0", tmp_path / "s1"]), "vllm")
    ratios = data["sharegpt, CV 1"]["ours"]["ratio_to_baseline"]
    assert ratios["effective"] == pytest.approx([6 / 9, 6 / 9])  # seed 1: 6 against 9
    assert ratios["crossing"][0] == pytest.approx(6.3 / 9.0)
    assert "| sharegpt, CV 1 | ours | 6, 6 |" in table and "0.67 |" in table
    assert data["sharegpt, CV 1"]["ours"]["seeds"]["0"]["step_time_error"] == 0.25 and "| 25% |" in table
    with pytest.raises(SystemExit, match="already has a run"):
        load_runs([tmp_path / "s0", tmp_path / "s1", tmp_path / "s0"])  # the same seed twice


def test_the_headline_keeps_the_better_of_repeated_runs_and_lists_both(tmp_path: Path) -> None:
    import json

    from bench.headline import headline_table, load_runs

    curves = {"first": ({3: 1.0, 6: 0.5}, {3: 1.0, 6: 0.95, 9: 0.2}), "again": ({3: 1.0, 6: 0.92, 9: 0.3}, None)}
    for name, (vllm, ours) in curves.items():
        run = tmp_path / name
        run.mkdir()
        systems = {system: {"effective_throughput_rps": max(r for r, a in curve.items() if a >= 0.9),
                            "attainment_by_rate": {str(r): a for r, a in curve.items()}}
                   for system, curve in (("vllm", vllm), ("ours", ours)) if curve is not None}
        run.joinpath("summary.json").write_text(json.dumps(
            {"settings": {"dataset": "humaneval", "cv": 2.0, "seed": 1}, "systems": systems}))
    for order in (["first", "again"], ["again", "first"]):
        cells = load_runs([tmp_path / name for name in order], repeated="best")
        kept = cells["humaneval, CV 2"]["vllm"][1]
        assert kept["effective"] == 6 and kept["attainment"][9.0] == 0.3  # the re-run's curve, whole
        assert sorted(kept["runs_effective"]) == [3, 6]
    table, data = headline_table(load_runs([tmp_path / "first", tmp_path / "again"], repeated="best"), "vllm")
    assert "| humaneval, CV 2 | vllm | 6 [3 / 6] |" in table
    assert data["humaneval, CV 2"]["ours"]["ratio_to_baseline"]["effective"] == [1.0]  # 6 against vLLM's better 6
