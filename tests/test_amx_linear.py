"""Our AMX bf16 GEMM (csrc/amx_linear.cpp) against a float64 reference, and `PackedWeight`'s choice of kernel.

The kernel runs only on CPUs with AMX tiles (Sapphire Rapids and later): there these tests compare it
with the reference; elsewhere the kernel tests skip, saying so, and the choice tests check that every
weight falls back to oneDNN.
"""

from __future__ import annotations

import pytest
import torch
from gemm_reference import reference

from hybrid_cache import kernels
from worker.models.base import PackedWeight

kernels.load()
HAS_AMX = bool(torch.ops.aptserve.amx_available())
needs_amx = pytest.mark.skipif(not HAS_AMX, reason="this CPU has no AMX tiles (the oneDNN path runs instead)")


def bf16_tolerance(expected: torch.Tensor) -> float:
    """One bf16 rounding of the largest output, plus fp32 summation slack."""
    return expected.abs().max().item() * 2.0**-8 + 1e-3


@needs_amx
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40, 64, 96])
@pytest.mark.parametrize(("out_features", "in_features"), [(80, 64), (64, 96), (192, 32), (112, 64)])
@pytest.mark.parametrize("epilogue", ["none", "bias", "bias+residual", "bias+relu", "residual"])
def test_amx_linear_matches_float64(rows: int, out_features: int, in_features: int, epilogue: str) -> None:
    # 80 output columns: one full group of four 16-column blocks and a group of one.
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    w = torch.randn(out_features, in_features, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, in_features, generator=g).to(torch.bfloat16)
    bias = torch.randn(out_features, generator=g).to(torch.bfloat16) if "bias" in epilogue else None
    residual = torch.randn(rows, out_features, generator=g).to(torch.bfloat16) if "residual" in epilogue else None
    relu = "relu" in epilogue
    packed = torch.ops.aptserve.amx_pack(w)
    out = torch.ops.aptserve.amx_linear(x, packed, out_features, bias, residual, relu)
    expected = reference(x, w, bias, residual, relu)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, out_features)
    err = (out.double() - expected).abs().max().item()
    assert err <= bf16_tolerance(expected), f"max error {err:.3g}"
    if relu:
        assert (out >= 0).all()


@needs_amx
def test_amx_linear_reads_strided_rows_and_interleaves_with_onednn() -> None:
    """Rows with a stride longer than K (a slice of a wider tensor) are read in place; oneDNN's own AMX
    GEMM in the same threads, before and after ours, still gives its results (tile state is ours only
    within a call)."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 64, generator=g).to(torch.bfloat16)
    wide = torch.randn(16, 192, generator=g).to(torch.bfloat16)
    x = wide[:, 64:128]
    onednn = torch.ops.mkldnn._reorder_linear_weight(w)
    before = torch.ops.mkldnn._linear_pointwise(x.contiguous(), onednn, None, "none", [], "")
    ours = torch.ops.aptserve.amx_linear(x, torch.ops.aptserve.amx_pack(w), 64, None, None, False)
    after = torch.ops.mkldnn._linear_pointwise(x.contiguous(), onednn, None, "none", [], "")
    assert torch.equal(before, after)
    expected = reference(x, w, None, None, False)
    assert (ours.double() - expected).abs().max().item() <= bf16_tolerance(expected)


@needs_amx
def test_amx_linear_rejects_what_it_cannot_run() -> None:
    w = torch.randn(32, 64).to(torch.bfloat16)
    packed = torch.ops.aptserve.amx_pack(w)
    with pytest.raises(RuntimeError, match="disagree"):
        torch.ops.aptserve.amx_linear(torch.randn(2, 32).to(torch.bfloat16), packed, 32, None, None, False)
    with pytest.raises(RuntimeError, match="cannot both"):
        torch.ops.aptserve.amx_linear(torch.randn(2, 64).to(torch.bfloat16), packed, 32, None,
                                      torch.zeros(2, 32, dtype=torch.bfloat16), True)
    with pytest.raises(RuntimeError, match="N % 16"):
        torch.ops.aptserve.amx_pack(torch.randn(24, 64).to(torch.bfloat16))


@pytest.mark.parametrize(
    ("dtype", "shape", "amx", "fits"),
    [
        (torch.bfloat16, (64, 96), True, True),
        (torch.bfloat16, (64, 96), False, False),  # asked for oneDNN
        (torch.bfloat16, (24, 96), True, False),  # out features not whole tiles
        (torch.bfloat16, (64, 40), True, False),  # in features not whole tiles
    ],
)
def test_packed_weight_picks_amx_only_where_it_fits(dtype: torch.dtype, shape: tuple[int, int], amx: bool,
                                                    fits: bool) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(*shape, generator=g).to(dtype)
    packed = PackedWeight(w, own_gemm=amx)
    assert packed.kernel == ("amx" if fits and HAS_AMX else "onednn")
    x = torch.randn(2, 3, shape[1], generator=g).to(dtype)  # leading dimensions are kept
    residual = torch.randn(2, 3, shape[0], generator=g).to(dtype)
    out = packed.linear(x, residual=residual)
    expected = reference(x.reshape(6, -1), w, None, residual.reshape(6, -1), False).reshape(2, 3, -1)
    assert out.shape == (2, 3, shape[0])
    assert (out.double() - expected).abs().max().item() <= bf16_tolerance(expected)
