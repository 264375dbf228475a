"""Re-score an `aptserve bench` results folder at other SLOs, from its per-request records.

    .venv/bin/python -m bench.rescore results/bench/NAME --scales 10x20,25x30

A scale `AxB` sets TTFT = A × and TBT = B × vLLM's unloaded TTFT and TPOT, from the folder's
`summary.json` (run with `--unloaded`) or a calibration run's (`--unloaded-from`). For each scale
and system: attainment at every probed rate and the effective throughput (≥ 90%). The run's own
SLOs, fixed before measuring, stay the primary result; this shows how the comparison moves with the
SLO (the paper's SLO-scale sweep).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.serve_bench import load_records, probe_file
from bench.slo_metrics import SLO, effective_throughput, meets_paper_slo


def attainment_by_rate(folder: Path, spec: str, rates: list[float], slo: SLO) -> dict[float, float]:
    out = {}
    for rate in rates:
        records = load_records(probe_file(folder, spec, rate))
        out[rate] = sum(meets_paper_slo(r, slo) for r in records) / len(records)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rescore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--scales", default="10x20,25x30", help="TTFTxTBT multiples of vLLM's unloaded timing")
    parser.add_argument("--unloaded-from", type=Path, help="the summary.json with vLLM's unloaded timing "
                        "(default: the folder's own; a `--calibrate` run's otherwise)")
    args = parser.parse_args(argv)
    summary = json.loads((args.folder / "summary.json").read_text())
    calibration = json.loads(args.unloaded_from.read_text()) if args.unloaded_from else summary
    unloaded = calibration["systems"]["vllm"]["unloaded"]
    lines = ["| SLO (TTFT, TBT) | system | effective throughput (req/s) | attainment by rate |",
             "| --- | --- | ---: | --- |"]
    for scale in args.scales.split(","):
        a, b = (float(x) for x in scale.split("x"))
        slo = SLO(ttft_s=a * unloaded["ttft_p50_s"], tbt_s=b * unloaded["tpot_p50_s"])
        for spec, result in summary["systems"].items():
            rates = sorted(float(r) for r in result["attainment_by_rate"])
            by_rate = attainment_by_rate(args.folder, spec, rates, slo)
            shown = ", ".join(f"{r:g}: {v:.2f}" for r, v in by_rate.items())
            lines.append(f"| {a:g}×, {b:g}× ({slo.ttft_s:.2f} s, {slo.tbt_s * 1000:.0f} ms) | {spec} "
                         f"| {effective_throughput(by_rate) or 0:g} | {shown} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
