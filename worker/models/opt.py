"""OPT (pre-LayerNorm): learned positions offset by 2, ReLU MLP, biases everywhere."""

from __future__ import annotations

import torch
from torch import nn

from worker.model_spec import ModelSpec
from worker.models.base import CachedAttention, CausalLM, ForwardContext, Linear, RowParallelLinear
from worker.parallel import TensorParallel

# OPT's learned position table starts two rows in (a quirk of its fairseq origin).
POSITION_OFFSET = 2


class OPTDecoderLayer(nn.Module):
    def __init__(self, index: int, spec: ModelSpec, tp: TensorParallel) -> None:
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps)
        self.self_attn = CachedAttention(index, spec, rotary=None, out_bias=spec.attention_bias, tp=tp)
        self.final_layer_norm = nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps)
        mlp = tp.shard(spec.intermediate_size, "intermediate size")
        self.fc1 = Linear(spec.hidden_size, mlp.stop - mlp.start, bias=spec.mlp_bias, relu=True)
        self.fc2 = RowParallelLinear(spec.intermediate_size, spec.hidden_size, spec.mlp_bias, tp)

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.self_attn(self.self_attn_layer_norm(h), ctx, residual=h)
        return self.fc2(self.fc1(self.final_layer_norm(h)), residual=h)


class OPTForCausalLM(CausalLM):
    column_parallel = ("qkv_proj.weight", "qkv_proj.bias", "fc1.weight", "fc1.bias")
    row_parallel = ("o_proj.weight", "fc2.weight")

    def __init__(self, spec: ModelSpec, tp: TensorParallel) -> None:
        super().__init__()
        self.spec, self.tp = spec, tp
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.embed_positions = nn.Embedding(spec.max_position_embeddings + POSITION_OFFSET, spec.hidden_size)
        self.layers = nn.ModuleList(OPTDecoderLayer(i, spec, tp) for i in range(spec.num_layers))
        self.final_layer_norm = nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps)
        self.lm_head = None if spec.tie_word_embeddings else Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.attention_layers = [layer.self_attn for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.embed_tokens(input_ids) + self.embed_positions(ctx.meta.positions + POSITION_OFFSET)
        for layer in self.layers:
            h = layer(h, ctx)
        return h

    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(self.final_layer_norm(hidden))

    def weight_targets(self, name: str) -> tuple[str, int] | None:
        name = name.removeprefix("model.").removeprefix("decoder.")
        if name == "lm_head.weight":
            return None if self.lm_head is None else ("lm_head.weight", 0)
        return self._qkv_target(name) or (name.replace("self_attn.out_proj", "self_attn.o_proj"), 0)
