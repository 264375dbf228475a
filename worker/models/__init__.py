"""Decoder-only models whose attention reads and writes the hybrid cache."""

from worker.model_spec import ModelSpec
from worker.models.base import CausalLM, ForwardContext
from worker.models.llama import LlamaForCausalLM
from worker.models.opt import OPTForCausalLM
from worker.parallel import SINGLE, TensorParallel


def build_model(spec: ModelSpec, tp: TensorParallel = SINGLE) -> CausalLM:
    """The model class for `spec.arch` (this rank's shard of it), with uninitialised weights."""
    return {"opt": OPTForCausalLM, "llama": LlamaForCausalLM}[spec.arch](spec, tp)


__all__ = ["CausalLM", "ForwardContext", "LlamaForCausalLM", "OPTForCausalLM", "build_model"]
