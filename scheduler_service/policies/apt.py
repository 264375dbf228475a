"""Apt-Serve's adaptive policy (docs/ARCHITECTURE.md, "Scheduling: Apt"): value by pending time, knapsack by memory."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from hybrid_cache.plan import CacheType
from scheduler_service.knapsack import CODE_HIDDEN, CODE_KV, CODE_SKIP, NAMES, choose_codes
from scheduler_service.policies.base import Policy, ScheduleDecision, SchedulerView, allowed_cache_types
from scheduler_service.request import Request
from scheduler_service.step_time import StepLoad

# The cache type of each knapsack code (CODE_SKIP has none): indexing is far cheaper than
# `CacheType(NAMES[code])`, done for every running request every step.
_TYPES: tuple[CacheType | None, ...] = tuple(None if name == "skip" else CacheType(name) for name in NAMES)
# vLLM's `priority` (lower first) weighs a request's pending time by PRIORITY_BASE ** -priority: one
# level more urgent counts each second waited twice. Clipped to ±PRIORITY_CLIP levels so that a huge
# value cannot overflow the weight (or zero it) and make the knapsack's values meaningless.
PRIORITY_BASE = 2.0
PRIORITY_CLIP = 32


def priority_weight(priority: int) -> float:
    """The factor on a request's pending time (1.0 at the default priority 0)."""
    return PRIORITY_BASE ** -max(-PRIORITY_CLIP, min(PRIORITY_CLIP, priority))


class AptPolicy(Policy):
    """Values requests by how long they have waited, picks them by a knapsack over memory, and builds
    each step from the running requests it keeps and the prompts it admits.

    A request's value is its pending time `p` (since its last token, or its arrival) with KV, and
    `p - U·α·m` with the hidden cache (`U` requests not yet late each slowed by the recompute of its
    `m` blocks). That hidden value is negative at realistic α for most on-time requests: where KV is
    allowed this rightly means "wait for KV rather than slow everyone down", but a request that may
    only run as hidden (cache_mode hidden, `cache_type: hidden`, or pinned to hidden at admission
    because its KV blocks at its longest exceed the cache) would never be admitted, or, running, be
    preempted every step. For those requests the hidden value is floored at `violator_density` per
    hidden block (what a late KV request is worth): they run with spare room, like late ones.
    Requests already past an SLO get a tiny value density: spare room only. vLLM's `priority` weighs
    `p` (`priority_weight`: a lower value counts its waiting more), here and wherever groups' pending
    times are compared.

    Running requests compete for the whole cache: one that loses is preempted, one that keeps its
    type just goes on, and a hidden one chosen as KV is converted in place when its KV blocks are
    free (else it stays hidden this step). In a step that preempts nobody, waiting requests compete
    for the free blocks left after every running request could grow `growth_reserve_tokens`.

    The step (`mixed`, the default) carries every kept decode and then prompt chunks — of prompts
    being prefilled and of admitted ones, the most urgent first (a lower `priority` value first) —
    while the step-time model predicts the step within `step_time_headroom` of the tightest
    time-between-tokens budget of the on-time decodes. When that budget leaves no prompt any tokens,
    the prompts still get the step's token budget if they have waited longer in total than the decodes.
    With `mixed: false`, that same comparison picks a prefill-only or a decode-only step, as in the paper.
    """

    name = "apt"

    def schedule(self, view: SchedulerView) -> ScheduleDecision:
        running = _Candidates.of(view.running, view)
        # Most steps have nobody waiting (87% of a 4 req/s ShareGPT run): its arrays and knapsack,
        # some 60 µs of numpy calls, are then skipped; an empty queue admits nobody either way.
        waiting = _Candidates.of(view.waiting, view) if view.waiting else None
        # Who is already late, decided once per iteration: it sets U and each request's value.
        on_time = int((~running.late).sum()) + (int((~waiting.late).sum()) if waiting is not None else 0)
        running_choice = running.choose(view, on_time, view.cache.num_blocks)
        growth = _Growth.of(view, running.num_tokens)
        decision, converted_blocks = self._keep(view, running_choice, growth)
        admitted: list[tuple[Request, CacheType]] = []
        if waiting is not None and not decision.preempt:  # memory is short in a step that preempts: admit nobody
            # Admissions leave the running requests room to grow for a while: filling every free block
            # would preempt one of them within a step or two, and its re-prefill wastes the admission.
            reserve = converted_blocks + growth.total(running.num_tokens + view.config.growth_reserve_tokens)
            waiting_choice = waiting.choose(view, on_time, max(0, view.cache.num_free - reserve))
            codes = waiting_choice.tolist()
            admitted = [(r, _TYPES[k]) for r, k in zip(view.waiting, codes) if k != CODE_SKIP]
        kept, decision.decode = decision.decode, []
        decodes: list[tuple[Request, CacheType]] = []
        prompts: list[tuple[Request, CacheType]] = []
        for item in kept:
            (prompts if item[0].is_prefilling else decodes).append(item)
        prompts += admitted
        running_ids = {r.seq_id for r, _ in kept}
        _Builder(view, decision, running_ids).build(decodes, prompts)
        return decision

    def _keep(self, view: SchedulerView, codes: np.ndarray, growth: _Growth) -> tuple[ScheduleDecision, int]:
        """Running requests the knapsack keeps (in `decode`, with their cache type this step) and the
        ones it drops (in `preempt`); also the blocks the conversions it plans take beyond growth."""
        cache = view.cache
        decision = ScheduleDecision()
        keep: list[tuple[Request, CacheType]] = []
        free = cache.num_free
        for request, code in zip(view.running, codes.tolist()):
            if code == CODE_SKIP:
                decision.preempt.append(request)
                free += len(cache.table(request.seq_id).blocks)
            else:
                keep.append((request, _TYPES[code]))
        # Growth first (every kept request keeps its current type; a prompt holds its whole length),
        # then conversions that fit.
        free -= growth.total(growth.num_tokens, codes != CODE_SKIP)
        converted = 0
        for request, kind in keep:
            target = request.cache_type
            if kind is CacheType.KV and request.cache_type is CacheType.HIDDEN:
                # Its KV blocks must be free while its hidden blocks are still read this step.
                extra = cache.blocks_needed(request.num_tokens, CacheType.KV) - cache.blocks_to_hold(
                    request.seq_id, request.num_tokens
                )
                if extra <= free:
                    free -= extra
                    converted += extra
                    target = CacheType.KV
            decision.decode.append((request, target))
        return decision, converted


