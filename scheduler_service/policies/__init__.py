"""Scheduling policies as swappable classes behind one interface (`Policy`)."""

from scheduler_service.policies.apt import AptPolicy
from scheduler_service.policies.base import Policy, ScheduleDecision, SchedulerView, allowed_cache_types
from scheduler_service.policies.fcfs import FCFSPolicy

POLICIES: dict[str, type[Policy]] = {FCFSPolicy.name: FCFSPolicy, AptPolicy.name: AptPolicy}


def make_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r} (choose from {', '.join(POLICIES)})")
    return POLICIES[name]()


__all__ = [
    "AptPolicy",
    "FCFSPolicy",
    "allowed_cache_types", "POLICIES", "Policy", "ScheduleDecision", "SchedulerView", "make_policy"]
