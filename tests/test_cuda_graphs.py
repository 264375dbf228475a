"""Decode graphs (worker/cuda_graphs.py) without a GPU: bucket choice, the staged inputs and their
padding, and decode steps run over the persistent buffers (eagerly, the path a graph replays) giving
transformers' tokens while padding rows touch no cache slot. Capture and replay themselves run on a
GPU in bench/gpu_check.sh."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # the triton backend's kernels on CPU tensors

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import assert_matches_reference, hf_greedy, make_hf_model  # noqa: E402

from hybrid_cache.info import StepCostModel  # noqa: E402
from hybrid_cache.plan import BatchPlan, CacheType, Conversion, SamplingParams, SequencePlan  # noqa: E402
from worker.cuda_graphs import DecodeGraphs, DecodeInputs, bucket_for, make_decode_graphs  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)


def _decode(seq_id: int, token: int, start: int, table: list[int], kind: CacheType = CacheType.KV) -> SequencePlan:
    return SequencePlan(seq_id=seq_id, token_ids=[token], start_pos=start, cache_type=kind, block_table=table,
                        sampling=GREEDY)


def test_smallest_bucket_that_fits() -> None:
    sizes = [1, 2, 4, 8, 16]
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert bucket_for(17, sizes) is None
    assert bucket_for(3, [8, 2]) == 8  # any order


def test_staged_inputs_and_padding() -> None:
    inputs = DecodeInputs(max_batch=4, width=3, block_size=4, device=torch.device("cpu"))
    # Seq 0 holds 9 tokens (its new token at position 9, block 2 of its table), seq 1 holds 3 (position 3).
    plan = BatchPlan([_decode(0, 11, 9, [7, 5, 2]), _decode(1, 12, 3, [4, 9])])
    inputs.fill(BatchPlan([_decode(5, 1, 0, [1]), _decode(6, 1, 0, [3]), _decode(7, 1, 0, [6])]), 4)  # stale rows
    inputs.fill(plan, 4)
    f = inputs.fields
    assert f["input_ids"].tolist() == [11, 12, 0, 0]
    assert f["positions"].tolist() == [9, 3, 0, 0]
    assert f["write_blocks"].tolist() == [2, 4, -1, -1]  # padding rows: block -1, stored nowhere
    assert f["write_offsets"].tolist() == [1, 3, 0, 0]
    assert f["q_len"].tolist() == [1, 1, 0, 0] and f["kv_len"].tolist() == [10, 4, 0, 0]
    assert f["tables"].tolist() == [[7, 5, 2], [4, 0, 0], [0, 0, 0], [0, 0, 0]]  # only the blocks in use
    meta = inputs.metadata(2)
    assert meta.max_q_kv == 1 and meta.paged.kv.block_tables.shape == (2, 3)
    # The metadata is a view of the persistent buffer: the next fill shows through without rebuilding it.
    inputs.fill(BatchPlan([_decode(2, 13, 5, [8, 1])]), 2)
    assert meta.positions.tolist() == [5, 0] and meta.kv_write_blocks.tolist() == [1, -1]
    assert meta.paged.kv.kv_len.tolist() == [6, 0]


def test_only_decode_only_kv_steps_that_fit_are_taken() -> None:
    inputs = DecodeInputs(max_batch=2, width=2, block_size=4, device=torch.device("cpu"))
    assert inputs.accepts(BatchPlan([_decode(0, 1, 7, [0, 1])]))
    assert not inputs.accepts(BatchPlan([]))
    assert not inputs.accepts(BatchPlan([_decode(i, 1, 3, [i]) for i in range(3)])), "past the largest bucket"
    assert not inputs.accepts(BatchPlan([_decode(0, 1, 8, [0, 1, 2])])), "table wider than the buffers"
    assert not inputs.accepts(BatchPlan([_decode(0, 1, 3, [0], CacheType.HIDDEN)]))
    prompt = SequencePlan(seq_id=0, token_ids=[1, 2], start_pos=0, cache_type=CacheType.KV, block_table=[0],
                          sampling=GREEDY)
    assert not inputs.accepts(BatchPlan([prompt]))
    converting = _decode(0, 1, 3, [0])
    converting.conversion = Conversion(hidden_blocks=[1], kv_blocks=[0], num_tokens=3)
    assert not inputs.accepts(BatchPlan([converting]))


@pytest.fixture
def triton_llm(tiny_models: dict[str, Path], make_llm, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A tiny OPT on the triton backend (interpreter), without the start-up step profile (minutes there)."""
    from cluster.config import load_config, with_overrides
    from worker import model_runner

    monkeypatch.setattr(model_runner.ModelRunner, "_profile_steps",
                        lambda self, repeats: StepCostModel(1e-3, 1e-5, 1e-7, 1e-5))
    config = with_overrides(load_config(), {
        "cache.attention_backend": "triton", "cache.profile_token_counts": [4, 8], "cache.profile_repeats": 1,
        "scheduler.max_waiting": None,
    })
    return make_llm(tiny_models["opt"], block_size=4, num_blocks=48, cache_mode="kv", config=config)


