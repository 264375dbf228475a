"""The simulator's model tables: roofline against the fitted vLLM step times, capacities, and the α
that the hidden cache's recompute implies on each profile.

    .venv/bin/python -m bench.simulator.report
"""

from __future__ import annotations

from bench.simulator.factory import build_step_time, capacity_tokens, load_measured, recompute_cost
from bench.simulator.hardware import parse_profile
from bench.simulator.step_time import StepShape

SHAPES = {
    "prefill 1x512": StepShape(1, 512, 512**2),
    "prefill 4x512": StepShape(4, 2048, 4 * 512**2),
    "decode 8, ctx 8k": StepShape(num_decode=8, decode_context=8000),
    "decode 64, ctx 64k": StepShape(num_decode=64, decode_context=64000),
    "decode 128, ctx 128k": StepShape(num_decode=128, decode_context=128000),
}
FITTED = (("a100-80g/opt-13b", 1), ("a100-80g/opt-13b", 2), ("a100-80g/opt-13b", 4), ("a100-80g/opt-66b", 2),
          ("a100-80g/opt-66b", 4), ("a100-80g/opt-66b", 8))
ALPHA = (("a100-80g/opt-13b", 1), ("a100-80g/opt-66b", 4), ("a100-80g/opt-66b", 8), ("h100-80g/llama-2-7b", 1),
         ("h200/opt-66b", 8))


def main() -> int:
    print("| profile | TP | " + " | ".join(SHAPES) + " | capacity (tokens) |")
    print("| --- | ---: | " + " | ".join("---" for _ in SHAPES) + " | --- |")
    for name, tp in FITTED:
        profile = parse_profile(name)
        fitted, roofline = build_step_time("fitted", profile, tp), build_step_time("roofline", profile, tp)
        cells = [f"{fitted.seconds(s) * 1000:.0f} / {roofline.seconds(s) * 1000:.0f}" for s in SHAPES.values()]
        caps = f"{capacity_tokens('fitted', profile, tp)} / {capacity_tokens('roofline', profile, tp)}"
        print(f"| {name} | {tp} | " + " | ".join(cells) + f" | {caps} |")
    print("\n(fitted / roofline, ms)\n")
    print("| profile | TP | α ms/16-token block (vidur) | (roofline) | 1,000 rows, ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, tp in ALPHA:
        profile = parse_profile(name)
        vidur, roof = recompute_cost(profile, tp), recompute_cost(profile, tp, "roofline")
        print(f"| {name} | {tp} | {vidur.alpha(16) * 1000:.3f} | {roof.alpha(16) * 1000:.3f} | "
              f"{vidur.seconds(1000) * 1000:.1f} |")
    _, cpu, data = load_measured()
    print(f"\nthis CPU ({data['model']}): α {cpu.per_token * 32 * 1000:.2f} ms per 32-token block, "
          f"fixed {cpu.fixed * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
