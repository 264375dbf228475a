"""Projection: effective throughput of fcfs/kv, apt/kv, fcfs/hybrid and apt/hybrid at GPU scale.

    flock /tmp/bench.lock .venv/bin/python -m bench.simulator.project --out results/simulator/projection

For each setting (model, GPUs, step-time model), dataset, CV and SLO scale, a coarse bisection of
fcfs/kv over 0.02–82 req/s (log spaced) finds the region, then each system's effective throughput (the
highest rate with ≥ 90% paper attainment) is bisected within a factor 2.83 of it, in log space, on
the same seeded requests; the 90% crossing interpolated between the last passing and the next probe
is reported beside it. SLOs are `scale ×` the unloaded median TTFT and TPOT of that
setting and dataset. Results go to `projection.json` (appended cell by cell) and `projection.md`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.simulator.api import SimConfig
from bench.simulator.sweep import dataset_lengths, sweep, unloaded
from bench.slo_metrics import SLO, effective_throughput

SETTINGS = {  # name: (profile, tp, step model)
    "opt-13b-1xa100": ("a100-80g/opt-13b", 1, "fitted"),
    "opt-66b-4xa100": ("a100-80g/opt-66b", 4, "fitted"),
    "opt-66b-8xa100": ("a100-80g/opt-66b", 8, "fitted"),
    "llama2-7b-1xh100": ("h100-80g/llama-2-7b", 1, "roofline"),
}
DATASETS = {"sharegpt": "sharegpt", "long": "synthetic:2048-8192:64-256", "humaneval": "humaneval"}
SYSTEMS = (("fcfs", "kv"), ("apt", "kv"), ("fcfs", "hybrid"), ("apt", "hybrid"))
LONG_CONTEXT = 8448  # the long-prompt workload needs it; beyond OPT's 2,048 the fits are extrapolated


def cell(setting: str, dataset: str, cv: float, scale: float, requests: int, iterations: int, seed: int,
         duration_s: float | None = None) -> dict:
    profile, tp, step_model = SETTINGS[setting]
    spec = DATASETS[dataset]
    samples = dataset_lengths(spec, requests, seed, 1024, 2048)
    longest = max(s.prompt_len + s.output_len for s in samples)
    base = SimConfig(profile=profile, tp=tp, step_model=step_model,
                     max_model_len=LONG_CONTEXT if longest > 2048 else None)
    alone = unloaded(base, samples)
    slo = SLO(scale * alone.ttft_s, scale * alone.tpot_s)
    out = {"setting": setting, "dataset": dataset, "cv": cv, "slo_scale": scale, "unloaded": asdict(alone),
           "requests": requests, "duration_s": duration_s,
           "slo": asdict(slo), "systems": {}}
    coarse = sweep(base.model_copy(update={"ttft_slo_s": slo.ttft_s, "tbt_slo_s": slo.tbt_s}), samples,
                   (1e-6, 12.0), cv, seed, slo, 4, rate_map=lambda u: 0.02 * 2**u,  # fcfs/kv, 0.02..82 req/s
                   duration_s=duration_s)
    centre = coarse["effective_throughput"] or 0.02
    out["coarse_fcfs_kv"] = coarse["attainment_by_rate"]
    for policy, cache in SYSTEMS:
        config = base.model_copy(update={"policy": policy, "cache": cache, "ttft_slo_s": slo.ttft_s,
                                         "tbt_slo_s": slo.tbt_s})
        # Fine bisection within [centre/2.83, centre·2.83] in log space; wide again if it fails at the bottom.
        result = sweep(config, samples, (1e-6, 3.0), cv, seed, slo, iterations,
                       rate_map=lambda u, low=centre / 2**1.5: low * 2**u, duration_s=duration_s)
        if not result["effective_throughput"]:
            result = sweep(config, samples, (1e-6, 12.0), cv, seed, slo, iterations + 2,
                           rate_map=lambda u: 0.02 * 2**u, duration_s=duration_s)
        result["crossing"] = crossing(result["attainment_by_rate"])
        out["systems"][f"{policy}/{cache}"] = result
    return out


def crossing(attainment: dict[float, float], target: float = 0.9) -> float:
    """Where attainment falls through `target`, linearly interpolated between the highest rate of the
    passing envelope (`effective_throughput`) and the next probed rate; that rate if none is higher."""
    best = effective_throughput(attainment, target)
    if best is None:
        return 0.0
    higher = sorted(r for r in attainment if r > best)
    if not higher:
        return best
    nxt = higher[0]
    a0, a1 = attainment[best], attainment[nxt]
    return best + (nxt - best) * (a0 - target) / (a0 - a1) if a0 > a1 else best


def markdown(cells: list[dict]) -> str:
    """Per cell: each system's effective throughput (highest passing probe; `≥` when that was the highest
    rate probed) and, in brackets, the interpolated 90% crossing; the best system's crossing over fcfs/kv's."""
    names = [f"{p}/{c}" for p, c in SYSTEMS]
    lines = ["| setting | dataset | CV | SLO scale (TTFT, TBT ms) | " + " | ".join(names) + " | best / fcfs/kv |",
             "| --- | --- | ---: | --- | " + " | ".join("---:" for _ in names) + " | ---: |"]
    for c in cells:
        eff = [c["systems"][n]["effective_throughput"] for n in names]
        cross = [c["systems"][n].get("crossing", e) for n, e in zip(names, eff)]
        gain = f"{max(cross) / cross[0]:.2f}x" if cross[0] else ("inf" if max(cross) else "-")
        slo = f"{c['slo_scale']:g}x ({c['slo']['ttft_s'] * 1000:.0f}, {c['slo']['tbt_s'] * 1000:.0f})"
        capped = [max(map(float, c["systems"][n]["attainment_by_rate"])) == e for n, e in zip(names, eff)]
        gain = ("≥ " if capped[int(np.argmax(cross))] else "") + gain
        lines.append(f"| {c['setting']} | {c['dataset']} | {c['cv']:g} | {slo} | "
                     + " | ".join(f"{'≥ ' if top else ''}{e:.2f} ({x:.2f})" for e, x, top in zip(eff, cross, capped))
                     + f" | {gain} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--cvs", default="1,4")
    parser.add_argument("--scales", default="10")
    parser.add_argument("--requests", type=int, default=200, help="requests per probe (the most, with --duration)")
    parser.add_argument("--duration", type=float, help="seconds of trace per probe: rate x duration requests")
    parser.add_argument("--cells", help="SETTING/DATASET/CV/SCALE;... instead of the full grid, in this order")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replot", action="store_true", help="only redo the table and plots from projection.json")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "projection.json"
    cells = json.loads(path.read_text()) if path.exists() else []
    done = {(c["setting"], c["dataset"], c["cv"], c["slo_scale"]) for c in cells}
    grid = [(s, d, float(cv), float(k)) for d in args.datasets.split(",") for cv in args.cvs.split(",")
            for k in args.scales.split(",") for s in args.settings.split(",")]
    if args.cells:
        grid = [(s, d, float(cv), float(k)) for s, d, cv, k in (c.split("/") for c in args.cells.split(";"))]
    for key in tqdm([] if args.replot else [g for g in grid if g not in done], desc="projection cells", unit="cell"):
        cells.append(cell(*key, args.requests, args.iterations, args.seed, args.duration))
        path.write_text(json.dumps(cells, indent=1))
        (args.out / "projection.md").write_text(markdown(cells) + "\n")
    from bench.simulator.plots import plot_projection

    plot_projection(cells, args.out)
    print(markdown(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
