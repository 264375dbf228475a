// bf16 linear layers on Intel AMX tiles, for the small row counts of decode steps.
//
// At 1-16 rows a linear layer is a pass over its weight: what matters is reading the weight once, in
// order, with little fixed cost per call. oneDNN's GEMM (what torch.ops.mkldnn runs) read a decode
// step's weights at about half the machine's read bandwidth (docs/BENCHMARKS.md, "The AMX GEMM"). Here
// the weight is packed once into AMX's tile layout, grouped so that a work item reads one contiguous run
// of it; each item multiplies every row of the input against its group of 64 output columns, then adds
// bias (and a residual, or a ReLU) while converting the fp32 tile sums to bf16 (one rounding, as
// oneDNN's fused post-ops). From 32 rows an item takes rows two A tiles at a time against two column
// blocks (pair_product), so that each weight tile loaded serves 32 rows: 1.06-1.15x over one A tile at a
// time at 64-256 rows. There the GEMMs are bound by the tiles' multiply rate, not by reading the weight.
//
//   amx_pack(weight [N, K] bf16) -> packed      (N % 16 == 0, K % 32 == 0)
//   amx_linear(x [M, K] bf16, packed, N, bias?, residual? [M, N], relu) -> [M, N] bf16
//   amx_available() -> bool                     (built with AMX, the CPU has it, the kernel let us use it)
//
// Registered as torch.ops.aptserve.* (hybrid_cache/kernels.py builds and loads it; worker/models/base.py
// picks it for bf16 weights where amx_available()).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bf16_vec.h"

#include <algorithm>
#include <cstdint>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define APT_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t kTileRows = 16;       // rows of an A or C tile; K pairs of a B tile
constexpr int64_t kTileK = 32;          // bf16 values of K in one tile row (64 bytes)
constexpr int64_t kTileCols = 16;       // fp32 columns of a C tile
constexpr int64_t kGroupBlocks = 4;     // C tiles per work item: 64 output columns
constexpr int64_t kTileElems = kTileRows * kTileK;  // 512 bf16 = 1 KiB

bool permitted() {
#ifdef APT_AMX
  // Linux hands out AMX's 8 KiB of tile state only to a process that asks (arch_prctl, once per process).
  constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool ok = syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  return ok;
#else
  return false;
#endif
}

bool amx_available() { return permitted(); }

// Packed layout: output columns in groups of 64 (four 16-column blocks; the last group may have
// fewer); within a group, for each 32-wide slice of K, its blocks' tiles side by side. A tile holds
// 16 K pairs x 16 columns x 2 (AMX's pair-interleaved "VNNI" order): tile[p][c][e] = W[n0 + c][k0 + 2p + e].
at::Tensor amx_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "weight must be bf16 [N, K]");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(n % kTileCols == 0 && k % kTileK == 0, "amx_pack needs N % 16 == 0 and K % 32 == 0");
  const at::Tensor w = weight.contiguous();
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  at::Tensor packed = at::empty({n * k}, w.options());
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.data_ptr<at::BFloat16>());
  const int64_t blocks = n / kTileCols, kslices = k / kTileK;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t group = b / kGroupBlocks, first = group * kGroupBlocks;
    const int64_t in_group = std::min<int64_t>(kGroupBlocks, blocks - first), j = b - first;
    uint16_t* group_base = dst + first * kslices * kTileElems;
    for (int64_t s = 0; s < kslices; ++s) {
      uint16_t* tile = group_base + (s * in_group + j) * kTileElems;
      for (int64_t p = 0; p < kTileRows; ++p)
        for (int64_t c = 0; c < kTileCols; ++c)
          for (int64_t e = 0; e < 2; ++e)
            tile[(p * kTileCols + c) * 2 + e] = src[(b * kTileCols + c) * k + s * kTileK + 2 * p + e];
    }
  }
  return packed;
}

#ifdef APT_AMX
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0-3: C (rows x 16 fp32); tmm4: A (rows x 32 bf16); tmm5-7: B (16 pairs x 16 columns). The
// two-row-tile product (rows == 16) reads its second A tile into tmm5 and its B tiles into tmm6, tmm7.
void configure(int64_t rows) {
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(rows);
    cfg.colsb[t] = kTileCols * sizeof(float);
  }
  cfg.rows[4] = static_cast<uint8_t>(rows);
  cfg.colsb[4] = kTileK * 2;
  for (int t = 5; t < 8; ++t) {
    cfg.rows[t] = kTileRows;
    cfg.colsb[t] = kTileCols * 2 * 2;
  }
  _tile_loadconfig(&cfg);
}

