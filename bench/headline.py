"""The headline table of several `aptserve bench` runs: effective throughput per cell and system, over seeds.

    python -m bench.headline results/bench/i14-*-s0 results/bench/i14-*-s1 --baseline vllm \
        --out results/bench/i14-headline

A cell is a (dataset, CV) pair; each run directory is one seed of one cell (its `summary.json` says
which). For every system the table gives, per seed, the effective throughput the run's probes
established (the highest rate that met the attainment target together with every lighter one) and
the rate where the attainment curve crosses the target, interpolated linearly between the last
passing and the first failing probe (bisection leaves a gap between them; the crossing ranks systems
within it). Two runs of the same cell, system and seed are refused, unless `--repeated best`: then the
better run is kept (higher effective throughput, then crossing) and the table lists every run's
effective throughput beside it, in brackets. Running the baseline again after the others and keeping
its better run is the conservative comparison on a machine whose speed drifts. Ratios to the baseline are
taken per seed and then given as their range. Beside them: the
P99 time between tokens at the effective rate (the served requests' worst gaps) and, for our servers,
the step-time model's median relative error over the run (from the saved /metrics). Writes
`headline.md`, `headline.json` and `headline.png` (attainment against rate, one panel per cell).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from bench.serve_bench import System, probe_file
from bench.server_metrics import parse_metrics
from bench.slo_metrics import effective_throughput


def crossing(attainment_by_rate: dict[float, float], target: float = 0.9) -> float | None:
    """The rate where attainment falls through `target`, linear between the last rate of the passing
    run from the lowest probe up and the next probe; the highest probe if none fails, None if the
    lowest fails."""
    rates = sorted(attainment_by_rate)
    passing = effective_throughput(attainment_by_rate, target)
    if passing is None:
        return None
    later = [r for r in rates if r > passing]
    if not later:
        return passing
    failing = later[0]
    above, below = attainment_by_rate[passing], attainment_by_rate[failing]
    return passing + (failing - passing) * (above - target) / (above - below)


def _rank(run: dict) -> tuple[float, float]:
    return (run["effective"] or 0.0, run["crossing"] or 0.0)


def load_runs(directories: list[Path], repeated: str = "refuse") -> dict[str, dict[str, dict[int, dict]]]:
    """cell → system → seed → {"effective", "crossing", "attainment", "itl_p99_s", "step_time_error",
    "runs_effective"} from each run's summary.json, its probe at the effective rate (P99 time between
    tokens there) and the server's saved /metrics (our servers: the step-time model's median relative
    error). A second run of a cell, system and seed is refused, or with `repeated="best"` the better
    of them kept (`runs_effective`: every run's effective throughput, in the order given)."""
    cells: dict[str, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for directory in directories:
        if not (directory / "summary.json").exists():
            print(f"skipped {directory}: no summary.json (an unfinished run)", file=sys.stderr)
            continue
        summary = json.loads((directory / "summary.json").read_text())
        settings = summary["settings"]
        cell = f"{settings['dataset']}, CV {settings['cv']:g}"
        for system, result in summary["systems"].items():
            attainment = {float(r): a for r, a in result["attainment_by_rate"].items()}
            effective = result["effective_throughput_rps"]
            probe = probe_file(directory, system, effective) if effective else None
            itl = json.loads(probe.read_text())["summary"]["itl_p99_s"] if probe and probe.exists() else None
            metrics = directory / f"{System(system).name}-metrics.txt"
            error = parse_metrics(metrics.read_text()).get("step_time_median_rel_error") if metrics.exists() else None
            run = {"effective": effective, "crossing": crossing(attainment), "attainment": attainment,
                   "itl_p99_s": itl, "step_time_error": error, "runs_effective": [effective]}
            earlier = cells[cell][system].get(settings["seed"])
            if earlier is not None:
                if repeated != "best":  # a second run would silently replace the first
                    raise SystemExit(f"{directory}: {system} already has a run of {cell}, seed {settings['seed']}")
                runs = earlier["runs_effective"] + [effective]
                run = max(earlier, run, key=_rank) | {"runs_effective": runs}
            cells[cell][system][settings["seed"]] = run
    return cells


def _span(values: list[float]) -> str:
    if not values:
        return "–"
    low, high = min(values), max(values)
    return f"{low:.2f}" if abs(high - low) < 5e-3 else f"{low:.2f}–{high:.2f}"


def _by_seed(seeds: dict[int, dict], key: str, spec: str) -> str:
    """One run value per seed, in seed order ("–" where a run has none); for the effective throughput of
    a seed run more than once, every run's in brackets after the kept one."""
    def shown(value: float | None) -> str:
        return "–" if value is None else format(value, spec)

    values = []
    for seed in sorted(seeds):
        text = shown(seeds[seed][key])
        runs = seeds[seed].get("runs_effective", [])
        if key == "effective" and len(runs) > 1:
            text += " [" + " / ".join(shown(r) for r in runs) + "]"
        values.append(text)
    return ", ".join(values)


def headline_table(cells: dict[str, dict[str, dict[int, dict]]], baseline: str) -> tuple[str, dict]:
    """Markdown rows: per cell and system, the seeds' effective throughputs and crossings, and the ratios."""
    lines = ["| cell | system | effective throughput by seed (req/s) | 90% crossing by seed (req/s) "
             f"| ÷ {baseline}, effective | ÷ {baseline}, crossing | P99 TBT there (s) | step-time model error |",
             "| --- | --- | --- | --- | ---: | ---: | --- | --- |"]
    data: dict = {}
    for cell, systems in sorted(cells.items()):
        base = systems.get(baseline, {})
        for system, seeds in systems.items():
            ratios = {"effective": [], "crossing": []}
            for seed, run in seeds.items():
                for key in ratios:
                    ours, theirs = run[key], base.get(seed, {}).get(key)
                    if ours is not None and theirs:
                        ratios[key].append(ours / theirs)
            ordered = sorted(seeds)
            shown = ("" if system == baseline else _span(ratios["effective"]),
                     "" if system == baseline else _span(ratios["crossing"]))
            errors = [seeds[s]["step_time_error"] for s in ordered if seeds[s]["step_time_error"] is not None]
            error = ", ".join(f"{e:.0%}" for e in errors) or "–"
            lines.append(f"| {cell} | {system} | {_by_seed(seeds, 'effective', '.3g')} "
                         f"| {_by_seed(seeds, 'crossing', '.2f')} | {shown[0]} | {shown[1]} "
                         f"| {_by_seed(seeds, 'itl_p99_s', '.2f')} | {error} |")
            data.setdefault(cell, {})[system] = {"seeds": {str(s): seeds[s] for s in ordered},
                                                 "ratio_to_baseline": ratios}
    return "\n".join(lines) + "\n", data


def plot(cells: dict[str, dict[str, dict[int, dict]]], path: Path, target: float = 0.9) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(cells)
    figure, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    for axis, cell in zip(axes[0], names):
        for index, (system, seeds) in enumerate(sorted(cells[cell].items())):
            for seed, run in sorted(seeds.items()):
                rates = sorted(run["attainment"])
                axis.plot(rates, [run["attainment"][r] for r in rates], marker="o", color=f"C{index}",
                          linestyle="-" if seed == min(seeds) else "--",
                          label=f"{system} (seed {seed})")
        axis.axhline(target, color="grey", linewidth=0.8)
        axis.set_title(cell)
        axis.set_xlabel("request rate (req/s)")
        axis.set_ylim(0, 1.05)
    axes[0][0].set_ylabel("SLO attainment")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="`aptserve bench` result directories")
    parser.add_argument("--baseline", default="vllm")
    parser.add_argument("--repeated", choices=["refuse", "best"], default="refuse",
                        help="a second run of a cell, system and seed: refused, or the better one kept")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    cells = load_runs(args.runs, args.repeated)
    table, data = headline_table(cells, args.baseline)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "headline.md").write_text(table)
    (args.out / "headline.json").write_text(json.dumps(data, indent=2))
    plot(cells, args.out / "headline.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
