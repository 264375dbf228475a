"""bfloat16: teacher-forced logits of our engine stay as close to float32 as transformers' own bfloat16.

Tokens are not compared in bfloat16 (rounding flips near-ties); the logits at every position are.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_hf_model

from hybrid_cache import CacheConfig, CacheManager, CacheType, SamplingParams
from hybrid_cache.plan import BatchPlan, SequencePlan
from worker.config import ModelConfig
from worker.model_runner import ModelRunner

PROMPT_LEN, FORCED = 12, 20


def teacher_forced_logits(runner: ModelRunner, tokens: list[int], cache_type: CacheType) -> torch.Tensor:
    """Logits after each position from PROMPT_LEN-1 on: one prefill, then decode steps with forced tokens."""
    cache = CacheManager(runner.layout, runner.cache.num_blocks)
    greedy = SamplingParams(temperature=0.0)
    cache.allocate(0, PROMPT_LEN, cache_type)
    prefill = BatchPlan([SequencePlan(0, tokens[:PROMPT_LEN], 0, cache_type, cache.table(0).blocks, greedy)])
    rows = [runner.execute(prefill, return_logits=True).logits[0]]
    for pos in range(PROMPT_LEN, len(tokens)):
        cache.grow(0, pos + 1)
        plan = BatchPlan([SequencePlan(0, [tokens[pos]], pos, cache_type, cache.table(0).blocks, greedy)])
        rows.append(runner.execute(plan, return_logits=True).logits[0])
    cache.free(0)
    cache.check_invariants()
    return torch.stack(rows)


@pytest.mark.parametrize("name", ["opt", "llama"])
@pytest.mark.parametrize("cache_type", [CacheType.KV, CacheType.HIDDEN])
@pytest.mark.parametrize("own_gemm", [True, False], ids=["own-gemm", "onednn-gemm"])
def test_bfloat16_logits_close_to_float32(
    tiny_models: dict[str, Path], name: str, cache_type: CacheType, own_gemm: bool
) -> None:
    rng = random.Random(3)
    tokens = [rng.randrange(3, VOCAB) for _ in range(PROMPT_LEN + FORCED)]
    with torch.no_grad():
        ref32 = make_hf_model(name)(torch.tensor([tokens])).logits[0, PROMPT_LEN - 1 :].double()
        ref16 = make_hf_model(name, torch.bfloat16)(torch.tensor([tokens])).logits[0, PROMPT_LEN - 1 :].double()
    runner = ModelRunner(
        ModelConfig(path=str(tiny_models[name]), dtype="bfloat16", own_gemm=own_gemm),
        CacheConfig(block_size=4, num_blocks=64, recompute_chunk_tokens=8),
    )
    # Every tiny shape fits AMX tiles: where the CPU has AMX, all GEMMs run on our kernel.
    assert runner.describe()["gemm_kernels"] == ("amx" if own_gemm and torch.ops.aptserve.amx_available() else "onednn")
    ours = teacher_forced_logits(runner, tokens, cache_type).double()
    hf_error = (ref16 - ref32).abs().max().item()
    our_error = (ours - ref32).abs().max().item()
    spread = (ref32.max() - ref32.min()).item()
    assert our_error <= max(2.0 * hf_error, 0.02 * spread), (
        f"bf16 error {our_error:.3g} vs transformers' own bf16 error {hf_error:.3g} (logit spread {spread:.3g})"
    )
    # The same top token nearly everywhere: a broken cache path would scramble these.
    agree = (ours.argmax(-1) == ref32.argmax(-1)).float().mean().item()
    assert agree >= 0.9, f"top token agrees at only {agree:.0%} of positions"
