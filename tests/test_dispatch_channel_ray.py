"""The step channel under the Ray executor: rank 0's answer carries its timings, so the executor's
`timings()` after a step asks nothing of the ranks and equals what rank 0 reports when asked; a
rebuilt group starts from its own ranks' timings."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster import SamplingParams
from cluster.ray_runtime import ensure_ray, ray  # through `cluster`, which keeps Ray on loopback

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster() -> None:
    ensure_ray(num_cpus=2)


def test_timings_after_a_step_come_with_its_answer(
    tiny_models: dict[str, Path], make_llm, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = make_llm(tiny_models["opt"], executor="ray", tensor_parallel_size=2, block_size=4,
                   recompute_chunk_tokens=16, num_blocks=64)
    engine, executor = llm.engine, llm.engine.executor
    engine.add_request([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))

    def no_call(*args: object, **kwargs: object) -> None:
        raise AssertionError("timings() after a step must not call the ranks")

    seen = []
    for _ in range(2):
        engine.step()
        with monkeypatch.context() as patched:
            patched.setattr(ray, "get", no_call)
            seen.append(executor.timings())
        assert seen[-1] == ray.get(executor.workers[0].timings.remote())
    assert 0 < seen[0]["model"] < seen[1]["model"]
    while engine.has_unfinished():
        engine.step()
    executor.rebuild()  # a fresh group: nothing known until its first answer, so its rank is asked
    assert executor.timings() == ray.get(executor.workers[0].timings.remote())
