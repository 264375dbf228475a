"""First-come-first-serve, as vLLM v1 schedules: oldest first, preempt the newest when memory runs out,
decodes first and then prompt chunks within the step's token budget (chunked prefill). With vLLM's
`priority`, "oldest" means lowest (priority, arrival), as vLLM's priority scheduling orders them."""

from __future__ import annotations

from hybrid_cache.plan import CacheType
from scheduler_service.policies.base import Policy, ScheduleDecision, SchedulerView, by_priority
from scheduler_service.request import Request


class FCFSPolicy(Policy):
    """Keeps every running request it can (oldest first), then admits waiting requests in arrival
    order while their blocks and the step's limits fit, stopping at the first that does not. Both
    orders are by `priority` first (lower first): a request of a lower priority value is kept before,
    preempted after and admitted before any of a higher one, whatever their arrivals.

    Tokens: every kept decode first (one token each), then the next chunk of each running prompt
    being prefilled, then the first chunk of each admitted prompt, each chunk as long as what is left
    of `max_num_batched_tokens` allows. Memory counts a prompt's whole blocks from its admission
    (blocks are allocated chunk by chunk, but no one else is given those still to come), so a prompt
    being prefilled is never stalled by later admissions.

    In `hybrid` mode a request is admitted as KV if its KV blocks fit, else as hidden if its hidden
    blocks fit; a running hidden request is converted to KV in place once nobody waits and its KV
    blocks fit with `conversion_free_fraction` of the cache still free.
    """

    name = "fcfs"

    def schedule(self, view: SchedulerView) -> ScheduleDecision:
        decision = ScheduleDecision()
        cache = view.cache
        free = cache.num_free
        running: list[Request] = by_priority(view.running)
        kept: list[Request] = []

        # 1. Memory, oldest first; when a request cannot grow, preempt the newest until it can.
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
            free -= need  # held for it even if it sits this step out
            kept.append(request)

        # 2. Tokens: decodes, then the running prompts' chunks; a request left out keeps its blocks.
        tokens_left = view.max_num_batched_tokens
        for request in [r for r in kept if not r.is_prefilling] + [r for r in kept if r.is_prefilling]:
            if len(decision.decode) >= view.config.max_num_seqs or tokens_left == 0:
                break
            take = min(request.num_new_tokens, tokens_left)
            tokens_left -= take
            _cut(decision, request, take)
            decision.decode.append((request, request.cache_type))

        # 3. Conversions to KV, only when nothing waits and memory is plentiful.
        if not view.waiting and not decision.preempt:
            reserve = int(view.config.conversion_free_fraction * cache.num_blocks)
            for index, (request, cache_type) in enumerate(decision.decode):
                if cache_type is CacheType.HIDDEN and CacheType.KV in view.allowed_types(request):
                    need = cache.blocks_needed(request.num_tokens, CacheType.KV)
                    if need + reserve <= free:
                        free -= need
                        decision.decode[index] = (request, CacheType.KV)

        # 4. Admissions in arrival order (none in a step that had to preempt: memory is short).
        if decision.preempt:
            return decision
        for request in by_priority(view.waiting):
            if len(decision.decode) + len(decision.prefill) >= view.config.max_num_seqs or tokens_left == 0:
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
            take = min(request.num_tokens, tokens_left)
            tokens_left -= take
            _cut(decision, request, take)
            decision.prefill.append((request, chosen))
        return decision


def _cut(decision: ScheduleDecision, request: Request, take: int) -> None:
    """Record that `request` computes `take` of its remaining tokens this step (only if fewer than all)."""
    if take < request.num_new_tokens:
        decision.num_new_tokens[request.seq_id] = take
