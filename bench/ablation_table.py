"""The policy × cache ablation as a Markdown table and a plot, from `aptserve replay --json` files.

    .venv/bin/python -m bench.ablation_table results/ablation [--png results/ablation/attainment.png]

Reads every `<policy>-<cache>-<blocks>.json` in the folder (one replay each, same trace and rate).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = [("fcfs", "kv"), ("fcfs", "hybrid"), ("apt", "kv"), ("apt", "hybrid")]


def load(folder: Path) -> dict[tuple[int, str, str], dict]:
    runs = {}
    for path in sorted(folder.glob("*.json")):
        summary = json.loads(path.read_text()).get("summary")
        if summary and "policy" in summary:
            runs[(summary["num_blocks"], summary["policy"], summary["cache"])] = summary
    return runs


def table(runs: dict[tuple[int, str, str], dict]) -> str:
    lines = [
        "| blocks | policy / cache | attainment | goodput (req/s) | finished | TTFT p50 (s) | TPOT p50 (ms) "
        "| preemptions | conversions | tokens from hidden | model (s) | attention (s) | recompute (s) "
        "| scheduling (s) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for blocks in sorted({key[0] for key in runs}):
        for policy, cache in ORDER:
            s = runs.get((blocks, policy, cache))
            if s is None:
                continue
            tokens = s["tokens_by_cache_type"]
            hidden_share = tokens["hidden"] / max(1, tokens["kv"] + tokens["hidden"])
            split = s["step_seconds"]
            lines.append(
                f"| {blocks} | {policy} / {cache} | {s['attainment']:.2f} | {s['goodput_rps']:.2f} "
                f"| {s['finished']}/{s['count']} | {s['ttft_p50_s']:.1f} | {s['tpot_p50_s'] * 1e3:.0f} "
                f"| {s['preemptions']} | {s['conversions']} | {hidden_share:.1%} | {split.get('model', 0):.1f} "
                f"| {split.get('attention', 0):.1f} | {split.get('recompute', 0):.1f} "
                f"| {split.get('scheduling', 0):.2f} |"
            )
    return "\n".join(lines)


def plot(runs: dict[tuple[int, str, str], dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({key[0] for key in runs})
    width = 0.8 / len(ORDER)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (policy, cache) in enumerate(ORDER):
        values = [runs.get((b, policy, cache), {}).get("attainment", 0.0) for b in budgets]
        ax.bar([x + i * width for x in range(len(budgets))], values, width, label=f"{policy}/{cache}")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(budgets))], [f"{b} blocks" for b in budgets])
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("policy × cache, same trace (aptserve replay)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--png", type=Path, help="also draw attainment per budget here")
    args = parser.parse_args(argv)
    runs = load(args.folder)
    if not runs:
        raise SystemExit(f"no replay results in {args.folder}")
    print(table(runs))
    if args.png:
        plot(runs, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
