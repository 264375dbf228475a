"""The engine loop: accept requests, schedule a step, execute it, apply tokens, report outputs."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import numbers
import threading
import time
from collections.abc import Callable, Sequence

from hybrid_cache.layout import HiddenCacheUnavailable
from hybrid_cache.manager import CacheManager
from hybrid_cache.plan import BatchPlan, CacheType, SamplingParams, TokenLogprobs, logprobs_of, prompt_logprobs_of
from hybrid_cache.timing import StepTimer
from scheduler_service.config import SchedulerConfig
from scheduler_service.executor import Detokenizer, Executor, ExecutorFailed, SequenceFailed
from scheduler_service.metrics import EngineMetrics
from scheduler_service.output import append_token, record_prompt_logprobs, request_output
from scheduler_service.policies import allowed_cache_types, make_policy
from scheduler_service.request import FinishReason, Request, RequestOutput, RequestStatus
from scheduler_service.samples import SampleGroup
from scheduler_service.scheduler import ScheduledStep, Scheduler
from scheduler_service.stats import EngineStats
from scheduler_service.step_time import StepTimePredictor, StepTimeTracker

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue holds `max_waiting` requests: retry later (HTTP 503 with Retry-After)."""


class DuplicateRequestId(ValueError):
    """A client-chosen request id is already in flight (HTTP 409, gRPC ALREADY_EXISTS); nothing else is touched."""


# Why a request was aborted: its client went away or asked (`client`), the serving layer's request
# timeout ran out (`timeout`), or the server ended it (`server`, e.g. a caller that stopped polling).
ABORT_REASONS = ("client", "timeout", "server")
_INTERNAL_ERROR = "the request failed in the engine (internal error); other requests are unaffected"
_WORKERS_FAILED = "the model workers failed while running this request; retry it"


