"""Decoder-only models whose attention reads and writes the hybrid cache."""

from worker.model_spec import ModelSpec
from worker.models.base import CausalLM, ForwardContext
from worker.models.llama import LlamaForCausalLM
from worker.models.opt import OPTForCausalLM


def build_model(spec: ModelSpec) -> CausalLM:
    """The model class for `spec.arch`, with uninitialised weights."""
    return {"opt": OPTForCausalLM, "llama": LlamaForCausalLM}[spec.arch](spec)


__all__ = ["CausalLM", "ForwardContext", "LlamaForCausalLM", "OPTForCausalLM", "build_model"]
