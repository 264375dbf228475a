"""The `triton` attention backend against plain attention and against the `torch` backend.

The kernels run under Triton's interpreter on CPU tensors (`TRITON_INTERPRET=1`, set here before
Triton wraps them), the way CI checks them without a GPU; shapes stay small because the interpreter
runs every program of a launch in Python. The same kernels compile for a GPU in bench/gpu_check.sh.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before hybrid_cache.triton_kernels is first imported

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import assert_matches_reference, hf_greedy, make_hf_model  # noqa: E402
from test_attention_backends import reference_attention  # noqa: E402

from hybrid_cache.attention import TorchBackend, make_backend  # noqa: E402
from hybrid_cache.attention_triton import TritonBackend, TritonMetadata  # noqa: E402
from hybrid_cache.info import StepCostModel  # noqa: E402
from hybrid_cache.layout import CacheLayout  # noqa: E402
from hybrid_cache.plan import BatchPlan, CacheType, SamplingParams, SequencePlan  # noqa: E402
from hybrid_cache.tensors import CacheTensors  # noqa: E402
from hybrid_cache.triton_kernels import INTERPRETED, paged_attention, store_kv  # noqa: E402


def test_kernels_run_under_the_interpreter() -> None:
    assert INTERPRETED, "hybrid_cache.triton_kernels was imported before TRITON_INTERPRET was set"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_variable_length_batch_over_scattered_blocks(dtype: torch.dtype) -> None:
    # Decodes, a prompt, prompts over cached context (one past a query tile of 16), grouped-query
    # heads and a head size that is not a power of two; blocks scattered; K/V in the engine's layout
    # (a block's K rows and V rows interleaved in one buffer, so the block stride is not the K size).
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, block = 4, 2, 24, 4
    q_lens, kv_lens = [1, 7, 20, 3, 1], [9, 7, 45, 70, 1]
    num_blocks = sum(-(-n // block) for n in kv_lens) + 3
    buffer = torch.randn(num_blocks, 2, block, kv_heads, dim, generator=g).to(dtype)
    keys, values = buffer[:, 0], buffer[:, 1]
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for n in kv_lens:
        tables.append(order[used : used + -(-n // block)])
        used += len(tables[-1])
    width = max(len(t) for t in tables) + 2  # entries past a table's end are never read
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    starts = torch.tensor([0, *q_lens[:-1]]).cumsum(0).tolist()
    q = torch.randn(sum(q_lens), heads, dim, generator=g).to(dtype)
    out = torch.full_like(q, float("nan"))
    lse = torch.empty(q.shape[0], heads)
    scale = dim**-0.5
    paged_attention(out, q, keys, values, block_tables, torch.tensor(starts, dtype=torch.int32),
                    torch.tensor(q_lens, dtype=torch.int32), torch.tensor(kv_lens, dtype=torch.int32),
                    max(q_lens), scale, causal=True, lse=lse)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    group = heads // kv_heads
    for s, (start, nq, nk) in enumerate(zip(starts, q_lens, kv_lens)):
        k = keys[block_tables[s, : -(-nk // block)].long()].flatten(0, 1)[:nk]
        v = values[block_tables[s, : -(-nk // block)].long()].flatten(0, 1)[:nk]
        rows = slice(start, start + nq)
        torch.testing.assert_close(out[rows].float(), reference_attention(q[rows], k, v, scale, causal=True), **tol)
        scores = torch.einsum("qhd,khd->hqk", q[rows].float(), k.float().repeat_interleave(group, 1)) * scale
        scores = scores.masked_fill(~torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq), float("-inf"))
        torch.testing.assert_close(lse[rows], scores.logsumexp(-1).transpose(0, 1), **tol)


def test_accumulate_merges_two_key_sets_and_leaves_other_rows() -> None:
    # A causal call over the first keys, then a non-causal call over more keys merged in place:
    # together, attention over the union (what a hidden request's history passes rely on).
    g = torch.Generator().manual_seed(1)
    heads, dim = 2, 16
    new_k, new_v = torch.randn(3, 1, heads, dim, generator=g), torch.randn(3, 1, heads, dim, generator=g)
    old_k, old_v = torch.randn(10, 1, heads, dim, generator=g), torch.randn(10, 1, heads, dim, generator=g)
    q = torch.randn(5, heads, dim, generator=g)
    acc = torch.zeros(5, heads, dim)
    lse = torch.zeros(5, heads)
    one = torch.tensor([1], dtype=torch.int32)
    three = torch.tensor([3], dtype=torch.int32)
    paged_attention(acc, q, new_k, new_v, torch.tensor([[0, 1, 2]], dtype=torch.int32), one, three, three,
                    3, 0.3, causal=True, lse=lse)
    paged_attention(acc, q, old_k, old_v, torch.tensor([[2, 3, 4, 5, 6, 7]], dtype=torch.int32), one, three,
                    torch.tensor([6], dtype=torch.int32), 3, 0.3, causal=False, lse=lse, accumulate=True)
    keys = torch.cat([old_k[2:8, 0], new_k[:, 0]])
    values = torch.cat([old_v[2:8, 0], new_v[:, 0]])
    expected = reference_attention(q[1:4], keys, values, 0.3, causal=True)  # history first, then the new tokens
    torch.testing.assert_close(acc[1:4], expected, atol=1e-5, rtol=1e-5)
    assert (acc[0] == 0).all() and (acc[4] == 0).all() and (lse[0] == 0).all(), "other rows are left alone"


def test_store_writes_slots_and_skips_padding() -> None:
    g = torch.Generator().manual_seed(2)
    buffer = torch.zeros(4, 2, 3, 2, 8)  # [blocks, K|V, block_size, kv_heads, head_dim]
    k, v = torch.randn(5, 2, 8, generator=g), torch.randn(5, 2, 8, generator=g)
    tokens = torch.tensor([0, 2, 4, 1])
    blocks = torch.tensor([3, -1, 0, -1])  # rows 2 and 1: padding, written nowhere
    offsets = torch.tensor([2, 0, 1, 0])
    store_kv(k, v, buffer[:, 0], buffer[:, 1], tokens, blocks, offsets)
    expected = torch.zeros_like(buffer)
    expected[3, 0, 2], expected[3, 1, 2] = k[0], v[0]
    expected[0, 0, 1], expected[0, 1, 1] = k[4], v[4]
    assert torch.equal(buffer, expected)


# -- the backend against the torch reference, on one layer ------------------------------------------
HEADS, HEAD_DIM, BLOCK = 2, 16, 4
LAYOUT = CacheLayout(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_kv_heads=HEADS, head_dim=HEAD_DIM,
                     block_size=BLOCK, dtype_bytes=4)
CHUNK = 8  # rows of hidden history per workspace pass: histories span passes and passes hold several


def _plan(shapes: list[tuple[CacheType, int, int]]) -> BatchPlan:
    """Sequences (cache type, cached tokens, new tokens) on disjoint blocks in scattered order."""
    g = torch.Generator().manual_seed(3)
    free = torch.randperm(60, generator=g).tolist()
    seqs = []
    for i, (kind, start, new) in enumerate(shapes):
        need = LAYOUT.blocks_needed(start + new, kind)
        table, free = free[:need], free[need:]
        seqs.append(SequencePlan(seq_id=i, token_ids=[0] * new, start_pos=start, cache_type=kind,
                                 block_table=table, sampling=SamplingParams(temperature=0.0)))
    return BatchPlan(seqs)


def _run_both(plan: BatchPlan) -> None:
    g = torch.Generator().manual_seed(4)
    caches = [CacheTensors(LAYOUT, 60, CHUNK, torch.float32, torch.device("cpu")) for _ in range(2)]
    history = torch.randn(caches[0].layers[0].buffer.shape, generator=g)  # K/V and x of every history
    for cache in caches:
        cache.layers[0].buffer.copy_(history)
    tokens = sum(s.num_new for s in plan.seqs)
    q = torch.randn(tokens, HEADS, HEAD_DIM, generator=g)
    k, v = torch.randn(2, tokens, HEADS, HEAD_DIM, generator=g)
    x = torch.randn(tokens, LAYOUT.hidden_size, generator=g)
    weight = torch.randn(LAYOUT.kv_width, LAYOUT.hidden_size, generator=g) * 0.3

    def project_kv(rows: torch.Tensor, positions: torch.Tensor, out: torch.Tensor) -> None:
        torch.mm(rows, weight.t(), out=out)

    outputs = []
    for backend, cache in zip((TorchBackend(), TritonBackend()), caches):
        meta = backend.build_metadata(plan, LAYOUT, CHUNK, torch.float32)
        outputs.append(backend.forward(cache.layers[0], cache.workspace, meta, q, k, v, x, project_kv, 0.25))
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    # Both stored this step's K/V and x in the same slots, and nothing else.
    assert torch.equal(caches[1].layers[0].buffer, caches[0].layers[0].buffer)


KV, HIDDEN = CacheType.KV, CacheType.HIDDEN


def test_kv_mixed_batch_matches_torch_backend() -> None:
    # Decodes, a prompt, a prompt chunk over cached context (past a query tile), in one launch.
    _run_both(_plan([(KV, 10, 1), (KV, 0, 5), (KV, 13, 18), (KV, 3, 1)]))


def test_hidden_mixed_batch_matches_torch_backend() -> None:
    # Decodes and chunks over histories recomputed in passes of 8 rows (one history over three
    # passes, a pass shared by several requests) and a prompt with no history.
    _run_both(_plan([(HIDDEN, 9, 1), (HIDDEN, 12, 4), (HIDDEN, 0, 3), (HIDDEN, 2, 1)]))


def test_hybrid_mixed_batch_matches_torch_backend() -> None:
    _run_both(_plan([(KV, 10, 1), (HIDDEN, 9, 1), (KV, 6, 7), (HIDDEN, 5, 6), (KV, 0, 2)]))


def test_backend_registered_and_refuses_foreign_metadata() -> None:
    backend = make_backend("triton")
    assert isinstance(backend, TritonBackend) and backend.name == "triton"
    plan = _plan([(KV, 0, 2)])
    assert isinstance(backend.build_metadata(plan, LAYOUT, CHUNK, torch.float32), TritonMetadata)
    cache = CacheTensors(LAYOUT, 60, CHUNK, torch.float32, torch.device("cpu"))
    meta = TorchBackend().build_metadata(plan, LAYOUT, CHUNK, torch.float32)
    q = torch.zeros(2, HEADS, HEAD_DIM)
    with pytest.raises(TypeError, match="another backend"):
        backend.forward(cache.layers[0], cache.workspace, meta, q, q, q, torch.zeros(2, 32), None, 1.0)


# -- end to end: greedy tokens equal transformers ----------------------------------------------------
def test_greedy_equals_transformers_with_the_triton_backend(tiny_models: dict[str, Path], make_llm,  # type: ignore[no-untyped-def]
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # One KV and one hidden request on the tiny OPT, a prompt chunked over two steps (mixed with a
    # decode). The start-up step-time profile (dozens of large steps) is replaced by a constant:
    # it does not affect tokens and would take minutes under the interpreter.
    from cluster.config import load_config, with_overrides
    from worker import model_runner

    monkeypatch.setattr(model_runner.ModelRunner, "_profile_steps",
                        lambda self, repeats: StepCostModel(1e-3, 1e-5, 1e-7, 1e-5))
    config = with_overrides(load_config(), {
        "cache.attention_backend": "triton", "cache.profile_token_counts": [4, 8], "cache.profile_repeats": 1,
        "scheduler.max_waiting": None, "scheduler.max_num_batched_tokens": 8,
    })
    llm = make_llm(tiny_models["opt"], block_size=4, num_blocks=64, cache_mode="hybrid", recompute_chunk_tokens=8,
                   config=config)
    assert llm.engine.executor.runner.backend.name == "triton"
    prompts, max_new = [[5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45], [7, 8, 9]], [3, 4]
    outputs = llm.generate(
        [{"prompt_token_ids": prompts[0], "cache_type": "kv"},
         {"prompt_token_ids": prompts[1], "cache_type": "hidden"}],
        [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_new],
    )
    reference = make_hf_model("opt")
    for i, (out, prompt, n) in enumerate(zip(outputs, prompts, max_new)):
        assert_matches_reference(out.token_ids, hf_greedy(reference, prompt, n), f"prompt {i}")