// One group of NB column blocks against one A tile's rows: C = sum over K slices of A_s * B_s.
template <int NB>
void group_product(const at::BFloat16* a, int64_t a_stride_bytes, const at::BFloat16* b, int64_t kslices,
                   float* c) {
  _tile_zero(0);
  if constexpr (NB > 1) _tile_zero(1);
  if constexpr (NB > 2) _tile_zero(2);
  if constexpr (NB > 3) _tile_zero(3);
  constexpr int64_t slice_bytes = NB * kTileElems * 2;
  for (int64_t s = 0; s < kslices; ++s) {
    _tile_loadd(4, a + s * kTileK, a_stride_bytes);
    const at::BFloat16* t = b + s * NB * kTileElems;
    // Fetch the next K slice's tiles (or the next group's, which follow) while this one multiplies:
    // measured 1.13-1.2x over leaving it to the hardware prefetcher (a 2-8 KiB distance did as well).
    const char* ahead = reinterpret_cast<const char*>(t) + slice_bytes;
    for (int64_t i = 0; i < slice_bytes; i += 64) _mm_prefetch(ahead + i, _MM_HINT_T0);
    _tile_loadd(5, t, 64);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (NB > 1) {
      _tile_loadd(6, t + kTileElems, 64);
      _tile_dpbf16ps(1, 4, 6);
    }
    if constexpr (NB > 2) {
      _tile_loadd(5, t + 2 * kTileElems, 64);
      _tile_dpbf16ps(2, 4, 5);
    }
    if constexpr (NB > 3) {
      _tile_loadd(6, t + 3 * kTileElems, 64);
      _tile_dpbf16ps(3, 4, 6);
    }
  }
  constexpr int64_t stride = kGroupBlocks * kTileCols * sizeof(float);
  _tile_stored(0, c, stride);
  if constexpr (NB > 1) _tile_stored(1, c + kTileCols, stride);
  if constexpr (NB > 2) _tile_stored(2, c + 2 * kTileCols, stride);
  if constexpr (NB > 3) _tile_stored(3, c + 3 * kTileCols, stride);
}