def test_graphs_apply_only_on_cuda(triton_llm) -> None:  # type: ignore[no-untyped-def]
    runner = triton_llm.engine.executor.runner
    assert runner.graphs is None, "no graphs on a CPU device"
    args = (runner.model, runner.cache, runner.backend, runner.layout, torch.device("cpu"), 1)
    assert make_decode_graphs(True, [1, 2], *args) is None
    with pytest.raises(ValueError, match="CUDA device"):
        DecodeGraphs(runner.model, runner.cache, runner.backend, runner.layout, [2], 64, torch.device("cpu"), True)


def test_decode_steps_over_padded_buffers_equal_transformers(triton_llm) -> None:  # type: ignore[no-untyped-def]
    # Three requests decode in bucket 4 (one padding row), then in 2 as they finish one by one.
    runner = triton_llm.engine.executor.runner
    graphs = DecodeGraphs(runner.model, runner.cache, runner.backend, runner.layout, [2, 4], 64,
                          torch.device("cpu"), capture=False)
    used: list[int] = []
    forward = graphs.forward
    graphs.forward = lambda plan: used.append(len(plan.seqs)) or forward(plan)  # type: ignore[method-assign]
    runner.graphs = graphs
    prompts, max_new = [[5, 9, 13, 17, 21], [7, 8, 9], [30, 31, 32, 33, 34, 35, 36]], [4, 3, 5]
    outputs = triton_llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_new],
    )
    reference = make_hf_model("opt")
    for i, (out, prompt, n) in enumerate(zip(outputs, prompts, max_new)):
        assert_matches_reference(out.token_ids, hf_greedy(reference, prompt, n), f"prompt {i}")
    assert 3 in used and 1 in used, f"decode steps of 3 and of 1 requests went through the buffers: {used}"


def test_padding_rows_touch_no_cache_slot(triton_llm) -> None:  # type: ignore[no-untyped-def]
    runner = triton_llm.engine.executor.runner
    graphs = DecodeGraphs(runner.model, runner.cache, runner.backend, runner.layout, [4], 64,
                          torch.device("cpu"), capture=False)
    for layer in runner.cache.layers:
        layer.buffer.normal_()
    before = [layer.buffer.clone() for layer in runner.cache.layers]
    with torch.inference_mode():
        graphs.forward(BatchPlan([_decode(0, 3, 6, [9, 2])]))  # position 6: block 2, offset 2
    for layer, old in zip(runner.cache.layers, before):
        changed = (layer.buffer != old).view(layer.buffer.shape[0], 2, 4, -1).any(-1).nonzero().tolist()
        assert changed == [[2, 0, 2], [2, 1, 2]], f"only the real row's K and V slot is written, got {changed}"
