"""Tensor parallelism over Ray on this CPU: two worker actors in a gloo group on 127.0.0.1.

TP=2 must generate exactly the tokens of TP=1 (both equal transformers' greedy output) in every cache
mode and under preemption (each step reaching the ranks over their step channel); each rank holds
half the heads and half the hidden columns, so its hidden/KV ratio stays r; a dead worker (either
rank) ends the running requests with an error and the next request succeeds; everything Ray and the
workers open listens on loopback, and the step channel connects to the ranks there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_generation_equivalence import NUM_PROMPTS, run_and_compare

from cluster import SamplingParams
from cluster.ray_runtime import ensure_ray, ray  # through `cluster`, which keeps Ray on loopback
from hybrid_cache.plan import BatchPlan
from scheduler_service.executor import ExecutorFailed

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster() -> None:
    ensure_ray(num_cpus=2)  # two ranks of one CPU each, as on the 2-core CI machine


def tp_llm(make_llm, model: Path, tp: int = 2, **kwargs: object):  # noqa: ANN201 - an LLM
    kwargs.setdefault("block_size", 4)
    kwargs.setdefault("recompute_chunk_tokens", 16)
    return make_llm(model, executor="ray", tensor_parallel_size=tp, **kwargs)


CASES = [
    ("opt", "kv", 400), ("opt", "hidden", 400), ("opt", "mixed", 400), ("opt", "mixed", 20),
    ("llama", "kv", 400), ("llama", "hidden", 400), ("llama", "mixed", 20), ("llama-gqa", "kv", 20),
]


@pytest.mark.parametrize(("name", "mode", "num_blocks"), CASES)
def test_tp2_generates_the_reference_tokens(
    tiny_models: dict[str, Path], make_llm, name: str, mode: str, num_blocks: int
) -> None:
    overrides = ["hidden", "kv"] * (NUM_PROMPTS // 2) if mode == "mixed" else [None] * NUM_PROMPTS
    llm = tp_llm(make_llm, tiny_models[name], num_blocks=num_blocks, cache_mode="hidden" if mode == "hidden" else "kv")
    run_and_compare(llm, name, overrides)  # the same reference TP=1 is checked against
    if num_blocks == 20:
        assert llm.stats().num_preemptions > 0, "the budget was meant to force preemption"


def test_tp2_logprobs_equal_tp1(tiny_models: dict[str, Path], make_llm) -> None:
    """Logprobs cross the step channel: TP=2 reports what the in-process TP=1 engine reports."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    prompt = [[2, 141, 14, 232, 5, 23, 9]]
    local = make_llm(tiny_models["opt"], block_size=4, num_blocks=64).generate(prompt, params)[0]
    tp = tp_llm(make_llm, tiny_models["opt"], num_blocks=64).generate(prompt, params)[0]
    assert tp.token_ids == local.token_ids and tp.logprobs is not None and len(tp.logprobs) == 6
    for a, b in zip(tp.logprobs, local.logprobs, strict=True):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_each_rank_holds_its_share(tiny_models: dict[str, Path], make_llm) -> None:
    llm = tp_llm(make_llm, tiny_models["opt"], num_blocks=64, cache_mode="hybrid")
    ranks = llm.engine.executor.ranks
    assert [r["rank"] for r in ranks] == [0, 1] and len({r["pid"] for r in ranks}) == 2
    for rank in ranks:
        # OPT tiny: hidden 64, 4 heads of 16. Per rank: 2 heads → K+V = 64 values; x slice = 32 values.
        assert rank["kv_bytes_per_token_per_layer"] == 64 * 4
        assert rank["hidden_bytes_per_token_per_layer"] * 2 == rank["kv_bytes_per_token_per_layer"]
        assert rank["threads"] == 1
    assert llm.stats().ratio == 0.5
    # Each rank holds half of every split weight and all of the replicated ones (norms, embeddings).
    from worker.loader import load_model

    whole = load_model(tiny_models["opt"], "float32", torch.device("cpu"))
    split = sum(p.numel() for n, p in whole.named_parameters() if whole.split_of(n))
    total = sum(p.numel() for p in whole.parameters())
    assert split > 0 and all(rank["num_parameters"] == total - split // 2 for rank in ranks)
    llm.shutdown()  # a step after shutdown fails plainly rather than starting a new group
    with pytest.raises(ExecutorFailed, match="shut down"):
        llm.engine.executor.execute(BatchPlan([]))
    assert llm.engine.executor.workers == []


@pytest.mark.parametrize("dead_rank", [0, 1], ids=["rank0", "rank1"])
def test_a_dead_worker_fails_running_requests_and_the_group_recovers(
    tiny_models: dict[str, Path], make_llm, dead_rank: int
) -> None:
    """Rank 0 answers with the tokens, rank 1 only acknowledges: the death of either is seen through its
    step channel closing, ends the running requests, and a fresh group serves the next request."""
    llm = tp_llm(make_llm, tiny_models["opt"], num_blocks=64, cache_mode="kv")
    engine, executor = llm.engine, llm.engine.executor
    pids_before = {r["pid"] for r in executor.ranks}
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    ids = [engine.add_request([5, 6, 7, i + 8], long) for i in range(3)]
    for _ in range(3):
        engine.step()
    ray.kill(executor.workers[dead_rank], no_restart=True)
    ended = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                ended[out.request_id] = out
    assert set(ended) == set(ids)
    assert all(o.finish_reason == "error" and "workers failed" in o.error for o in ended.values())
    assert executor.num_rebuilds == 1 and engine.stats().num_failed_steps == 1
    assert engine.cache.num_free == engine.cache.num_blocks
    assert not pids_before & {r["pid"] for r in executor.ranks}, "the group was meant to be started afresh"
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def _listening_addresses(pids: set[int]) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state that these processes hold."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    addresses = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                addresses.append(fields[1].split(":")[0][-width:])
    return addresses


def test_every_listening_socket_is_on_loopback(tiny_models: dict[str, Path], make_llm) -> None:
    llm = tp_llm(make_llm, tiny_models["opt"], num_blocks=64)  # a live TP group: gloo's sockets too
    # The step channel's listeners close once the executor is connected: check where it connected.
    assert [host for host, _ in llm.engine.executor.channel.addresses] == ["127.0.0.1"] * 2
    addresses = _listening_addresses(_descendants(os.getpid()))
    assert addresses, "found no listening socket at all: the check would prove nothing"
    # 127.0.0.1, ::1 and ::ffff:127.0.0.1 as /proc writes them
    loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
    assert set(addresses) <= loopback, f"sockets listening beyond loopback: {sorted(set(addresses) - loopback)}"
