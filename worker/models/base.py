"""Pieces shared by the models: the forward context, rotary embedding, RMSNorm, cached attention."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_cache import kernels
from hybrid_cache.attention import AttentionBackend, TorchBackend, convert_to_kv
from hybrid_cache.metadata import AttentionMetadata
from hybrid_cache.tensors import CacheTensors
from worker.model_spec import ModelSpec
from worker.parallel import TensorParallel

Split = Literal["rows", "cols"]  # how a parameter is divided across tensor-parallel ranks


class WeightReader(Protocol):
    """A checkpoint tensor that can be read in part (a safetensors slice, or a tensor)."""

    def get_shape(self) -> list[int]: ...

    def __getitem__(self, index: object) -> torch.Tensor: ...


@dataclass
class ForwardContext:
    """What every layer needs besides its input: the step's indices and the cache."""

    meta: AttentionMetadata
    cache: CacheTensors
    backend: AttentionBackend = field(default_factory=TorchBackend)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (half-rotation layout, as in Hugging Face Llama)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        # Plain tensors on the CPU, not buffers: models are built on the meta device and the tables
        # must hold real values; they follow the input to its device on first use.
        steps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()
        inv_freq = 1.0 / (theta ** (steps / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device="cpu"), inv_freq)
        angles = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate `x` `[n, heads, head_dim]` by the angles of `positions` `[n]`."""
        if self.cos.device != x.device:
            self.cos, self.sin = self.cos.to(x.device), self.sin.to(x.device)
        cos = self.cos[positions].unsqueeze(1).to(x.dtype)
        sin = self.sin[positions].unsqueeze(1).to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the input dtype, the order Hugging Face uses.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def can_prepack(weight: torch.Tensor) -> bool:
    """oneDNN prepacking applies to CPU weights in float32 or bfloat16."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
    )


