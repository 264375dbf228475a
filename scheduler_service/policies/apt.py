"""Apt-Serve's adaptive policy (DESIGN §2 "One iteration"): value by pending time, knapsack by memory."""

from __future__ import annotations

from collections.abc import Sequence

from hybrid_cache.plan import CacheType
from scheduler_service.knapsack import SKIP, CacheOption, choose_cache_types
from scheduler_service.policies.base import Policy, ScheduleDecision, SchedulerView
from scheduler_service.request import Request


class AptPolicy(Policy):
    """Each iteration either prefills or decodes, whichever group has waited longer in total.

    A request's value is its pending time `p` (since its last token, or its arrival) with KV, and
    `p - U·α·m` with the hidden cache (`U` requests not yet late each slowed by the recompute of its
    `m` blocks). Requests already past an SLO get a tiny value density: spare room only. Waiting
    requests compete for the free blocks, running ones for the whole cache; a running request that
    loses is preempted, one that keeps its type just goes on, and a hidden one chosen as KV is
    converted in place when its KV blocks are free (else it stays hidden this step).
    """

    name = "apt"

    def schedule(self, view: SchedulerView) -> ScheduleDecision:
        now = view.now
        # Who is already late, decided once per iteration: it sets U and each request's value.
        late = {r.seq_id for r in (*view.waiting, *view.running) if r.violates_slo(now)}
        on_time = len(view.waiting) + len(view.running) - len(late)
        waiting_choice = self._choose(view, view.waiting, late, on_time, view.cache.num_free, running=False)
        running_choice = self._choose(view, view.running, late, on_time, view.cache.num_blocks, running=True)

        admitted = [(r, k) for r, k in zip(view.waiting, waiting_choice) if k != SKIP]
        waited = sum(now - r.pending_since() for r in view.waiting)
        ran = sum(now - r.pending_since() for r in view.running)
        if admitted and (not view.running or waited > ran):
            return self._prefill(view, admitted)
        return self._decode(view, running_choice)

    def _choose(
        self,
        view: SchedulerView,
        requests: Sequence[Request],
        late: set[int],
        on_time: int,
        capacity: int,
        running: bool,
    ) -> list[str]:
        cache, config = view.cache, view.config
        options = []
        for request in requests:
            allowed = view.allowed_types(request)
            if running and request.cache_type is CacheType.KV:
                allowed = [CacheType.KV]  # KV→hidden would need a re-prefill: x is not kept
            blocks_kv = cache.blocks_needed(request.num_tokens, CacheType.KV)
            blocks_hidden = None
            if CacheType.HIDDEN in allowed:
                blocks_hidden = cache.blocks_needed(request.num_tokens, CacheType.HIDDEN)
            if request.seq_id in late:
                value_kv = config.violator_density * blocks_kv
                value_hidden = None if blocks_hidden is None else config.violator_density * blocks_hidden / 2
            else:
                value_kv = view.now - request.pending_since() + config.pending_floor_s
                value_hidden = None if blocks_hidden is None else value_kv - on_time * view.alpha * blocks_kv
            if CacheType.KV not in allowed:
                value_kv = 0.0  # a forced-hidden request: the knapsack drops non-positive choices
            options.append(CacheOption(value_kv, blocks_kv, value_hidden, blocks_hidden))
        return choose_cache_types(options, capacity)

    def _prefill(self, view: SchedulerView, admitted: list[tuple[Request, str]]) -> ScheduleDecision:
        decision = ScheduleDecision()
        tokens = 0
        for request, kind in admitted:  # arrival order within the chosen set
            if len(decision.prefill) >= view.config.max_num_seqs:
                break
            if tokens + request.num_tokens > view.max_num_batched_tokens:
                continue
            tokens += request.num_tokens
            decision.prefill.append((request, CacheType(kind)))
        return decision

    def _decode(self, view: SchedulerView, kinds: list[str]) -> ScheduleDecision:
        cache = view.cache
        decision = ScheduleDecision()
        keep: list[tuple[Request, CacheType]] = []
        free = cache.num_free
        for request, kind in zip(view.running, kinds):
            if kind == SKIP:
                decision.preempt.append(request)
                free += len(cache.table(request.seq_id).blocks)
            else:
                keep.append((request, CacheType(kind)))
        # Growth first (every kept request keeps its current type), then conversions that fit.
        for request, _ in keep:
            free -= cache.blocks_to_hold(request.seq_id, request.num_tokens)
        for request, kind in keep:
            target = request.cache_type
            if kind is CacheType.KV and request.cache_type is CacheType.HIDDEN:
                # Its KV blocks must be free while its hidden blocks are still read this step.
                extra = cache.blocks_needed(request.num_tokens, CacheType.KV) - cache.blocks_to_hold(
                    request.seq_id, request.num_tokens
                )
                if extra <= free:
                    free -= extra
                    target = CacheType.KV
            decision.decode.append((request, target))
        decision.decode = decision.decode[: view.config.max_num_seqs]
        return decision

