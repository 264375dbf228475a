"""The float64 reference our GEMM kernel tests compare with (tests/test_amx_linear.py, tests/test_f32_linear.py)."""

from __future__ import annotations

import torch


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
              relu: bool) -> torch.Tensor:
    """`x @ w.T + bias + residual`, then the ReLU, in float64."""
    out = x.double() @ w.double().T
    if bias is not None:
        out = out + bias.double()
    if residual is not None:
        out = out + residual.double()
    return out.clamp_min(0) if relu else out
