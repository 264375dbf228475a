"""Plots of a projection: effective throughput by system, one figure per dataset and CV, and each
cell's attainment curves (through `bench.bench_plots`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the file-only backend

from bench.bench_plots import plot_attainment  # noqa: E402


def plot_projection(cells: list[dict], out: Path) -> list[Path]:
    """`projection-DATASET-cvCV-sSCALE.png`: grouped bars of the interpolated effective throughput of
    each system per setting; and `cells/SETTING-DATASET-cvCV-sSCALE/attainment.png` per cell."""
    written = []
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["dataset"], c["cv"], c["slo_scale"]), []).append(c)
        folder = out / "cells" / f"{c['setting']}-{c['dataset']}-cv{c['cv']:g}-s{c['slo_scale']:g}"
        folder.mkdir(parents=True, exist_ok=True)
        by_rate = {name: {"attainment_by_rate": {float(r): a for r, a in result["attainment_by_rate"].items()}}
                   for name, result in c["systems"].items()}  # JSON keys are strings
        plot_attainment(by_rate, folder)
    for (dataset, cv, scale), group in groups.items():
        systems = list(group[0]["systems"])
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(systems)
        for i, name in enumerate(systems):
            values = [c["systems"][name].get("crossing", c["systems"][name]["effective_throughput"]) for c in group]
            ax.bar([x + i * width for x in range(len(group))], values, width, label=name)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(group))], [c["setting"] for c in group], fontsize=8)
        ax.set_ylabel("effective throughput (req/s)")
        ax.set_title(f"{dataset}, CV {cv:g}, SLO {scale:g}x unloaded (simulated)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"projection-{dataset}-cv{cv:g}-s{scale:g}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
