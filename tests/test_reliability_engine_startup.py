"""Start-up: a model with a short context starts (the recompute profiling stays within its positions),
and a tensor-parallel start that fails leaves no placement group or actor behind."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from cluster import SamplingParams


def test_a_rotary_model_with_a_short_context_starts_and_serves(tiny_models: dict[str, Path], make_llm,
                                                               tmp_path: Path) -> None:
    """max_position_embeddings 64, below the profiled history lengths (32, 128, 512): IndexError before."""
    for item in tiny_models["llama"].iterdir():
        shutil.copy(item, tmp_path / item.name)
    config = json.loads((tmp_path / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm = make_llm(tmp_path, block_size=4, num_blocks=64, cache_mode="hybrid")
    assert llm.stats().alpha >= 0 and llm.engine.info.max_model_len == 64
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


@pytest.mark.timeout(120)
def test_a_failed_tensor_parallel_start_releases_its_placement_group(tiny_models: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    """Every rank dies in its constructor (no weights): the start fails, and the CPUs it reserved are
    free again at once, so the next start does not wait `step_timeout_s` for them."""
    from cluster.executor_ray import RayExecutor
    from cluster.ray_runtime import ensure_ray, ray
    from hybrid_cache.config import CacheConfig
    from worker.config import ModelConfig

    ensure_ray(num_cpus=2)
    shutil.copy(tiny_models["llama"] / "config.json", tmp_path / "config.json")  # a model without weights
    model = ModelConfig(path=str(tmp_path), dtype="float32")
    cache = CacheConfig(block_size=4, num_blocks=16, recompute_chunk_tokens=16)
    groups_before = set(ray.util.placement_group_table())
    cpus_before = ray.available_resources().get("CPU", 0.0)
    with pytest.raises(Exception):  # noqa: B017, PT011 - Ray wraps the constructor's error in its own types
        RayExecutor(model, cache, tp_size=2, cpus_per_worker=1.0, collective_timeout_s=10, step_timeout_s=60)
    table = ray.util.placement_group_table()
    new = [group for group_id, group in table.items() if group_id not in groups_before]
    assert new and all(g["state"] == "REMOVED" for g in new), "the failed start kept its placement group"
    # The CPUs it reserved are free again (Ray's resource view is updated asynchronously).
    deadline = time.monotonic() + 20
    while ray.available_resources().get("CPU", 0.0) < cpus_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0.0) >= cpus_before
