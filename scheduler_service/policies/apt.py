"""Apt-Serve's adaptive policy (docs/ARCHITECTURE.md, "Scheduling: Apt"): value by pending time, knapsack by memory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hybrid_cache.plan import CacheType
from scheduler_service.knapsack import CODE_HIDDEN, CODE_KV, CODE_SKIP, NAMES, SKIP, choose_codes
from scheduler_service.policies.base import Policy, ScheduleDecision, SchedulerView, allowed_cache_types
from scheduler_service.request import Request

_CODES = {None: CODE_SKIP, CacheType.KV: CODE_KV, CacheType.HIDDEN: CODE_HIDDEN}


class AptPolicy(Policy):
    """Each iteration either prefills or decodes, whichever group has waited longer in total.

    A request's value is its pending time `p` (since its last token, or its arrival) with KV, and
    `p - U·α·m` with the hidden cache (`U` requests not yet late each slowed by the recompute of its
    `m` blocks). That hidden value is negative at realistic α for most on-time requests: where KV is
    allowed this rightly means "wait for KV rather than slow everyone down", but a request that may
    only run as hidden (cache_mode hidden, `cache_type: hidden`, or pinned to hidden at admission
    because its KV blocks at its longest exceed the cache) would never be admitted, or, running, be
    preempted every step. For those requests the hidden value is floored at `violator_density` per
    hidden block (what a late KV request is worth): they run with spare room, like late ones.
    Requests already past an SLO get a tiny value density: spare room only. Waiting
    requests compete for the free blocks, running ones for the whole cache; a running request that
    loses is preempted, one that keeps its type just goes on, and a hidden one chosen as KV is
    converted in place when its KV blocks are free (else it stays hidden this step).
    """

    name = "apt"

    def schedule(self, view: SchedulerView) -> ScheduleDecision:
        waiting, running = _Candidates.of(view.waiting, view), _Candidates.of(view.running, view)
        # Who is already late, decided once per iteration: it sets U and each request's value.
        on_time = int((~waiting.late).sum() + (~running.late).sum())
        # Admissions leave the running requests room to grow for a while: filling every free block
        # would preempt one of them within a step or two, and its re-prefill wastes the admission.
        reserve = sum(
            view.cache.blocks_to_hold(r.seq_id, r.num_tokens + view.config.growth_reserve_tokens) for r in view.running
        )
        waiting_choice = waiting.choose(view, on_time, max(0, view.cache.num_free - reserve))
        admitted = [(r, CacheType(NAMES[k])) for r, k in zip(view.waiting, waiting_choice.tolist()) if k != CODE_SKIP]
        if admitted and (not view.running or waiting.pending.sum() > running.pending.sum()):
            return self._prefill(view, admitted)
        running_choice = running.choose(view, on_time, view.cache.num_blocks)
        return self._decode(view, [NAMES[k] for k in running_choice.tolist()])

    def _prefill(self, view: SchedulerView, admitted: list[tuple[Request, CacheType]]) -> ScheduleDecision:
        decision = ScheduleDecision()
        tokens = 0
        for request, kind in admitted:  # arrival order within the chosen set
            if len(decision.prefill) >= view.config.max_num_seqs:
                break
            if tokens + request.num_tokens > view.max_num_batched_tokens:
                continue
            tokens += request.num_tokens
            decision.prefill.append((request, kind))
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



@dataclass(frozen=True)
class _Candidates:
    """One queue's requests as arrays: what the knapsack needs, gathered in one pass."""

    requests: Sequence[Request]
    num_tokens: np.ndarray
    pending: np.ndarray  # seconds since its last progress (`now - t_i`)
    late: np.ndarray  # already past its TTFT or TBT SLO
    may_kv: np.ndarray
    may_hidden: np.ndarray

    @classmethod
    def of(cls, requests: Sequence[Request], view: SchedulerView) -> _Candidates:
        rows = [
            (
                r.num_tokens,
                r.pending_since(),
                r.ttft_slo_s if r.last_token_time is None else r.tbt_slo_s,
                _CODES[r.cache_override],
                _CODES[r.cache_type],
            )
            for r in requests
        ]
        table = np.array(rows, dtype=np.float64).reshape(len(rows), 5)
        pending = view.now - table[:, 1]
        override, held = table[:, 3], table[:, 4]
        by_mode = allowed_cache_types(None, view.cache_mode, view.cache.layout)
        hidden_possible = view.cache.layout.hidden_allowed
        may_kv = np.where(override == CODE_SKIP, CacheType.KV in by_mode, override == CODE_KV)
        # KV→hidden would need a re-prefill (x is not kept): a request holding KV stays KV.
        may_hidden = np.where(override == CODE_SKIP, CacheType.HIDDEN in by_mode, override == CODE_HIDDEN)
        may_hidden &= held != CODE_KV
        return cls(
            requests, table[:, 0].astype(np.int64), pending, pending > table[:, 2], may_kv,
            may_hidden & hidden_possible,
        )

    def choose(self, view: SchedulerView, on_time: int, capacity: int) -> np.ndarray:
        """Knapsack codes for these requests within `capacity` blocks."""
        layout, config = view.cache.layout, view.config
        blocks_kv = -(-self.num_tokens // layout.block_size)
        if self.may_hidden.any():
            blocks_hidden = -(-self.num_tokens // layout.tokens_per_block(CacheType.HIDDEN))
        else:
            blocks_hidden = np.zeros_like(blocks_kv)
        on_time_kv = self.pending + config.pending_floor_s
        value_kv = np.where(self.late, config.violator_density * blocks_kv, on_time_kv)
        # Floored where KV is not allowed (see the class docstring): such a request keeps a positive value.
        on_time_hidden = on_time_kv - on_time * view.alpha * blocks_kv
        on_time_hidden = np.where(
            self.may_kv, on_time_hidden, np.maximum(on_time_hidden, config.violator_density * blocks_hidden)
        )
        value_hidden = np.where(self.late, config.violator_density * blocks_hidden / 2, on_time_hidden)
        value_kv = np.where(self.may_kv, value_kv, 0.0)  # KV not allowed: a non-positive choice drops
        value_hidden = np.where(self.may_hidden, value_hidden, np.nan)
        return choose_codes(value_kv, blocks_kv, value_hidden, blocks_hidden, capacity)
