"""Llama: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from worker.model_spec import ModelSpec
from worker.models.base import (
    CachedAttention,
    CausalLM,
    ForwardContext,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
)
from worker.parallel import TensorParallel


class LlamaDecoderLayer(nn.Module):
    def __init__(self, index: int, spec: ModelSpec, rotary: RotaryEmbedding, tp: TensorParallel) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.norm_eps)
        self.self_attn = CachedAttention(index, spec, rotary=rotary, out_bias=spec.attention_bias, tp=tp)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.norm_eps)
        mlp = tp.shard(spec.intermediate_size, "intermediate size")
        self.intermediate_size = mlp.stop - mlp.start  # this rank's share
        self.gate_up_proj = Linear(spec.hidden_size, 2 * self.intermediate_size, bias=spec.mlp_bias)
        self.down_proj = RowParallelLinear(spec.intermediate_size, spec.hidden_size, spec.mlp_bias, tp)

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(h), ctx, residual=h)
        gate, up = self.gate_up_proj(self.post_attention_layernorm(h)).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up, residual=h)


class LlamaForCausalLM(CausalLM):
    column_parallel = ("qkv_proj.weight", "qkv_proj.bias", "gate_up_proj.weight", "gate_up_proj.bias")
    row_parallel = ("o_proj.weight", "down_proj.weight")

    def __init__(self, spec: ModelSpec, tp: TensorParallel) -> None:
        super().__init__()
        self.spec, self.tp = spec, tp
        self.rotary = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings, spec.rope_theta)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(i, spec, self.rotary, tp) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.norm_eps)
        self.lm_head = None if spec.tie_word_embeddings else Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.attention_layers = [layer.self_attn for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, ctx)
        return h

    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(self.norm(hidden))

    def weight_targets(self, name: str) -> tuple[str, int] | None:
        name = name.removeprefix("model.")
        if name == "lm_head.weight":
            return None if self.lm_head is None else ("lm_head.weight", 0)
        if "rotary_emb" in name:
            return None
        qkv = self._qkv_target(name)
        if qkv is not None:
            return qkv
        match = re.fullmatch(r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)", name)
        if match:
            layer, which, kind = match.groups()
            if which == "down":
                return f"layers.{layer}.down_proj.{kind}", 0
            return f"layers.{layer}.gate_up_proj.{kind}", 0 if which == "gate" else self.layers[0].intermediate_size
        return name, 0
