"""Memory for the hybrid cache: block accounting, cache tensors, and the attention/recompute ops.

This package imports none of the others (docs/ARCHITECTURE.md): the scheduler uses the accounting, the workers use
the tensors and ops, and the batch plan that crosses between them is defined here.
"""

from hybrid_cache.block_pool import BlockPool, BlockPoolError
from hybrid_cache.config import CacheConfig
from hybrid_cache.info import WorkerInfo
from hybrid_cache.layout import CacheLayout, HiddenCacheUnavailable
from hybrid_cache.manager import CacheManager, CacheUsage
from hybrid_cache.plan import BatchPlan, CacheType, Conversion, SamplingParams, SequencePlan

__all__ = [
    "BatchPlan",
    "BlockPool",
    "BlockPoolError",
    "CacheConfig",
    "CacheLayout",
    "CacheManager",
    "CacheType",
    "CacheUsage",
    "Conversion",
    "HiddenCacheUnavailable",
    "SamplingParams",
    "SequencePlan",
    "WorkerInfo",
]
