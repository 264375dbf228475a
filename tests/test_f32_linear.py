"""Our AVX-512 fp32 GEMM (csrc/f32_linear.cpp) against a float64 reference, and where `PackedWeight` picks it.

The kernel runs on CPUs with AVX-512 (the library is built for the CPU it runs on); elsewhere these
kernel tests skip, saying so, and fp32 weights run on oneDNN.
"""

from __future__ import annotations

import pytest
import torch
from gemm_reference import reference

from hybrid_cache import kernels
from worker.models.base import PackedWeight

kernels.load()
HAS_AVX512 = bool(torch.ops.aptserve.f32_linear_available())
needs_avx512 = pytest.mark.skipif(not HAS_AVX512, reason="this build has no AVX-512 (oneDNN runs fp32 GEMMs)")


def fp32_tolerance(x: torch.Tensor, w: torch.Tensor) -> float:
    """fp32 summation error over K products: K ulps of the largest partial sums' scale."""
    scale = (x.double().abs() @ w.double().abs().T).max().item() + 1.0
    return scale * x.shape[1] * 2.0**-23


@needs_avx512
# Rows: every row-block size (1-6), several blocks with a tail; 80 / 112 output columns: an item of four
# 16-column panels and a tail of one / three.
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 16, 40, 64])
@pytest.mark.parametrize(("out_features", "in_features"), [(80, 64), (64, 96), (112, 33), (16, 1)])
@pytest.mark.parametrize("epilogue", ["none", "bias", "bias+residual", "bias+relu", "residual"])
def test_f32_linear_matches_float64(rows: int, out_features: int, in_features: int, epilogue: str) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    w = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(rows, in_features, generator=g)
    bias = torch.randn(out_features, generator=g) if "bias" in epilogue else None
    residual = torch.randn(rows, out_features, generator=g) if "residual" in epilogue else None
    relu = "relu" in epilogue
    out = torch.ops.aptserve.f32_linear(x, torch.ops.aptserve.f32_pack(w), out_features, bias, residual, relu)
    expected = reference(x, w, bias, residual, relu)
    assert out.dtype == torch.float32 and out.shape == (rows, out_features)
    err = (out.double() - expected).abs().max().item()
    assert err <= fp32_tolerance(x, w), f"max error {err:.3g}"
    if relu:
        assert (out >= 0).all()


@needs_avx512
def test_f32_linear_reads_strided_rows() -> None:
    """Rows with a stride longer than K (a slice of a wider tensor) are read in place."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(48, 64, generator=g)
    wide = torch.randn(9, 192, generator=g)
    x = wide[:, 64:128]
    out = torch.ops.aptserve.f32_linear(x, torch.ops.aptserve.f32_pack(w), 48, None, None, False)
    assert (out.double() - reference(x, w, None, None, False)).abs().max().item() <= fp32_tolerance(x, w)


@needs_avx512
def test_f32_linear_rejects_what_it_cannot_run() -> None:
    packed = torch.ops.aptserve.f32_pack(torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="disagree"):
        torch.ops.aptserve.f32_linear(torch.randn(2, 32), packed, 32, None, None, False)
    with pytest.raises(RuntimeError, match="cannot both"):
        torch.ops.aptserve.f32_linear(torch.randn(2, 64), packed, 32, None, torch.zeros(2, 32), True)
    with pytest.raises(RuntimeError, match="N % 16"):
        torch.ops.aptserve.f32_pack(torch.randn(24, 64))
    with pytest.raises(RuntimeError, match="fp32"):
        torch.ops.aptserve.f32_pack(torch.randn(32, 64).to(torch.bfloat16))


@pytest.mark.parametrize(
    ("shape", "own", "ours"),
    [
        ((64, 96), True, True),
        ((64, 96), False, False),  # asked for oneDNN
        ((24, 96), True, False),  # out features not whole panels
    ],
)
def test_packed_weight_picks_avx512_for_fp32_where_it_fits(shape: tuple[int, int], own: bool, ours: bool) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(*shape, generator=g)
    packed = PackedWeight(w, own_gemm=own)
    assert packed.kernel == ("avx512" if ours and HAS_AVX512 else "onednn")
    x = torch.randn(2, 3, shape[1], generator=g)  # leading dimensions are kept
    residual = torch.randn(2, 3, shape[0], generator=g)
    out = packed.linear(x, residual=residual)
    expected = reference(x.reshape(6, -1), w, None, residual.reshape(6, -1), False).reshape(2, 3, -1)
    assert out.shape == (2, 3, shape[0])
    assert (out.double() - expected).abs().max().item() <= fp32_tolerance(x.reshape(6, -1), w)
