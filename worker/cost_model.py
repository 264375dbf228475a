"""Profile the K/V recompute and whole steps on this device and fit their costs (docs/ARCHITECTURE.md,
"Cost model" and "Step-time model")."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

import torch

from hybrid_cache.info import CostModel, StepCostModel, StepLoad
from hybrid_cache.layout import CacheLayout
from hybrid_cache.plan import BatchPlan, CacheType, SamplingParams, SequencePlan
from hybrid_cache.tensors import RecomputeWorkspace
from worker.models import CausalLM


@torch.inference_mode()
def profile_recompute(
    model: CausalLM, workspace: RecomputeWorkspace, block_size: int, token_counts: list[int], repeats: int
) -> CostModel:
    """Time every layer's K/V projection (rotary included) for each token count; least-squares fit.

    Works for any context length: positions wrap around the model's `max_position_embeddings`, so a
    model whose rotary table is shorter than a profiled count still starts (the time of a projection
    does not depend on which positions it rotates).
    """
    device = workspace.x.device
    max_positions = model.spec.max_position_embeddings
    samples: list[tuple[int, float]] = []
    for count in token_counts:
        count = min(count, workspace.chunk_tokens)
        x = workspace.x[:count].normal_()
        out = workspace.kv[:count]
        positions = torch.arange(count, device=device) % max_positions
        best = float("inf")
        for _ in range(repeats + 1):  # the first pass warms up kernels and caches
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for attention in model.attention_layers:
                attention.project_kv(x, positions, out)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        samples.append((count, best))
    counts = torch.tensor([float(c) for c, _ in samples], dtype=torch.float64)
    seconds = torch.tensor([s for _, s in samples], dtype=torch.float64)
    design = torch.stack([torch.ones_like(counts), counts], dim=1)
    fixed, slope = torch.linalg.lstsq(design, seconds.unsqueeze(1)).solution.squeeze(1).tolist()
    return CostModel(fixed_seconds=max(fixed, 0.0), seconds_per_token=max(slope, 0.0), block_size=block_size)


# The steps timed at start-up, as (sequences, new tokens each, cached tokens each before them): a
# prompt alone, a chunk after cached context, and decode batches over short and long contexts, so
# that tokens and attended keys vary independently. Each is clamped to the model's context and the
# cache's blocks.
STEP_PROFILE_SHAPES: tuple[tuple[int, int, int], ...] = (
    (1, 32, 0), (1, 256, 0), (1, 128, 512), (16, 1, 128), (64, 1, 512), (16, 1, 1024), (4, 32, 64),
)


def step_profile_plans(
    layout: CacheLayout, num_blocks: int, max_len: int, shapes: Sequence[tuple[int, int, int]] = STEP_PROFILE_SHAPES
) -> list[BatchPlan]:
    """One KV batch plan per shape (clamped to `max_len` tokens and `num_blocks` blocks); greedy, so
    the sampler draws nothing. The block tables reuse blocks: the contents are never read back."""
    plans = []
    seq_ids = itertools.count()
    longest = min(max_len, num_blocks * layout.block_size)  # one sequence's tokens at most
    for num_seqs, num_new, start in shapes:
        num_new = max(1, min(num_new, longest // 2))
        start = max(0, min(start, longest - num_new))
        per_seq = -(-(start + num_new) // layout.block_size)
        num_seqs = max(1, min(num_seqs, num_blocks // per_seq))
        seqs = [
            SequencePlan(
                seq_id=next(seq_ids), token_ids=[0] * num_new, start_pos=start, cache_type=CacheType.KV,
                block_table=[(s * per_seq + b) % num_blocks for b in range(per_seq)],
                sampling=SamplingParams(temperature=0.0),
            )
            for s in range(num_seqs)
        ]
        plans.append(BatchPlan(seqs))
    return plans


def profile_step_time(
    execute: Callable[[BatchPlan], object],
    plans: Sequence[BatchPlan],
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
    synchronize: Callable[[], None] = lambda: None,
) -> StepCostModel:
    """Time whole steps (`execute`, the fastest of `repeats` after a warm-up) and fit
    `seconds = a + b·tokens + c·context + d·sequences` by least squares (docs/ARCHITECTURE.md, "Step-time model")."""
    rows: list[tuple[float, float, float]] = []
    for plan in plans:
        best = float("inf")
        for _ in range(repeats + 1):  # the first pass warms up kernels and caches
            synchronize()
            start = clock()
            execute(plan)
            synchronize()
            best = min(best, clock() - start)
        load = StepLoad.of_plan(plan)
        rows.append((float(load.tokens), float(load.context), float(load.sequences), best))
    design = torch.tensor([[1.0, t, c, n] for t, c, n, _ in rows], dtype=torch.float64)
    seconds = torch.tensor([s for *_, s in rows], dtype=torch.float64).unsqueeze(1)
    a, b, c, d = _non_negative_fit(design, seconds)
    return StepCostModel(intercept_seconds=a, seconds_per_token=b, seconds_per_context=c, seconds_per_sequence=d)


def _non_negative_fit(design: torch.Tensor, seconds: torch.Tensor) -> list[float]:
    """Least squares with every coefficient >= 0: a column whose coefficient comes out negative (noise,
    or a term too small to see) is dropped and the rest refitted, rather than clamped after the fit."""
    active = list(range(design.shape[1]))
    while True:
        solution = torch.linalg.lstsq(design[:, active], seconds).solution.squeeze(1).tolist()
        negative = [column for column, value in zip(active, solution) if value < 0]
        if not negative:
            break
        active = [column for column in active if column not in negative]
        if not active:
            return [0.0] * design.shape[1]
    coefficients = [0.0] * design.shape[1]
    for column, value in zip(active, solution):
        coefficients[column] = value
    return coefficients