class Engine:
    """Runs requests to completion through an `Executor`. Not thread-safe: one caller drives `step()`
    (`validate`, `check_capacity`, `count_rejection` and `arrival_from_wall` may be called from others).

    Every request ends finished (stop or length), aborted, ended with an error, or is rejected by
    `add_request` — with a ValueError that names the problem, or QueueFull — and a rejected request
    changes nothing. `step()` does not raise on a failed step: a failure traced to requests ends those
    requests with an error (`finish_reason` "error", a message without internals; the details are
    logged); a failure of unknown cause ends the requests of that step; either way their blocks are
    freed and the next step serves everyone else.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        executor: Executor,
        detokenizer: Detokenizer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.executor = executor
        self.detokenizer = detokenizer
        self.clock = clock
        info = executor.info()
        if config.max_model_len is not None:  # `--max-model-len`: a shorter context than the model's
            if config.max_model_len > info.max_model_len:
                raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's context "
                                 f"({info.max_model_len} tokens)")
            info = dataclasses.replace(info, max_model_len=config.max_model_len)
        self.info = info
        layout = info.layout
        if config.cache_mode == "hidden" and not layout.hidden_allowed:
            raise HiddenCacheUnavailable(f"cache_mode 'hidden' refused: {layout.hidden_unavailable_reason}")
        if config.cache_mode == "hybrid" and not layout.hidden_allowed:
            log.warning("cache_mode 'hybrid' runs as 'kv': %s", layout.hidden_unavailable_reason)
        # A prompt longer than this is prefilled in chunks over several steps.
        max_batched = config.max_num_batched_tokens or info.max_model_len
        self.config = config
        self.cache = CacheManager(layout, info.num_blocks)
        alpha = config.recompute_seconds_per_block
        self.alpha = info.cost.alpha if alpha is None else alpha
        step_time = StepTimePredictor(info.step_cost, info.cost) if info.step_cost is not None else None
        self.scheduler = Scheduler(
            config, self.cache, make_policy(config.policy), max_batched, self.alpha, step_time
        )
        self.step_time = StepTimeTracker(info.step_cost, config.step_error_window)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._aborted: list[Request] = []
        self.num_steps = self.num_preemptions = self.num_conversions = self.num_failed_steps = 0
        self.num_forked_samples = 0  # parallel samples forked from a computed prompt (`n`/`best_of` > 1)
        self.tokens_by_cache_type = {cache_type.value: 0 for cache_type in CacheType}
        self.num_rejected = {"invalid": 0, "queue_full": 0}
        self._counts_lock = threading.Lock()  # rejections are counted from callers' threads too
        self.metrics = EngineMetrics()
        self.timer = StepTimer()
        self._executor_timings: dict[str, float] = {}

    # -- requests ------------------------------------------------------------------------------
    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        cache_type: CacheType | str | None = None,
        ttft_slo_s: float | None = None,
        tbt_slo_s: float | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> str:
        """Queue a request; returns its id. Raises ValueError (nothing queued) on bad input.

        SLOs default to the config's; the `apt` policy schedules by them. `arrival_time` (engine clock)
        defaults to now; a trace replay passes the scheduled arrival so that waiting is counted from it.
        `priority` is vLLM's: lower runs first (both policies honour it; `Request.priority`).
        """
        params = params or SamplingParams()
        try:
            if not isinstance(priority, int) or isinstance(priority, bool):
                raise ValueError(f"priority must be an integer, got {priority!r}")
            if request_id is not None and request_id in self.requests:
                raise DuplicateRequestId(f"request id {request_id!r} is already in use")
            prompt, override = self.validate(prompt_token_ids, params, cache_type, ttft_slo_s, tbt_slo_s)
        except ValueError:
            self.count_rejection("invalid")
            raise
        self.check_capacity()
        seq_id = next(self._seq_ids)
        request_id = request_id if request_id is not None else f"req-{seq_id}"
        request = Request(
            request_id, seq_id, prompt, params, self.clock() if arrival_time is None else arrival_time,
            cache_override=override,
            ttft_slo_s=ttft_slo_s or self.config.ttft_slo_s, tbt_slo_s=tbt_slo_s or self.config.tbt_slo_s,
            priority=priority,
        )
        SampleGroup.start(request)  # n / best_of > 1: this is sample 0 (scheduler_service/samples.py)
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request_id

    def check_capacity(self, queued_elsewhere: int = 0) -> None:
        """Raise QueueFull (and count it) when the waiting queue, plus `queued_elsewhere`, is full."""
        limit = self.config.max_waiting
        if limit is not None and len(self.scheduler.waiting) + queued_elsewhere >= limit:
            self.count_rejection("queue_full")
            raise QueueFull(f"the waiting queue is full ({limit} requests): retry later")

    def count_rejection(self, reason: str) -> None:
        """Count a refused request once (thread-safe). `queue_full` refusals are also SLO misses:
        the benchmark counts a request the server turned away as one that missed."""
        with self._counts_lock:
            self.num_rejected[reason] = self.num_rejected.get(reason, 0) + 1
            if reason == "queue_full":
                self.metrics.on_refused()

    def arrival_from_wall(self, received_at: float | None) -> float:
        """The engine-clock time of a request the ingress received at wall-clock `received_at`
        (`time.time()` there), so that TTFT counts from the ingress's receipt; None means now."""
        now = self.clock()
        if received_at is None:
            return now
        return now - max(0.0, time.time() - received_at)

    def validate(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        cache_type: CacheType | str | None,
        ttft_slo_s: float | None = None,
        tbt_slo_s: float | None = None,
    ) -> tuple[list[int], CacheType | None]:
        """Check a request without queueing it (reads only fixed engine facts: safe from any thread)."""
        for name, value in (("ttft_slo_s", ttft_slo_s), ("tbt_slo_s", tbt_slo_s)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:  # NaN too
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        prompt = self._check_prompt(prompt_token_ids)
        vocab = self.info.vocab_size
        for token in params.stop_token_ids:
            if not 0 <= token < vocab:
                raise ValueError(f"stop_token_ids holds {token}, outside the vocabulary (ids 0..{vocab - 1})")
        for token, _ in params.logit_bias:
            if not 0 <= token < vocab:
                raise ValueError(f"logit_bias holds token {token}, outside the vocabulary (ids 0..{vocab - 1})")
        try:
            override = CacheType(cache_type) if cache_type is not None else None
        except ValueError:
            raise ValueError(f"cache_type must be 'kv' or 'hidden', got {cache_type!r}") from None
        layout = self.cache.layout
        if override is CacheType.HIDDEN and not layout.hidden_allowed:
            raise HiddenCacheUnavailable(f"cache_type 'hidden' refused: {layout.hidden_unavailable_reason}")
        return prompt, self._admission_type(len(prompt), params, override)

    def _check_prompt(self, prompt_token_ids: Sequence[int]) -> list[int]:
        prompt = list(prompt_token_ids)
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.info.vocab_size
        for token in prompt:
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                raise ValueError(f"prompt token id {token!r} is outside the vocabulary (ids 0..{vocab - 1})")
        limit = self.info.max_model_len
        if len(prompt) >= limit:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens but the model's context is {limit} tokens "
                "(the prompt must leave room for at least one generated token)"
            )
        return prompt

    def _admission_type(self, prompt_len: int, params: SamplingParams, override: CacheType | None) -> CacheType | None:
        """The cache type the request must use (None: the policy picks), so that it fits alone at its longest.

        A request that cannot fit alone at its longest would be preempted for ever: refused now. One
        whose KV blocks at its longest exceed the whole cache but whose hidden blocks fit is pinned to
        hidden, so no policy admits it as KV (or converts it to KV) only to see it outgrow the cache.
        """
        longest = min(prompt_len + params.max_tokens, self.info.max_model_len)
        allowed = allowed_cache_types(override, self.config.cache_mode, self.cache.layout)
        fitting = [t for t in allowed if self.cache.blocks_needed(longest, t) <= self.cache.num_blocks]
        if not fitting:
            need = min(self.cache.blocks_needed(longest, t) for t in allowed)
            raise ValueError(
                f"the request needs {need} cache blocks at its longest ({longest} tokens) "
                f"but the cache has {self.cache.num_blocks} blocks"
            )
        return fitting[0] if len(fitting) < len(allowed) else override

    def abort(self, request_id: str, reason: str = "client") -> bool:
        """End a request now; its final output (reason `abort`) comes with the next `step()`.

        `reason` (one of ABORT_REASONS) is counted in the metrics; every abort is an SLO miss.
        """
        request = self.requests.get(request_id)
        samples = [] if request is None else request.group.members if request.group else [request]
        live = [sample for sample in samples if not sample.is_finished]
        for sample in live:  # every sample of the request
            sample.abort_reason = reason
            self._finish(sample, FinishReason.ABORT)
            self._aborted.append(sample)
        return bool(live)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        self.scheduler.remove(request)
        ended_early = reason in (FinishReason.ABORT, FinishReason.ERROR)
        request.status = RequestStatus.ABORTED if ended_early else RequestStatus.FINISHED
        request.finish_reason = reason
        if request.group is None or request.group.finished:  # a request's id lives until its last sample ends
            del self.requests[request.request_id]
        if request.sample_index == 0:  # one request in the metrics, however many samples
            self.metrics.on_finish(request, self.clock())

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._aborted)

    # -- the loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one iteration; return an output for every request that got a token or ended.

        Never raises for a failed step (see the class docstring); the failure is logged and counted in
        `num_failed_steps`.
        """
        outputs = [request_output(r, []) for r in self._aborted]
        self._aborted = []
        started = time.perf_counter()
        try:
            with self.timer.measure("scheduling"):
                step = self.scheduler.schedule(self.clock())
        except Exception as err:  # noqa: BLE001 - the scheduler's state is unknown: end what it held
            log.exception("scheduling failed")
            return outputs + self.recover(err)
        self.metrics.scheduler_iteration.observe(time.perf_counter() - started)
        self.num_preemptions += step.num_preempted
        self.num_conversions += step.num_converted
        outputs += [self._fail(request, message) for request, message in step.failed]
        if not step.requests:
            if step.plan.finished_seq_ids:
                self._forget(step.plan)
            return outputs
        _ask_prompt_logprobs(step)
        try:
            with self.timer.measure("execute"):
                executed = self.clock()  # the engine's clock: a simulator's steps take their virtual time
                tokens = self.executor.execute(step.plan)
                executed = self.clock() - executed
            if len(tokens) != len(step.requests):
                raise RuntimeError(f"the executor returned {len(tokens)} tokens for {len(step.requests)} sequences")
        except Exception as err:  # noqa: BLE001 - a failed step ends what it touched; the engine goes on
            self.scheduler.requeue_finished(step.plan.finished_seq_ids)  # their workers never heard of it
            return outputs + self._fail_for(step, err)
        self.scheduler.end_step(step)
        self.num_steps += 1
        predictor = self.scheduler.step_time
        if step.predicted_seconds is not None and predictor is not None:
            self.step_time.record(step.predicted_seconds, executed, predictor.scale)
            if self.config.step_time_adapt:
                self.scheduler.step_time = dataclasses.replace(predictor, scale=self.step_time.scale())
        now = self.clock()
        for request, seq, entries in zip(step.requests, step.plan.seqs, prompt_logprobs_of(tokens) or ()):
            if entries is not None:
                record_prompt_logprobs(request, seq.start_pos, entries)
        # Sample 0s whose prompt is now computed fork their samples (before their own first token is
        # applied: a forked sample starts from the prompt alone, with its prompt logprobs if asked).
        for request in step.requests:
            if request.group is not None and request.group.ready_to_fork(request):
                for sample in request.group.fork(request, self._seq_ids):
                    self.scheduler.fork(request, sample)
                    self.num_forked_samples += 1
        logprobs = logprobs_of(tokens) or [None] * len(tokens)
        for request, token, token_logprobs in zip(step.requests, tokens, logprobs):
            if request.num_new_tokens > 0:
                continue  # a chunk short of the end of its prompt: the sampled token is discarded
            try:
                outputs.append(self._apply_token(request, token, now, token_logprobs))
            except Exception:  # noqa: BLE001 - e.g. the detokenizer on this request's tokens: it alone fails
                log.exception("could not apply a token to %s", request.request_id)
                outputs.append(self._fail(request, _INTERNAL_ERROR))
        return outputs

    def _apply_token(
        self, request: Request, token: int, now: float, logprobs: TokenLogprobs | None = None
    ) -> RequestOutput:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.info.vocab_size:
            raise ValueError(f"the executor sampled {token!r}, not a token id")
        self.tokens_by_cache_type[request.cache_type._value_] += 1  # `Enum.value` is a slow descriptor
        request.token_times.append(now)
        self.metrics.on_token(request)
        reason = append_token(request, token, self.info.eos_token_ids, self.info.max_model_len, self.detokenizer)
        if logprobs is not None:
            request.logprobs.append(logprobs)
        if reason is not None:
            self._finish(request, reason)
        return request_output(request, [token], [logprobs] if logprobs is not None else None)

    def _forget(self, plan: BatchPlan) -> None:
        """A plan with no sequence only tells the workers which requests ended; a failure costs nothing."""
        try:
            self.executor.execute(plan)
        except Exception:  # noqa: BLE001 - the ids are sent again with the next step
            log.exception("could not tell the workers that %d requests ended", len(plan.finished_seq_ids))
            self.scheduler.requeue_finished(plan.finished_seq_ids)

    def _fail(self, request: Request, message: str) -> RequestOutput:
        """End one request with an error (its blocks are freed) and return its final output."""
        request.error = message
        if not request.is_finished:
            self._finish(request, FinishReason.ERROR)
        return request_output(request, [])

    def _fail_for(self, step: ScheduledStep, err: Exception) -> list[RequestOutput]:
        """End what a failed executor call touched: every running request when the workers are gone
        (`ExecutorFailed`), the named ones (`SequenceFailed`), else the step's requests."""
        if isinstance(err, ExecutorFailed):
            return self._fail_running(str(err))
        if isinstance(err, SequenceFailed):
            return self._fail_traced(step, err)
        log.error("a step of %d sequences failed", len(step.requests), exc_info=err)
        return self._fail_step(step.requests, _INTERNAL_ERROR)

    def _fail_running(self, reason: str) -> list[RequestOutput]:
        """The workers lost their caches: end every running request with an error (waiting ones stay)."""
        log.error("the workers failed, ending %d running requests: %s", len(self.scheduler.running), reason)
        return self._fail_step(list(self.scheduler.running), _WORKERS_FAILED)

    def _fail_traced(self, step: ScheduledStep, err: SequenceFailed) -> list[RequestOutput]:
        """Only the named sequences caused the failure: they end with its message. The rest of the
        step is preempted (what the workers wrote for it this step is unknown) and runs again later."""
        named = set(err.seq_ids)
        log.error("a step failed because of sequences %s: %s", sorted(named), err.message)
        self.num_failed_steps += 1
        outputs = []
        for request in step.requests:
            if request.seq_id in named:
                outputs.append(self._fail(request, err.message))
            elif request.status is RequestStatus.RUNNING:
                self.scheduler.preempt(request)
                self.num_preemptions += 1
        self.cache.end_step()  # blocks a planned conversion would have released
        return outputs

    def _fail_step(self, requests: list[Request], message: str) -> list[RequestOutput]:
        self.num_failed_steps += 1
        outputs = [self._fail(request, message) for request in requests]
        self.cache.end_step()  # blocks a planned conversion would have released
        return outputs

    def recover(self, err: BaseException) -> list[RequestOutput]:
        """After a failure outside a step's guarded parts: end every request in flight with an error
        (freeing every block) so that the engine is consistent and serves new requests."""
        log.error("recovering from %s: ending %d requests in flight", type(err).__name__, len(self.requests))
        outputs = [request_output(r, []) for r in self._aborted]
        self._aborted = []
        in_flight = [s for r in self.requests.values() for s in (r.group.live() if r.group else [r])]
        return outputs + self._fail_step(in_flight, _INTERNAL_ERROR)

    # -- reporting -----------------------------------------------------------------------------
    def stats(self, healthy: bool = True) -> EngineStats:
        """A snapshot built now (call it from the thread that drives `step()`, or while it is paused)."""
        layout = self.cache.layout
        allowed = layout.hidden_allowed
        with self._counts_lock:
            rejected, metrics = dict(self.num_rejected), self.metrics.copy()
        return EngineStats(
            policy=self.config.policy,
            cache_mode=self.config.cache_mode if allowed else "kv",
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            cache=self.cache.usage(),
            num_steps=self.num_steps,
            num_preemptions=self.num_preemptions,
            num_conversions=self.num_conversions,
            num_failed_steps=self.num_failed_steps,
            tokens_by_cache_type=dict(self.tokens_by_cache_type),
            step_seconds=dict(self.timer.totals) | self._timings(healthy),
            block_size=layout.block_size,
            hidden_tokens_per_block=layout.tokens_per_block(CacheType.HIDDEN) if allowed else None,
            ratio=layout.ratio,
            kv_bytes_per_token_per_layer=layout.bytes_per_token_per_layer(CacheType.KV),
            hidden_bytes_per_token_per_layer=layout.bytes_per_token_per_layer(CacheType.HIDDEN),
            cache_bytes=self.info.cache_bytes,
            num_rejected=rejected,
            alpha=self.alpha,
            recompute_fixed_seconds=self.info.cost.fixed_seconds,
            metrics=metrics,
            num_policy_fallbacks=self.scheduler.num_policy_fallbacks,
            healthy=healthy,
            step_time=self.step_time.report(predictor.scale if (predictor := self.scheduler.step_time) else 1.0),
            num_prefills=self.scheduler.num_prefills,
            num_forked_samples=self.num_forked_samples,
        )

    def _timings(self, healthy: bool) -> dict[str, float]:
        """The executor's timings (the last ones known if it is stopped or cannot answer)."""
        if healthy:
            try:
                self._executor_timings = self.executor.timings()
            except Exception:  # noqa: BLE001 - statistics must not fail because a worker is down
                log.warning("the executor's timings are unavailable", exc_info=True)
        return dict(self._executor_timings)


def _ask_prompt_logprobs(step: ScheduledStep) -> None:
    """Have the workers score the prompt chunks of requests that asked for prompt logprobs and do
    not have them all yet (a re-prefill after a preemption recomputes none it has)."""
    for request, seq in zip(step.requests, step.plan.seqs):
        wanted = request.params.prompt_logprobs
        if wanted is not None and seq.start_pos < len(request.prompt_token_ids) and (
                len(request.prompt_logprobs) < len(request.prompt_token_ids)):
            seq.prompt_logprobs = wanted


__all__ = ["ABORT_REASONS", "DuplicateRequestId", "Engine", "QueueFull"]