@dataclass(frozen=True)
class _Growth:
    """`CacheManager.blocks_to_hold` for every running request at once: each holds `held` blocks of
    `per_block` tokens (its table's, looked up once per step), and needs `ceil(tokens / per_block)`."""

    num_tokens: np.ndarray  # each request's tokens now
    held: np.ndarray
    per_block: np.ndarray

    @classmethod
    def of(cls, view: SchedulerView, num_tokens: np.ndarray) -> _Growth:
        cache = view.cache
        tables = [cache.table(r.seq_id) for r in view.running]
        held = np.array([len(t.block_ids) for t in tables], dtype=np.int64)
        kv = CacheType.KV
        if all(t.cache_type is kv for t in tables):  # the common case: one size for all
            per_block = np.full(len(tables), cache.tokens_per_block(kv), dtype=np.int64)
        else:
            per_block = np.array([cache.tokens_per_block(t.cache_type) for t in tables], dtype=np.int64)
        return cls(num_tokens, held, per_block)

    def total(self, num_tokens: np.ndarray, mask: np.ndarray | None = None) -> int:
        """The blocks the requests (those in `mask`) need beyond what they hold to hold `num_tokens`."""
        extra = np.maximum(0, -(-num_tokens // self.per_block) - self.held)
        return int(extra.sum() if mask is None else extra[mask].sum())


@dataclass
class _Builder:
    """Fills one step's token and sequence budgets: decodes, then prompt chunks (see `AptPolicy`)."""

    view: SchedulerView
    decision: ScheduleDecision
    running_ids: set[int]
    load: StepLoad = field(default_factory=StepLoad)
    tokens_left: int = 0

    def build(self, decodes: list[tuple[Request, CacheType]], prompts: list[tuple[Request, CacheType]]) -> None:
        view = self.view
        self.tokens_left = view.max_num_batched_tokens
        if not view.config.mixed:
            prompts = self._in_arrival_order(prompts)
            if prompts and (not decodes or _pending(view, prompts) > _pending(view, decodes)):
                self._chunks(prompts, budget_s=math.inf)
            else:
                self._decodes(decodes)
            return
        self._decodes(decodes)
        prompts = self._by_urgency(prompts)
        self._chunks(prompts, budget_s=self._time_budget())
        if prompts and self._num_prompt_chunks() == 0 and (
            not self.decision.decode or _pending(view, prompts) > _pending(view, decodes)
        ):
            self._chunks(prompts, budget_s=math.inf)  # the prompts have waited longer: they go anyway

    def _decodes(self, decodes: list[tuple[Request, CacheType]]) -> None:
        """As many decodes, in order, as the sequence and token budgets allow (one token each)."""
        room = min(self.view.config.max_num_seqs - len(self.decision.decode), self.tokens_left)
        taken = decodes[: max(0, room)]
        if not taken:
            return
        self.tokens_left -= len(taken)
        self.decision.decode += taken
        # `StepLoad.add(1, start, hidden)` for each, summed: one token attending start + 1 keys.
        load, history = self.load, 0
        context = 0
        for request, kind in taken:
            start = request.num_computed_tokens
            context += start + 1
            if kind is CacheType.HIDDEN:
                history += start
        load.sequences += len(taken)
        load.tokens += len(taken)
        load.context += context
        load.hidden_history += history

    def _chunks(self, prompts: list[tuple[Request, CacheType]], budget_s: float) -> None:
        """Give each prompt, in order, the longest chunk the token, sequence and time budgets allow."""
        config, decision = self.view.config, self.decision
        for request, kind in prompts:
            if len(decision.decode) + len(decision.prefill) >= config.max_num_seqs or self.tokens_left == 0:
                return
            start, hidden = request.num_computed_tokens, kind is CacheType.HIDDEN
            limit = min(request.num_new_tokens, self.tokens_left)
            take = limit
            if math.isfinite(budget_s) and self.view.step_time is not None:
                take = self.view.step_time.largest_chunk(self.load, start, hidden, limit, budget_s)
                if take < limit and take < config.min_chunk_tokens:
                    take = 0
            if take == 0:
                continue
            self.tokens_left -= take
            self.load.add(take, start, hidden)
            if take < request.num_new_tokens:
                decision.num_new_tokens[request.seq_id] = take
            (decision.decode if request.seq_id in self.running_ids else decision.prefill).append((request, kind))

    def _num_prompt_chunks(self) -> int:
        return len(self.decision.prefill) + sum(r.is_prefilling for r, _ in self.decision.decode)

    def _time_budget(self) -> float:
        """Seconds this step may take: the tightest time-between-tokens slack of the on-time decodes
        in it, times the headroom; unbounded without decodes on time or without a step-time model."""
        view = self.view
        if view.step_time is None:
            return math.inf
        now, tightest = view.now, math.inf
        for request, _ in self.decision.decode:
            # `pending_since() + tbt - now` of a request with a token that does not `violates_slo(now)`,
            # spelled out: this runs for every decode of every step.
            times = request.token_times
            if times and not now - times[-1] > request.tbt_slo_s:
                tightest = min(tightest, times[-1] + request.tbt_slo_s - now)
        return tightest * view.config.step_time_headroom if tightest < math.inf else math.inf

    def _by_urgency(self, prompts: list[tuple[Request, CacheType]]) -> list[tuple[Request, CacheType]]:
        """On-time prompts by the time left to their SLO deadline (TTFT, or TBT for a preempted one
        re-prefilling its outputs), then late ones oldest first; within each, a lower priority first."""
        now = self.view.now

        def key(item: tuple[Request, CacheType]) -> tuple[bool, int, float]:
            request = item[0]
            slo = request.ttft_slo_s if request.last_token_time is None else request.tbt_slo_s
            deadline = request.pending_since() + slo
            late = deadline < now
            return late, request.priority, request.arrival_time if late else deadline

        return sorted(prompts, key=key)

    @staticmethod
    def _in_arrival_order(prompts: list[tuple[Request, CacheType]]) -> list[tuple[Request, CacheType]]:
        return sorted(prompts, key=lambda item: item[0].arrival_time)


def _pending(view: SchedulerView, group: list[tuple[Request, CacheType]]) -> float:
    """The summed pending time of a group of requests (the paper's prefill-or-decode comparison),
    each weighted by its priority."""
    return sum((view.now - r.pending_since()) * priority_weight(r.priority) for r, _ in group)


@dataclass(frozen=True)
class _Candidates:
    """One queue's requests as arrays: what the knapsack needs, gathered in one pass."""

    requests: Sequence[Request]
    num_tokens: np.ndarray
    pending: np.ndarray  # seconds since its last progress (`now - t_i`)
    weight: np.ndarray  # `priority_weight` of each request
    late: np.ndarray  # already past its TTFT or TBT SLO
    may_kv: np.ndarray
    may_hidden: np.ndarray

    @classmethod
    def of(cls, requests: Sequence[Request], view: SchedulerView) -> _Candidates:
        # Spelled out (`num_tokens`, `pending_since()`, the codes of the cache types) for speed: this
        # runs for every request in both queues every step, and an enum member's hash is a Python call.
        kv, hidden = CacheType.KV, CacheType.HIDDEN
        rows = [
            (
                len(r.prompt_token_ids) + len(r.output_token_ids),
                r.token_times[-1] if r.token_times else r.arrival_time,
                r.tbt_slo_s if r.token_times else r.ttft_slo_s,
                CODE_KV if r.cache_override is kv else CODE_HIDDEN if r.cache_override is hidden else CODE_SKIP,
                CODE_KV if r.cache_type is kv else CODE_HIDDEN if r.cache_type is hidden else CODE_SKIP,
                r.priority,
            )
            for r in requests
        ]
        table = np.array(rows, dtype=np.float64).reshape(len(rows), 6)
        pending = view.now - table[:, 1]
        override, held = table[:, 3], table[:, 4]
        by_mode = allowed_cache_types(None, view.cache_mode, view.cache.layout)
        hidden_possible = view.cache.layout.hidden_allowed
        may_kv = np.where(override == CODE_SKIP, CacheType.KV in by_mode, override == CODE_KV)
        # KV→hidden would need a re-prefill (x is not kept): a request holding KV stays KV.
        may_hidden = np.where(override == CODE_SKIP, CacheType.HIDDEN in by_mode, override == CODE_HIDDEN)
        may_hidden &= held != CODE_KV
        priority = table[:, 5]
        if priority.any():
            weight = np.power(PRIORITY_BASE, -np.clip(priority, -PRIORITY_CLIP, PRIORITY_CLIP))
        else:  # the common case: every request at the default priority
            weight = np.ones(len(rows))
        return cls(
            requests, table[:, 0].astype(np.int64), pending, weight, pending > table[:, 2], may_kv,
            may_hidden & hidden_possible,
        )

    def choose(self, view: SchedulerView, on_time: int, capacity: int) -> np.ndarray:
        """Knapsack codes for these requests within `capacity` blocks."""
        layout, config = view.cache.layout, view.config
        blocks_kv = -(-self.num_tokens // layout.block_size)
        on_time_kv = (self.pending + config.pending_floor_s) * self.weight
        value_kv = np.where(self.late, config.violator_density * blocks_kv, on_time_kv)
        value_kv = np.where(self.may_kv, value_kv, 0.0)  # KV not allowed: a non-positive choice drops
        if not self.may_hidden.any():  # no hidden choice (the common case): its values are all NaN
            return choose_codes(value_kv, blocks_kv, np.full(len(value_kv), np.nan), np.zeros_like(blocks_kv),
                                capacity)
        blocks_hidden = -(-self.num_tokens // layout.tokens_per_block(CacheType.HIDDEN))
        # Floored where KV is not allowed (see the class docstring): such a request keeps a positive value.
        on_time_hidden = on_time_kv - on_time * view.alpha * blocks_kv
        on_time_hidden = np.where(
            self.may_kv, on_time_hidden, np.maximum(on_time_hidden, config.violator_density * blocks_hidden)
        )
        value_hidden = np.where(self.late, config.violator_density * blocks_hidden / 2, on_time_hidden)
        value_hidden = np.where(self.may_hidden, value_hidden, np.nan)
        return choose_codes(value_kv, blocks_kv, value_hidden, blocks_hidden, capacity)
