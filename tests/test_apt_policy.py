"""The apt policy's decisions on small hand-built situations (plain Python: no model, no engine)."""

from __future__ import annotations

import itertools

from hybrid_cache import CacheLayout, CacheManager, CacheType, SamplingParams
from scheduler_service import Request, RequestStatus, SchedulerConfig
from scheduler_service.policies import SchedulerView, make_policy

# Block size 4; MHA so a hidden block holds 8 tokens (r = 0.5).
LAYOUT = CacheLayout(num_layers=2, hidden_size=64, num_kv_heads=4, head_dim=16, block_size=4, dtype_bytes=4)
NOW = 100.0
_ids = itertools.count()


def request(tokens: int, pending: float, generated: bool = True, ttft: float = 5.0, tbt: float = 1.0) -> Request:
    """A request of `tokens` tokens that last progressed `pending` seconds before NOW."""
    seq_id = next(_ids)
    r = Request(f"r{seq_id}", seq_id, [7] * tokens, SamplingParams(max_tokens=64), arrival_time=NOW - pending,
                ttft_slo_s=ttft, tbt_slo_s=tbt)
    if generated:
        r.arrival_time -= 1.0
        r.prompt_token_ids, r.output_token_ids = r.prompt_token_ids[:-1], [7]
        r.token_times = [NOW - pending]
    return r


def run(cache: CacheManager, r: Request, cache_type: CacheType = CacheType.KV) -> Request:
    """Put `r` in the cache as a running request that still has to write its last token."""
    cache.allocate(r.seq_id, r.num_tokens - 1, cache_type)
    r.status, r.cache_type, r.num_computed_tokens = RequestStatus.RUNNING, cache_type, r.num_tokens - 1
    return r


def decide(cache: CacheManager, waiting: list[Request], running: list[Request], **config: object):  # noqa: ANN201
    settings = SchedulerConfig(policy="apt", **config)
    view = SchedulerView(waiting=waiting, running=running, cache=cache, config=settings,
                         max_num_batched_tokens=4096, alpha=1e-4, now=NOW)
    return make_policy("apt").schedule(view)


def test_no_preemption_while_every_running_request_can_grow() -> None:
    cache = CacheManager(LAYOUT, num_blocks=10)
    running = [run(cache, request(12, pending=0.1)), run(cache, request(8, pending=0.1))]  # 3 + 2 blocks held
    decision = decide(cache, [], running, cache_mode="kv")
    assert not decision.preempt and [r for r, _ in decision.decode] == running


def test_late_running_requests_lose_first_when_growth_does_not_fit() -> None:
    cache = CacheManager(LAYOUT, num_blocks=6)
    # Each holds 2 blocks and grows into a third at its next token: only two of the three can go on.
    on_time = [run(cache, request(9, pending=0.2)) for _ in range(2)]
    late = run(cache, request(9, pending=3.0))  # past its 1 s TBT SLO
    decision = decide(cache, [], [on_time[0], late, on_time[1]], cache_mode="kv")
    assert decision.preempt == [late]
    assert [r for r, _ in decision.decode] == on_time


def test_prefill_admits_the_longest_waiting_first() -> None:
    cache = CacheManager(LAYOUT, num_blocks=3)
    old, new = request(8, pending=4.0, generated=False), request(8, pending=0.5, generated=False)
    decision = decide(cache, [new, old], [], cache_mode="kv")  # 2 blocks each: room for one
    assert [r for r, _ in decision.prefill] == [old]


def test_decode_when_the_running_requests_waited_longer() -> None:
    cache = CacheManager(LAYOUT, num_blocks=32)
    running = [run(cache, request(5, pending=0.8)) for _ in range(3)]
    waiting = [request(4, pending=1.0, generated=False)]
    decision = decide(cache, waiting, running, cache_mode="kv", mixed=False)
    assert decision.decode and not decision.prefill  # 2.4 s of pending against 1.0 s
    waiting.append(request(4, pending=2.0, generated=False))
    decision = decide(cache, waiting, running, cache_mode="kv", mixed=False)
    assert decision.prefill and not decision.decode  # 3.0 s against 2.4 s


def test_admissions_leave_room_for_running_requests_to_grow() -> None:
    cache = CacheManager(LAYOUT, num_blocks=6)
    running = [run(cache, request(8, pending=0.1))]  # holds 2 blocks; 16 more tokens take 4 more: none left
    waiting = [request(4, pending=9.0, generated=False)]
    assert not decide(cache, waiting, running, cache_mode="kv", growth_reserve_tokens=16).prefill
    decision = decide(cache, waiting, running, cache_mode="kv", growth_reserve_tokens=4)
    assert [r for r, _ in decision.prefill] == waiting


def test_hybrid_admits_hidden_when_only_the_hidden_need_fits() -> None:
    cache = CacheManager(LAYOUT, num_blocks=3)
    waiting = [request(20, pending=1.0, generated=False)]  # KV: 5 blocks, hidden: 3 blocks
    decision = decide(cache, waiting, [], cache_mode="hybrid", growth_reserve_tokens=0)
    assert decision.prefill == [(waiting[0], CacheType.HIDDEN)]
    assert not decide(cache, waiting, [], cache_mode="kv", growth_reserve_tokens=0).prefill


def test_hidden_request_converts_to_kv_only_when_its_kv_blocks_are_free() -> None:
    tight = CacheManager(LAYOUT, num_blocks=4)
    hidden = run(tight, request(12, pending=0.5), CacheType.HIDDEN)  # 2 hidden blocks; KV would need 3
    decision = decide(tight, [], [hidden], cache_mode="hybrid")
    assert decision.decode == [(hidden, CacheType.HIDDEN)], "3 KV blocks are not free beside its 2 hidden ones"
    roomy = CacheManager(LAYOUT, num_blocks=16)
    hidden = run(roomy, request(12, pending=0.5), CacheType.HIDDEN)
    assert decide(roomy, [], [hidden], cache_mode="hybrid").decode == [(hidden, CacheType.KV)]


def test_a_running_kv_request_never_becomes_hidden() -> None:
    cache = CacheManager(LAYOUT, num_blocks=3)
    running = [run(cache, request(13, pending=0.5))]  # 3 KV blocks; token 13 needs a 4th (as hidden: 2)
    decision = decide(cache, [], running, cache_mode="hybrid")
    assert decision.preempt == running and not decision.decode, "x is not kept: KV→hidden needs a re-prefill"
