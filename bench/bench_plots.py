"""Plots of an `aptserve bench` results folder: attainment against rate for every system, and the TTFT
distribution of every system at one rate."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the file-only backend


def plot_attainment(results: dict, out: Path) -> None:
    """`attainment.png`: attainment by probed rate, one line per system, the 90% bar dashed."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, result in results.items():
        rates = sorted(float(r) for r in result["attainment_by_rate"])
        ax.plot(rates, [result["attainment_by_rate"][r] for r in rates], marker="o", label=name)
    ax.axhline(0.9, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("request rate (req/s)")
    _save(fig, ax, "SLO attainment", out / "attainment.png")


def plot_ttft_cdf(ttfts_by_system: dict[str, list[float | None]], rate: float, ttft_slo_s: float, out: Path) -> None:
    """`ttft-cdf.png`: the TTFT CDF of each system at `rate`; a request without a first token is a miss
    (the curve stays below 1 by the share of such requests)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ttfts in ttfts_by_system.items():
        seen = sorted(t for t in ttfts if t is not None)
        if not ttfts:
            continue
        ax.step(seen, [(i + 1) / len(ttfts) for i in range(len(seen))], where="post", label=name)
    ax.axvline(ttft_slo_s, color="grey", linestyle="--", linewidth=1, label="TTFT SLO")
    ax.set_xscale("log")
    ax.set_xlabel(f"time to first token (s), at {rate:g} req/s")
    _save(fig, ax, "share of requests", out / "ttft-cdf.png")


def _save(fig, ax, ylabel: str, path: Path) -> None:  # noqa: ANN001 - a matplotlib figure and axes
    """Both plots are shares in [0, 1] with a legend."""
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
