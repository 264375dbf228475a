"""Profile the K/V recompute on this device and fit its cost (docs/ARCHITECTURE.md, "Cost model")."""

from __future__ import annotations

import time

import torch

from hybrid_cache.info import CostModel
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
