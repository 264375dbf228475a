"""Turns a policy's decision into cache changes and a batch plan; applies sampled tokens."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from hybrid_cache.manager import BlockTable, CacheManager
from hybrid_cache.plan import BatchPlan, CacheType, Conversion, SamplingParams, SequencePlan
from scheduler_service.config import SchedulerConfig
from scheduler_service.policies import FCFSPolicy, Policy, ScheduleDecision, SchedulerView
from scheduler_service.request import Request, RequestStatus
from scheduler_service.step_time import StepLoad, StepTimePredictor

log = logging.getLogger(__name__)

# What a chunk that does not end its prompt asks the sampler for: the engine discards that token, and
# greedy draws no random numbers, so a seeded request's generator is not advanced by it.
_DISCARDED = SamplingParams(temperature=0.0)


@dataclass
class ScheduledStep:
    """The plan sent to the workers and the requests behind it, in the same order.

    `failed` are requests the step could not plan (an error traced to them, or a request that cannot
    be scheduled at all): the engine ends them with an error; the rest of the step is unaffected.
    `predicted_seconds` is the step-time model's prediction for this plan (None without a model).
    """

    plan: BatchPlan
    requests: list[Request]
    num_preempted: int
    num_converted: int
    failed: list[tuple[Request, str]] = field(default_factory=list)
    predicted_seconds: float | None = None


class Scheduler:
    """Owns the waiting queue and the running set; every change to a request's blocks goes through here."""

    def __init__(
        self,
        config: SchedulerConfig,
        cache: CacheManager,
        policy: Policy,
        max_num_batched_tokens: int,
        alpha: float,
        step_time: StepTimePredictor | None = None,
    ) -> None:
        self.config = config
        self.alpha = alpha
        self.step_time = step_time
        self.cache = cache
        self.policy = policy
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_seq_ids: list[int] = []
        self._block_copies: list[tuple[int, int]] = []  # the next plan's (forked samples' first steps)
        self._finished_later: list[Request] = []  # ended, but told to the workers once `_forks_pending` clears
        self.num_prefills = 0  # admissions: a prompt (and any output) prefilled from its first token
        # Steps where the policy raised, or scheduled nothing while work was pending, and FCFS decided
        # instead. Zero by construction (admission and the policies agree); the soak test checks it.
        self.num_policy_fallbacks = 0
        self._fallback = FCFSPolicy()

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, request: Request) -> None:
        """Take a request out of the queues and free its blocks (finish or abort)."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.cache.free(request.seq_id)
        request.cache_type = None
        if self._forks_pending(request):  # the workers must keep its history until its samples start
            self._finished_later.append(request)
        else:
            self._finished_seq_ids.append(request.seq_id)

    def _forks_pending(self, request: Request) -> bool:
        """`request` is a sample 0 whose forked samples have not all had their first step planned: their
        first step copies its sampler history (`SequencePlan.fork_of`), so the workers keep it meanwhile."""
        group = request.group
        return group is not None and request.sample_index == 0 and any(
            self.cache.copy_pending(sample.seq_id) for sample in group.members[1:])

    def fork(self, parent: Request, child: Request) -> None:
        """Start `child`, a parallel sample of `parent` whose prompt was just computed: it shares the
        prompt's blocks and runs with only the last prompt token to recompute (`CacheManager.fork`);
        when no block is free for its copy, it waits to be prefilled like a new request instead."""
        if parent.status is RequestStatus.RUNNING and self.cache.num_free >= 1:
            self.cache.fork(parent.seq_id, child.seq_id, parent.num_computed_tokens)
            child.status, child.cache_type = RequestStatus.RUNNING, parent.cache_type
            child.num_computed_tokens = parent.num_computed_tokens - 1
            self.running.append(child)
        else:
            self.waiting.appendleft(child)

    def requeue_finished(self, seq_ids: list[int]) -> None:
        """Tell the workers again about ended sequences (a failed step may not have delivered them)."""
        self._finished_seq_ids.extend(seq_ids)

    def preempt(self, request: Request) -> None:
        """Free a running request's blocks and put it back at the front of the queue (re-prefilled later)."""
        self._preempt(request)

    def _preempt(self, request: Request) -> None:
        # Preemption by recompute: drop the cache, prefill prompt + outputs again later.
        self.running.remove(request)
        self.cache.free(request.seq_id)
        request.status = RequestStatus.PREEMPTED
        request.cache_type = None
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def schedule(self, now: float) -> ScheduledStep:
        # Sample 0s whose samples' first steps were all in earlier plans: the workers may forget them now.
        ready = [r for r in self._finished_later if not self._forks_pending(r)]
        self._finished_later = [r for r in self._finished_later if self._forks_pending(r)]
        self._finished_seq_ids.extend(r.seq_id for r in ready)
        view = SchedulerView(
            waiting=list(self.waiting),
            running=list(self.running),
            cache=self.cache,
            config=self.config,
            max_num_batched_tokens=self.max_num_batched_tokens,
            alpha=self.alpha,
            now=now,
            step_time=self.step_time,
        )
        decision = self._decide(view)
        # Preempt newest (and least urgent) first so that, pushed to the front one by one, the oldest of
        # the most urgent priority ends up first.
        for request in sorted(decision.preempt, key=lambda r: (r.priority, r.arrival_time), reverse=True):
            self._preempt(request)

        seqs: list[SequencePlan] = []
        requests: list[Request] = []
        failed: list[tuple[Request, str]] = []
        converted = 0
        # A request whose plan cannot be built fails alone; its blocks are freed when the engine ends it.
        for request, cache_type in decision.decode:
            try:
                seq, did_convert = self._plan_running(request, cache_type, decision.tokens_for(request))
            except Exception as err:  # noqa: BLE001 - traced to this request: it alone fails
                log.exception("could not plan a decode of %s", request.request_id)
                failed.append((request, f"the request could not be scheduled ({type(err).__name__})"))
                continue
            converted += did_convert
            seqs.append(seq)
            requests.append(request)
        for request, cache_type in decision.prefill:
            try:
                seq = self._plan_prefill(request, cache_type, decision.tokens_for(request))
            except Exception as err:  # noqa: BLE001 - traced to this request: it alone fails
                log.exception("could not plan a prefill of %s", request.request_id)
                failed.append((request, f"the request could not be scheduled ({type(err).__name__})"))
                continue
            seqs.append(seq)
            requests.append(request)
        if not requests and not failed and self.waiting and not self.running:
            # Even FCFS found nothing to run: end the oldest request rather than loop on it for ever.
            failed.append((self.waiting[0], "the request cannot be scheduled in this cache"))

        plan = BatchPlan(seqs, finished_seq_ids=self._finished_seq_ids, block_copies=self._block_copies)
        self._finished_seq_ids, self._block_copies = [], []
        predicted = self.step_time.seconds(StepLoad.of_plan(plan)) if self.step_time and seqs else None
        return ScheduledStep(plan, requests, len(decision.preempt), converted, failed, predicted)

    def _decide(self, view: SchedulerView) -> ScheduleDecision:
        """The policy's decision; FCFS's (counted in `num_policy_fallbacks`) if the policy raised or
        scheduled nothing while requests were pending. Nothing has changed yet when FCFS steps in."""
        try:
            decision = self.policy.schedule(view)
        except Exception:  # noqa: BLE001 - a policy bug must cost a step's quality, not the engine
            log.exception("the %s policy failed: FCFS decides this step", self.policy.name)
        else:
            if decision.decode or decision.prefill or not (view.waiting or view.running):
                return decision
            log.error(
                "the %s policy scheduled nothing with %d waiting and %d running: FCFS decides this step",
                self.policy.name, len(view.waiting), len(view.running),
            )
        self.num_policy_fallbacks += 1
        return self._fallback.schedule(view)

    def _plan_running(self, request: Request, cache_type: CacheType, num_new: int) -> tuple[SequencePlan, bool]:
        """The next `num_new` tokens of a running request (a decode, or a chunk of its prompt)."""
        chunk = self._chunk(request, num_new)
        copy = self.cache.take_copy(request.seq_id)  # a forked sample's first step: its last block's copy
        fork_of = None
        if copy is not None:
            self._block_copies.append((copy.src, copy.dst))
            fork_of = request.group.members[0].seq_id if request.group is not None else None
        conversion = None
        if cache_type is not request.cache_type:
            if cache_type is not CacheType.KV:
                raise RuntimeError(f"policy asked to turn {request.request_id} from KV to hidden in place")
            conversion = self.cache.convert_to_kv(request.seq_id, request.num_computed_tokens)
            request.cache_type = CacheType.KV
        table = self.cache.grow(request.seq_id, request.num_computed_tokens + len(chunk))
        return self._plan(request, chunk, conversion, fork_of, table), conversion is not None

    def _plan_prefill(self, request: Request, cache_type: CacheType, num_new: int) -> SequencePlan:
        """Admit a waiting request: blocks for its first `num_new` tokens (more come chunk by chunk)."""
        chunk = self._chunk(request, num_new)
        self.cache.allocate(request.seq_id, len(chunk), cache_type)
        self.num_prefills += 1
        self.waiting.remove(request)
        request.status = RequestStatus.RUNNING
        request.cache_type = cache_type
        self.running.append(request)
        return self._plan(request, chunk, None)

    @staticmethod
    def _chunk(request: Request, num_new: int) -> list[int]:
        """The token ids of the next `num_new` uncomputed tokens (1..all of them)."""
        if not 1 <= num_new <= request.num_new_tokens:
            raise ValueError(f"a step of {num_new} tokens for {request.request_id}, which has "
                             f"{request.num_new_tokens} to compute")
        return request.token_ids_at(request.num_computed_tokens, num_new)

    def _plan(
        self, request: Request, token_ids: list[int], conversion: Conversion | None, fork_of: int | None = None,
        table: BlockTable | None = None,
    ) -> SequencePlan:
        """The request's share of the step; `table` is its block table if the caller has it at hand."""
        if table is None:
            table = self.cache.table(request.seq_id)
        start = request.num_computed_tokens
        last = start + len(token_ids) == request.num_tokens
        # Positional: this runs for every sequence of every step. The fields, in order: seq_id,
        # token_ids, start_pos, cache_type, block_table, sampling, conversion, fork_of.
        return SequencePlan(request.seq_id, token_ids, start, table.cache_type, list(table.block_ids),
                            request.params if last else _DISCARDED, conversion, fork_of)

    def end_step(self, step: ScheduledStep) -> None:
        """Record that the planned tokens are now in the cache. A request left with tokens to compute
        (`num_new_tokens > 0`: its chunk did not reach its last token) gets no token from this step:
        the engine discards what the workers sampled for it."""
        for request, seq in zip(step.requests, step.plan.seqs):
            request.num_computed_tokens = seq.context_len
        self.cache.end_step()
