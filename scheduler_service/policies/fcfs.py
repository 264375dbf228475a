"""First-come-first-serve, as vLLM schedules: oldest first, preempt the newest when memory runs out."""

from __future__ import annotations

from hybrid_cache.plan import CacheType
from scheduler_service.policies.base import Policy, ScheduleDecision, SchedulerView
from scheduler_service.request import Request


class FCFSPolicy(Policy):
    """Decodes every running request it can (oldest first), then admits waiting requests in arrival
    order while their blocks and the step's token budget fit, stopping at the first that does not.

    In `hybrid` mode a request is admitted as KV if its KV blocks fit, else as hidden if its hidden
    blocks fit; a running hidden request is converted to KV in place once nobody waits and its KV
    blocks fit with `conversion_free_fraction` of the cache still free.
    """

    name = "fcfs"

    def schedule(self, view: SchedulerView) -> ScheduleDecision:
        decision = ScheduleDecision()
        cache = view.cache
        free = cache.num_free
        tokens = 0
        running: list[Request] = list(view.running)

        # 1. Decodes, oldest first; when a request cannot grow, preempt the newest until it can.
        while running:
            request = running.pop(0)
            need = cache.blocks_to_hold(request.seq_id, request.num_tokens)
            while need > free and running:
                victim = running.pop()
                decision.preempt.append(victim)
                free += len(cache.table(victim.seq_id).blocks)
            if need > free:
                decision.preempt.append(request)
                free += len(cache.table(request.seq_id).blocks)
                continue
            if len(decision.decode) >= view.config.max_num_seqs or tokens + 1 > view.max_num_batched_tokens:
                continue  # no room in this step; it keeps its blocks and runs next step
            free -= need
            tokens += 1
            decision.decode.append((request, request.cache_type))

        # 2. Conversions to KV, only when nothing waits and memory is plentiful.
        if not view.waiting and not decision.preempt:
            reserve = int(view.config.conversion_free_fraction * cache.num_blocks)
            for index, (request, cache_type) in enumerate(decision.decode):
                if cache_type is CacheType.HIDDEN and CacheType.KV in view.allowed_types(request):
                    need = cache.blocks_needed(request.num_tokens, CacheType.KV)
                    if need + reserve <= free:
                        free -= need
                        decision.decode[index] = (request, CacheType.KV)

        # 3. Admissions in arrival order (none in a step that had to preempt: memory is short).
        if decision.preempt:
            return decision
        for request in view.waiting:
            if len(decision.decode) + len(decision.prefill) >= view.config.max_num_seqs:
                break
            if tokens + request.num_tokens > view.max_num_batched_tokens:
                break
            chosen = None
            for cache_type in view.allowed_types(request):
                need = cache.blocks_needed(request.num_tokens, cache_type)
                if need <= free:
                    chosen = cache_type
                    break
            if chosen is None:
                break
            free -= need
            tokens += request.num_tokens
            decision.prefill.append((request, chosen))
        return decision
