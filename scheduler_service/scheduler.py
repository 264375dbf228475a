"""Turns a policy's decision into cache changes and a batch plan; applies sampled tokens."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from hybrid_cache.manager import CacheManager
from hybrid_cache.plan import BatchPlan, CacheType, Conversion, SequencePlan
from scheduler_service.config import SchedulerConfig
from scheduler_service.policies import Policy, SchedulerView
from scheduler_service.request import Request, RequestStatus


@dataclass
class ScheduledStep:
    """The plan sent to the workers and the requests behind it, in the same order."""

    plan: BatchPlan
    requests: list[Request]
    num_preempted: int
    num_converted: int


class Scheduler:
    """Owns the waiting queue and the running set; every change to a request's blocks goes through here."""

    def __init__(
        self,
        config: SchedulerConfig,
        cache: CacheManager,
        policy: Policy,
        max_num_batched_tokens: int,
        alpha: float,
    ) -> None:
        self.config = config
        self.alpha = alpha
        self.cache = cache
        self.policy = policy
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_seq_ids: list[int] = []

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
        self._finished_seq_ids.append(request.seq_id)

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
        view = SchedulerView(
            waiting=list(self.waiting),
            running=list(self.running),
            cache=self.cache,
            config=self.config,
            max_num_batched_tokens=self.max_num_batched_tokens,
            alpha=self.alpha,
            now=now,
        )
        decision = self.policy.schedule(view)
        # Preempt newest first so that, pushed to the front one by one, the oldest ends up first.
        for request in sorted(decision.preempt, key=lambda r: r.arrival_time, reverse=True):
            self._preempt(request)

        seqs: list[SequencePlan] = []
        requests: list[Request] = []
        converted = 0
        for request, cache_type in decision.decode:
            conversion = None
            if cache_type is not request.cache_type:
                if cache_type is not CacheType.KV:
                    raise RuntimeError(f"policy asked to turn {request.request_id} from KV to hidden in place")
                conversion = self.cache.convert_to_kv(request.seq_id, request.num_computed_tokens)
                request.cache_type = CacheType.KV
                converted += 1
            self.cache.grow(request.seq_id, request.num_tokens)
            seqs.append(self._plan(request, [request.all_token_ids[-1]], conversion))
            requests.append(request)
        for request, cache_type in decision.prefill:
            self.waiting.remove(request)
            self.cache.allocate(request.seq_id, request.num_tokens, cache_type)
            request.status = RequestStatus.RUNNING
            request.cache_type = cache_type
            self.running.append(request)
            seqs.append(self._plan(request, request.all_token_ids, None))
            requests.append(request)

        plan = BatchPlan(seqs, finished_seq_ids=self._finished_seq_ids)
        self._finished_seq_ids = []
        return ScheduledStep(plan, requests, len(decision.preempt), converted)

    def _plan(self, request: Request, token_ids: list[int], conversion: Conversion | None) -> SequencePlan:
        table = self.cache.table(request.seq_id)
        return SequencePlan(
            seq_id=request.seq_id,
            token_ids=token_ids,
            start_pos=request.num_computed_tokens,
            cache_type=table.cache_type,
            block_table=list(table.blocks),
            sampling=request.params,
            conversion=conversion,
        )

    def end_step(self, step: ScheduledStep) -> None:
        """Record that the planned tokens are now in the cache."""
        for request, seq in zip(step.requests, step.plan.seqs):
            request.num_computed_tokens = seq.context_len
        self.cache.end_step()