// Two full A tiles (32 rows) against NC (1 or 2) column blocks of a group, starting at block j: each B
// tile loaded serves two products and each A tile NC, so that at 32 rows and more the weight is read
// from memory half as often per row as by group_product (tmm0/1: rows 0-15, tmm2/3: rows 16-31).
template <int NC>
void pair_product(const at::BFloat16* a, int64_t a_stride_bytes, const at::BFloat16* b, int64_t nb, int64_t j,
                  int64_t kslices, float* c, int64_t c_stride_bytes) {
  _tile_zero(0);
  _tile_zero(2);
  if constexpr (NC > 1) {
    _tile_zero(1);
    _tile_zero(3);
  }
  const char* a_lo = reinterpret_cast<const char*>(a);
  const char* a_hi = a_lo + kTileRows * a_stride_bytes;
  for (int64_t s = 0; s < kslices; ++s) {
    const at::BFloat16* t = b + (s * nb + j) * kTileElems;
    const char* ahead = reinterpret_cast<const char*>(t + nb * kTileElems);
    for (int64_t i = 0; i < NC * kTileElems * 2; i += 64) _mm_prefetch(ahead + i, _MM_HINT_T0);
    _tile_loadd(4, a_lo + s * kTileK * 2, a_stride_bytes);
    _tile_loadd(5, a_hi + s * kTileK * 2, a_stride_bytes);
    _tile_loadd(6, t, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if constexpr (NC > 1) {
      _tile_loadd(7, t + kTileElems, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  char* lo = reinterpret_cast<char*>(c);
  char* hi = lo + kTileRows * c_stride_bytes;
  _tile_stored(0, lo, c_stride_bytes);
  _tile_stored(2, hi, c_stride_bytes);
  if constexpr (NC > 1) {
    _tile_stored(1, lo + kTileCols * sizeof(float), c_stride_bytes);
    _tile_stored(3, hi + kTileCols * sizeof(float), c_stride_bytes);
  }
}

#endif

at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n, const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& residual, bool relu) {
#ifdef APT_AMX
  TORCH_CHECK(permitted(), "AMX is not available to this process");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16,
              "x must be bf16 [M, K] and the weight packed by amx_pack");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(n % kTileCols == 0 && k % kTileK == 0 && packed.numel() == n * k, "x and the packed weight disagree");
  TORCH_CHECK(!(relu && residual.has_value()), "a residual and a ReLU cannot both be fused");
  const at::Tensor a = x.stride(1) == 1 ? x : x.contiguous();
  const at::BFloat16* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() && bias->numel() == n, "bias must be bf16 [N]");
    bias_ptr = bias->data_ptr<at::BFloat16>();
  }
  const at::BFloat16* res_ptr = nullptr;
  int64_t res_stride = 0;
  if (residual.has_value()) {
    TORCH_CHECK(residual->scalar_type() == at::kBFloat16 && residual->dim() == 2 && residual->size(0) == m &&
                    residual->size(1) == n && residual->stride(1) == 1, "residual must be bf16 [M, N]");
    res_ptr = residual->data_ptr<at::BFloat16>();
    res_stride = residual->stride(0);
  }
  at::Tensor out = at::empty({m, n}, x.options());
  const at::BFloat16* a_ptr = a.data_ptr<at::BFloat16>();
  const int64_t a_stride = a.stride(0);
  const at::BFloat16* w = packed.data_ptr<at::BFloat16>();
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  const int64_t blocks = n / kTileCols, kslices = k / kTileK;
  const int64_t groups = (blocks + kGroupBlocks - 1) / kGroupBlocks;
  // Epilogue of `rows` rows from m0 and `nblocks` column blocks from col0, their fp32 sums in c (row
  // stride c_stride floats): bias, then the residual or the ReLU, in fp32; one rounding to bf16.
  auto epilogue = [&](const float* c, int64_t c_stride, int64_t m0, int64_t rows, int64_t col0, int64_t nblocks) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < nblocks; ++j) {
        const int64_t col = col0 + j * kTileCols;
        __m512 v = _mm512_loadu_ps(c + r * c_stride + j * kTileCols);
        if (bias_ptr != nullptr) v = _mm512_add_ps(v, aptserve::bf16x16_to_f32(bias_ptr + col));
        if (res_ptr != nullptr) v = _mm512_add_ps(v, aptserve::bf16x16_to_f32(res_ptr + (m0 + r) * res_stride + col));
        if (relu) v = _mm512_max_ps(v, _mm512_setzero_ps());
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + (m0 + r) * n + col), (__m256i)_mm512_cvtneps_pbh(v));
      }
    }
  };
  const int64_t a_bytes = a_stride * 2;
  const int64_t paired_rows = m / (2 * kTileRows) * (2 * kTileRows);  // rows done two A tiles at once
  at::parallel_for(0, groups, 1, [&](int64_t g_begin, int64_t g_end) {
    alignas(64) float c[2 * kTileRows * kGroupBlocks * kTileCols];
    int64_t configured = -1;
    for (int64_t g = g_begin; g < g_end; ++g) {
      const int64_t first = g * kGroupBlocks, nb = std::min<int64_t>(kGroupBlocks, blocks - first);
      const at::BFloat16* wg = w + first * kslices * kTileElems;
      const int64_t col0 = first * kTileCols;
      if (paired_rows > 0 && configured != kTileRows) {
        configure(kTileRows);
        configured = kTileRows;
      }
      for (int64_t j = 0; j < nb; j += 2) {
        for (int64_t m0 = 0; m0 < paired_rows; m0 += 2 * kTileRows) {
          const at::BFloat16* arow = a_ptr + m0 * a_stride;
          constexpr int64_t c_stride = kGroupBlocks * kTileCols;
          if (nb - j >= 2) {
            pair_product<2>(arow, a_bytes, wg, nb, j, kslices, c, c_stride * sizeof(float));
          } else {
            pair_product<1>(arow, a_bytes, wg, nb, j, kslices, c, c_stride * sizeof(float));
          }
          epilogue(c, c_stride, m0, 2 * kTileRows, col0 + j * kTileCols, std::min<int64_t>(2, nb - j));
        }
      }
      for (int64_t m0 = paired_rows; m0 < m; m0 += kTileRows) {
        const int64_t rows = std::min<int64_t>(kTileRows, m - m0);
        if (rows != configured) {
          configure(rows);
          configured = rows;
        }
        const at::BFloat16* arow = a_ptr + m0 * a_stride;
        switch (nb) {
          case 4: group_product<4>(arow, a_bytes, wg, kslices, c); break;
          case 3: group_product<3>(arow, a_bytes, wg, kslices, c); break;
          case 2: group_product<2>(arow, a_bytes, wg, kslices, c); break;
          default: group_product<1>(arow, a_bytes, wg, kslices, c); break;
        }
        epilogue(c, kGroupBlocks * kTileCols, m0, rows, col0, nb);
      }
    }
    if (configured != -1) _tile_release();
  });
  return out;
#else
  TORCH_CHECK(false, "this build of the aptserve kernels has no AMX path");
  return at::Tensor();
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(aptserve, m) {
  m.def("amx_available() -> bool", &amx_available);
  m.def("amx_pack(Tensor weight) -> Tensor");
  m.def("amx_linear(Tensor x, Tensor packed, int n, Tensor? bias=None, Tensor? residual=None, bool relu=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(aptserve, CPU, m) {
  m.impl("amx_pack", &amx_pack);
  m.impl("amx_linear", &amx_linear);
}
