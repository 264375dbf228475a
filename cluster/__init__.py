"""Composition: configuration → engine (in-process or, later, Ray), the offline API and the CLI."""

from cluster.llm import LLM
from hybrid_cache.plan import SamplingParams

__all__ = ["LLM", "SamplingParams"]
