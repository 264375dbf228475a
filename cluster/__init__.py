"""Composition: configuration → engine (in-process or over Ray), the offline API, serving and the CLI."""

import os

# Ray reads these when it is imported and hands them to every process it starts: without the first,
# Ray's services listen on the machine's external address; gloo's rendezvous likewise (docs/RELIABILITY.md).
# Set here, before any module of this package can import Ray. An operator can still override them.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from cluster.llm import LLM  # noqa: E402
from hybrid_cache.plan import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams"]
