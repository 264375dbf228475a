"""The per-part step timers (`model`, `attention`, `recompute`) agree with parts timed independently."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from hybrid_cache import kernels
from hybrid_cache.attention import make_backend
from hybrid_cache.config import CacheConfig
from hybrid_cache.plan import BatchPlan, CacheType, SamplingParams, SequencePlan
from worker.config import ModelConfig
from worker.model_runner import ModelRunner

SLEEP = 0.004  # a deliberately slow attention, so the attention share is large and known


class SlowBackend:
    """Wraps a real backend; sleeps in every call and times each call itself."""

    def __init__(self, name: str) -> None:
        self.inner = make_backend(name)
        self.name = self.inner.name
        self.calls = 0
        self.seconds = 0.0

    def build_metadata(self, *args):  # type: ignore[no-untyped-def]
        return self.inner.build_metadata(*args)

    def forward(self, *args):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = self.inner.forward(*args)
        time.sleep(SLEEP)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


@pytest.mark.parametrize("backend", ["torch", "cpu_paged"])
def test_attention_timer_covers_every_call_and_agrees_with_direct_timing(
    tiny_models: dict[str, Path], backend: str
) -> None:
    runner = ModelRunner(
        ModelConfig(path=str(tiny_models["opt"]), dtype="float32"),
        CacheConfig(block_size=4, num_blocks=64, recompute_chunk_tokens=8, attention_backend=backend),
    )
    slow = SlowBackend(backend)
    runner.backend = slow
    layers = runner.layout.num_layers
    greedy = SamplingParams(temperature=0.0)
    seqs = [
        SequencePlan(1, list(range(3, 14)), 0, CacheType.KV, [0, 1, 2, 5, 6], greedy),
        SequencePlan(2, list(range(5, 12)), 0, CacheType.HIDDEN, [3, 4], greedy),
    ]
    timer = runner.cache.workspace.timer
    before = dict(timer.totals), dict(timer.counts)
    wall = 0.0
    steps = 6
    for _ in range(steps):
        start = time.perf_counter()
        runner.execute(BatchPlan(seqs))
        wall += time.perf_counter() - start
        for seq in seqs:  # the next step decodes one token each, after what is now cached
            seq.start_pos, seq.token_ids = seq.context_len, [7]
    attention = timer.totals["attention"] - before[0].get("attention", 0.0)
    model = timer.totals["model"] - before[0].get("model", 0.0)
    recompute = timer.totals["recompute"] - before[0].get("recompute", 0.0)
    # Structure: one attention block per layer per step, one model block per step.
    assert timer.counts["attention"] - before[1].get("attention", 0) == layers * steps == slow.calls
    assert timer.counts["model"] - before[1].get("model", 0) == steps
    # Agreement with the direct timings (generous bounds: only the structure is exact).
    assert slow.seconds <= attention * 1.10 and attention <= slow.seconds * 1.10 + 0.002
    assert model <= wall and model >= 0.9 * wall
    assert attention <= model and 0 < recompute <= attention
    # The slow fake makes attention most of the step: the split must say so.
    assert attention / model >= (layers * steps * SLEEP) / wall * 0.9


@pytest.mark.parametrize("own_gemm", [True, False])
def test_backend_is_reported(tiny_models: dict[str, Path], own_gemm: bool) -> None:
    runner = ModelRunner(
        ModelConfig(path=str(tiny_models["opt"]), dtype="float32", own_gemm=own_gemm),
        CacheConfig(block_size=4, num_blocks=16, attention_backend="cpu_paged"),
    )
    assert runner.backend.name == "cpu_paged"
    # float32: our AVX-512 GEMM for weights of whole 16-column panels where the CPU has AVX-512, else oneDNN.
    kernels.load()
    weights = [m.weight for m in runner.model.modules() if isinstance(m, torch.nn.Linear)]
    weights.append(runner.model.lm_head_weight())
    expected = {kernels.gemm_kernel(w) for w in weights} if own_gemm else {"onednn"}
    assert runner.describe() == {"attention_backend": "cpu_paged", "gemm_kernels": "+".join(sorted(expected))}
    if own_gemm and torch.ops.aptserve.f32_linear_available():
        assert "avx512" in runner.describe()["gemm_kernels"]
