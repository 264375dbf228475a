"""The GEMMs of one decode step on each CPU kernel: our AMX kernel against oneDNN, side by side.

One pass runs the linear layers of a model's decode step in order (per layer the fused QKV, the
output projection and the two MLP projections, then the LM head) on random bf16 weights, so that the
weights stream from memory as in a real step, not from a cache. Kernels alternate pass by pass and
the best pass of each is kept; the read bandwidth is measured between them. Output: ms per pass and
the rate at which it read the weights (GB/s).

    flock /tmp/bench.lock .venv/bin/python -m bench.gemm_kernels [--rows 1,16,64,256] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.engine_throughput import read_bandwidth
from hybrid_cache import kernels

# OPT-125m: hidden 768, MLP 3072, 12 layers, vocabulary 50272 (the offline benchmark's model).
DEFAULT_SHAPES = {"hidden": 768, "ffn": 3072, "layers": 12, "vocab": 50272}


def step_shapes(hidden: int, ffn: int, layers: int, vocab: int) -> list[tuple[int, int]]:
    """(out, in) of every GEMM in a decode step, in order."""
    layer = [(3 * hidden, hidden), (hidden, hidden), (ffn, hidden), (hidden, ffn)]
    return layer * layers + [(vocab, hidden)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,16,64,256", help="input rows (the batch of a decode step)")
    parser.add_argument("--repeats", type=int, default=7, help="passes per kernel and row count; best kept")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernels.load()
    if not torch.ops.aptserve.amx_available():
        raise SystemExit("this CPU has no AMX tiles: only oneDNN would run")
    shapes = step_shapes(**DEFAULT_SHAPES)
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16) for n, k in shapes]
    packed = {
        "onednn": [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights],
        "amx": [torch.ops.aptserve.amx_pack(w) for w in weights],
    }
    del weights
    run = {
        "onednn": lambda x, p, n: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""),
        "amx": lambda x, p, n: torch.ops.aptserve.amx_linear(x, p, n, None, None, False),
    }
    weight_bytes = sum(n * k * 2 for n, k in shapes)
    probe = torch.ones(1 << 28)  # 1 GiB of float32 for the read bandwidth
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        inputs = {k: torch.randn(rows, k, generator=g).to(torch.bfloat16) for k in {k for _, k in shapes}}
        best = {name: float("inf") for name in packed}
        bandwidth = []
        for _ in range(args.repeats):
            for name in packed:
                start = time.perf_counter()
                for (n, k), p in zip(shapes, packed[name]):
                    run[name](inputs[k], p, n)
                best[name] = min(best[name], time.perf_counter() - start)
            bandwidth.append(read_bandwidth(probe, repeats=3))
        row = {"rows": rows, "read_gb_s": max(bandwidth)}
        for name, seconds in best.items():
            row[f"{name}_ms"] = seconds * 1e3
            row[f"{name}_gb_s"] = weight_bytes / seconds / 1e9
        row["amx_speedup"] = best["onednn"] / best["amx"]
        results.append(row)
        print(f"rows {rows}: oneDNN {row['onednn_ms']:.2f} ms ({row['onednn_gb_s']:.1f} GB/s), "
              f"AMX {row['amx_ms']:.2f} ms ({row['amx_gb_s']:.1f} GB/s), {row['amx_speedup']:.2f}x; "
              f"read bandwidth {row['read_gb_s']:.1f} GB/s", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"shapes": DEFAULT_SHAPES, "weight_bytes": weight_bytes, "results": results},
                                        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
