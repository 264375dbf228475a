"""The GEMMs of one decode step on each CPU kernel: ours (AMX for bf16, AVX-512 for fp32) against oneDNN.

One pass runs the linear layers of a model's decode step in order (per layer the fused QKV, the
output projection and the two MLP projections, then the LM head) on random weights, so that the
weights stream from memory as in a real step, not from a cache. Kernels alternate pass by pass and
the best pass of each is kept; the read bandwidth is measured between them. Output: ms per pass and
the rate at which it read the weights (GB/s).

    flock /tmp/bench.lock .venv/bin/python -m bench.gemm_kernels [--dtype bfloat16] [--rows 1,16,64,256] [--repeats 7]
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
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernels.load()
    dtype = getattr(torch, args.dtype)
    shapes = step_shapes(**DEFAULT_SHAPES)
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(n, k, generator=g) * 0.05).to(dtype) for n, k in shapes]
    ours = {kernels.gemm_kernel(w) for w in weights}
    if ours != {"amx"} and ours != {"avx512"}:
        raise SystemExit(f"our kernels cannot run every {args.dtype} weight on this CPU ({ours}): only oneDNN would")
    pack, linear = kernels.gemm_ops(ours.pop())
    packed = {
        "onednn": [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights],
        "ours": [pack(w) for w in weights],
    }
    del weights
    run = {
        "onednn": lambda x, p, n: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""),
        "ours": lambda x, p, n: linear(x, p, n, None, None, False),
    }
    weight_bytes = sum(n * k * dtype.itemsize for n, k in shapes)
    probe = torch.ones(1 << 28)  # 1 GiB of float32 for the read bandwidth
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        inputs = {k: torch.randn(rows, k, generator=g).to(dtype) for k in {k for _, k in shapes}}
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
        row["speedup"] = best["onednn"] / best["ours"]
        results.append(row)
        print(f"rows {rows}: oneDNN {row['onednn_ms']:.2f} ms ({row['onednn_gb_s']:.1f} GB/s), "
              f"ours {row['ours_ms']:.2f} ms ({row['ours_gb_s']:.1f} GB/s), {row['speedup']:.2f}x; "
              f"read bandwidth {row['read_gb_s']:.1f} GB/s", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"shapes": DEFAULT_SHAPES, "dtype": args.dtype, "weight_bytes": weight_bytes,
                                         "results": results},
                                        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