class PackedWeight:
    """A GEMM weight laid out once for a fast CPU kernel, then used by `linear`.

    `kernel` says which (docs/ARCHITECTURE.md, "GEMMs"):
    - "amx": ours (csrc/amx_linear.cpp), for bf16 weights that fit AMX tiles on a CPU with AMX, when
      `own_gemm` is asked for. At decode batch sizes (1-16 rows) it reads the weights at ~80% of
      the machine's read bandwidth, oneDNN at about half (docs/BENCHMARKS.md, "The AMX GEMM").
    - "avx512": ours (csrc/f32_linear.cpp), for fp32 weights (out features % 16) on CPUs with AVX-512,
      when `own_gemm` is asked for: 1.3-1.5x oneDNN at 1-16 rows, 0.83-1.03x from 256 rows (prefill)
      (docs/BENCHMARKS.md, "Our fp32 GEMM").
    - "onednn": reordered for oneDNN's GEMM (`torch.ops.mkldnn`). The reorder depends on the weight
      only (batch size unset): measured, as fast as a per-batch-size packing at every batch size we run.
    """

    def __init__(self, weight: torch.Tensor, own_gemm: bool = False) -> None:
        weight = weight.detach().contiguous()
        self.out_features = weight.shape[0]
        self.kernel = kernels.gemm_kernel(weight) if own_gemm else "onednn"
        if self.kernel == "onednn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        else:
            pack, self._own_linear = kernels.gemm_ops(self.kernel)
            self.packed = pack(weight)

    def linear(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "none",
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`x @ W.T + bias`, then `activation` ("none" or "relu") or `+ residual`, fused into the GEMM
        (in float32 bit-identical to adding afterwards; in bfloat16 one rounding less)."""
        if residual is not None and activation != "none":
            raise ValueError("a residual and an activation cannot both be fused")
        if self.kernel != "onednn":
            rows = x.reshape(-1, x.shape[-1])
            res = None if residual is None else residual.reshape(-1, self.out_features).contiguous()
            out = self._own_linear(rows, self.packed, self.out_features, bias, res, activation == "relu")
            return out.view(*x.shape[:-1], self.out_features)
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x.contiguous(), residual.contiguous(), self.packed, bias,
                                                             "add")
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, bias, activation, [], "")


class Linear(nn.Linear):
    """`nn.Linear` that runs on a prepacked weight once `prepack()` has been called (after loading).

    `relu=True` applies a ReLU to the output; on the prepacked path it is fused into the GEMM (one pass
    over the output less; exact, as the ReLU of a rounded value is the rounding of the ReLU).
    """

    packed: PackedWeight | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, relu: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.relu = relu

    def prepack(self, own_gemm: bool = False) -> None:
        self.packed = PackedWeight(self.weight, own_gemm) if can_prepack(self.weight) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            out = F.linear(x, self.weight, self.bias)
            return F.relu(out) if self.relu else out
        return self.packed.linear(x, self.bias, "relu" if self.relu else "none")


class RowParallelLinear(Linear):
    """A linear layer over this rank's slice of the input features; partial sums are all-reduced.

    `forward(x, residual)` returns `residual + x @ W.T + bias`: the residual connection that follows
    every row-parallel layer in our models. The bias (whole on every rank) is added once, after the
    reduction; on one rank there is no reduction, so bias and residual go into the GEMM itself (two
    small passes over the output less per layer — measured, each cost more than its arithmetic).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel) -> None:
        super().__init__(in_features // tp.size, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if self.tp.size == 1:
            if self.packed is not None:
                return self.packed.linear(x, self.bias, residual=residual)
            out = F.linear(x, self.weight, self.bias)
        else:
            out = self.tp.all_reduce(F.linear(x, self.weight) if self.packed is None else self.packed.linear(x))
            if self.bias is not None:
                out = out + self.bias
        return out if residual is None else residual + out


class CachedAttention(nn.Module):
    """Self-attention with a fused QKV projection whose history lives in the hybrid cache.

    The layer's normalised input `x` is what a hidden request stores — under tensor parallelism,
    this rank's column slice of it — and `project_kv` recomputes this rank's heads' K/V from it
    (all-gathering the slices first) with the same weights and rotary embedding.
    """

    def __init__(
        self, layer_index: int, spec: ModelSpec, rotary: RotaryEmbedding | None, out_bias: bool, tp: TensorParallel
    ) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.tp = tp
        heads = tp.shard(spec.num_heads, "attention heads")
        kv_heads = tp.shard(spec.num_kv_heads, "key/value heads")
        self.x_columns = tp.shard(spec.hidden_size, "hidden size")
        self.num_heads, self.num_kv_heads = heads.stop - heads.start, kv_heads.stop - kv_heads.start
        self.head_dim = spec.head_dim
        self.q_size = self.num_heads * spec.head_dim
        self.kv_size = self.num_kv_heads * spec.head_dim
        self.scale = spec.head_dim**-0.5
        self.qkv_proj = Linear(spec.hidden_size, self.q_size + 2 * self.kv_size, bias=spec.attention_bias)
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size, out_bias, tp)
        self.rotary = rotary
        self.kv_packed: PackedWeight | None = None

    def prepack(self, own_gemm: bool = False) -> None:
        """Pack the K/V rows of the fused projection on their own, for `project_kv`."""
        weight = self.qkv_proj.weight[self.q_size :]
        self.kv_packed = PackedWeight(weight, own_gemm) if can_prepack(weight) else None

    def project_kv(self, x: torch.Tensor, positions: torch.Tensor, out: torch.Tensor) -> None:
        x = self.tp.all_gather_columns(x)  # this rank's slice of x → the whole rows
        weight = self.qkv_proj.weight[self.q_size :]
        bias = None if self.qkv_proj.bias is None else self.qkv_proj.bias[self.q_size :]
        if self.kv_packed is not None:
            out.copy_(self.kv_packed.linear(x, bias))
        elif bias is not None:
            torch.addmm(bias, x, weight.t(), out=out)
        else:
            torch.mm(x, weight.t(), out=out)
        if self.rotary is not None:
            k = out[:, : self.kv_size].view(-1, self.num_kv_heads, self.head_dim)
            k.copy_(self.rotary(k, positions))

    def convert(self, ctx: ForwardContext) -> None:
        layer = ctx.cache.layers[self.layer_index]
        convert_to_kv(layer, ctx.cache.workspace, ctx.meta, self.project_kv)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over the cached history plus this step's tokens; returns `residual + o_proj(...)`."""
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.rotary is not None:
            q, k = self.rotary(q, ctx.meta.positions), self.rotary(k, ctx.meta.positions)
        layer = ctx.cache.layers[self.layer_index]
        with ctx.cache.workspace.timer.measure("attention"):  # includes recompute
            out = ctx.backend.forward(
                layer, ctx.cache.workspace, ctx.meta, q, k, v, x[:, self.x_columns], self.project_kv, self.scale
            )
        return self.o_proj(out.reshape(n, self.q_size), residual)


class CausalLM(nn.Module):
    """Interface of our models: forward over a flat token batch, then logits for chosen rows."""

    spec: ModelSpec
    attention_layers: list[CachedAttention]

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # [T, H]
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, vocab]
        raise NotImplementedError

    tp: TensorParallel
    # Parameters (by name suffix) split across ranks; the rest are replicated on every rank
    # (norms, biases of row-parallel layers, the embeddings and the LM head).
    column_parallel: tuple[str, ...] = ()
    row_parallel: tuple[str, ...] = ()

    def weight_targets(self, name: str) -> tuple[str, int] | None:
        """Map a Hugging Face tensor name to (our parameter, row offset on this rank) or None to ignore it."""
        raise NotImplementedError

    def split_of(self, param: str) -> Split | None:
        if param.endswith(self.row_parallel):
            return "cols"
        if param.endswith(self.column_parallel):
            return "rows"
        return None

    def _qkv_target(self, name: str) -> tuple[str, int] | None:
        """Separate q/k/v projections of a checkpoint land in row ranges of our fused `qkv_proj`."""
        match = re.fullmatch(r"layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)", name)
        if match is None:
            return None
        layer, which, kind = match.groups()
        q, kv = self.attention_layers[0].q_size, self.attention_layers[0].kv_size
        return f"layers.{layer}.self_attn.qkv_proj.{kind}", {"q": 0, "k": q, "v": q + kv}[which]

    lm_packed: PackedWeight | None = None

    def lm_head_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on normalised rows (prepacked when possible)."""
        if self.lm_packed is not None:
            return self.lm_packed.linear(hidden)
        return F.linear(hidden, self.lm_head_weight())

    def prepack(self, own_gemm: bool = False) -> None:
        """Lay out every GEMM weight once for a fast CPU kernel (the linears, the K/V rows, the LM head);
        with `own_gemm`, weights our kernels can run go to them (`PackedWeight`)."""
        for module in self.modules():
            if isinstance(module, (Linear, CachedAttention)) and module is not getattr(self, "lm_head", None):
                module.prepack(own_gemm)
        weight = self.lm_head_weight()
        self.lm_packed = PackedWeight(weight, own_gemm) if can_prepack(weight) else None

    def gemm_kernels(self) -> str:
        """Which kernels run this model's GEMMs: "torch" (not prepacked), or those of its packed weights
        ("amx", "avx512", "onednn", or e.g. "amx+onednn" where some weights do not fit AMX tiles)."""
        packed = [m.packed for m in self.modules() if isinstance(m, Linear) and m.packed is not None]
        packed += [m.kv_packed for m in self.modules() if isinstance(m, CachedAttention) and m.kv_packed is not None]
        packed += [self.lm_packed] if self.lm_packed is not None else []
        return "+".join(sorted({p.kernel for p in packed})) or "torch"

    def convert_to_kv(self, ctx: ForwardContext) -> None:
        """Run the planned hidden→KV conversions, layer by layer."""
        if ctx.meta.conversions:
            for attention in self.attention_layers:
                attention.convert(ctx)

    def load_weights(self, weights: Iterable[tuple[str, WeightReader]]) -> None:
        """Copy this rank's share of each checkpoint tensor into parameters (reading only that share);
        raise naming any missing or mis-shaped tensor."""
        params = dict(self.named_parameters())
        filled: dict[str, int] = {name: 0 for name in params}
        for hf_name, reader in weights:
            target = self.weight_targets(hf_name)
            if target is None:
                continue
            name, row = target
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name} maps to unknown parameter {name}")
            param = params[name]
            tensor = self._read_share(hf_name, reader, self.split_of(name))
            rows = tensor.shape[0]
            dest = param.data[row : row + rows] if row or rows != param.shape[0] else param.data
            if dest.shape != tensor.shape:
                raise ValueError(
                    f"checkpoint tensor {hf_name} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            filled[name] += tensor.numel()
        missing = [name for name, count in filled.items() if count != params[name].numel()]
        if missing:
            raise ValueError(f"checkpoint is missing tensors for: {', '.join(sorted(missing)[:8])}")

    def _read_share(self, hf_name: str, reader: WeightReader, split: Split | None) -> torch.Tensor:
        shape = list(reader.get_shape())
        if split is None or self.tp.size == 1:
            return reader[:]
        dim = 0 if split == "rows" else 1
        if len(shape) <= dim:
            raise ValueError(f"checkpoint tensor {hf_name} has shape {tuple(shape)}: cannot split its dim {dim}")
        part = self.tp.shard(shape[dim], f"dim {dim} of {hf_name}")
        return reader[part] if dim == 0 else reader[:, part]
