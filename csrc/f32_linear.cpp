// fp32 linear layers on AVX-512 for the row counts of decode steps.
//
// A float32 decode step's GEMMs multiply a few rows (the batch) by every weight. oneDNN's and MKL's
// fp32 GEMMs read an OPT-125m step's weights at ~10-12 GB/s at 16 rows, against ~22 GB/s of read
// bandwidth (docs/BENCHMARKS.md, "Our fp32 GEMM"). Here the weight is packed once into panels of 16
// output columns (each panel K x 16, one 64-byte vector per K step, read in order), and a work item
// multiplies six input rows at a time against four panels: an outer product in 24 registers, in which
// each weight vector loaded feeds six multiply-adds and each broadcast of x four. Bias and a residual
// (or a ReLU) are added to the fp32 sums before the one store. From 256 rows it measured 0.83-1.03x
// oneDNN (prefill; there is one packing per weight).
//
//   f32_pack(weight [N, K] fp32) -> packed       (N % 16 == 0)
//   f32_linear(x [M, K] fp32, packed, N, bias?, residual? [M, N], relu) -> [M, N] fp32
//
// Registered as torch.ops.aptserve.* (hybrid_cache/kernels.py builds and loads it; worker/models/base.py
// picks it for fp32 weights on CPUs with AVX-512).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#if defined(__AVX512F__)
#define APT_F32_LINEAR 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kPanel = 16;    // output columns of a panel: one fp32 vector
constexpr int64_t kRowBlock = 6;   // input rows multiplied against the panels of an item at once
constexpr int64_t kItemPanels = 4;  // panels of one work item

bool f32_linear_available() {
#ifdef APT_F32_LINEAR
  return true;
#else
  return false;
#endif
}

// packed[p][k][c] = W[p * 16 + c][k]
at::Tensor f32_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, "weight must be fp32 [N, K]");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(n % kPanel == 0, "f32_pack needs N % 16 == 0");
  return weight.contiguous().view({n / kPanel, kPanel, k}).transpose(1, 2).contiguous().view({n * k});
}

#ifdef APT_F32_LINEAR
struct Epilogue {
  const float* bias;  // [N] or null
  const float* res;   // [M, res_stride] or null
  int64_t res_stride;
  bool relu;
};

// The R x P block of rows [m0, m0 + R) times panels [p, p + P), with bias and residual (or ReLU) added.
// The sums stay in registers for the whole pass over K (R * P <= 24 accumulators of AVX-512's 32); each
// step loads P weight vectors and R broadcasts of x for R * P multiply-adds.
template <int R, int P>
void block(const float* x, int64_t ldx, const float* panels, int64_t k, int64_t m0, int64_t col0, int64_t n,
           const Epilogue& e, float* out) {
  __m512 acc[R * P];
#pragma GCC unroll 24
  for (int i = 0; i < R * P; ++i) acc[i] = _mm512_setzero_ps();
  const float* xr = x + m0 * ldx;
  const int64_t panel_stride = k * kPanel;
  for (int64_t kk = 0; kk < k; ++kk) {
    __m512 w[P];
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) w[p] = _mm512_loadu_ps(panels + p * panel_stride + kk * kPanel);
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(xr[r * ldx + kk]);
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) acc[r * P + p] = _mm512_fmadd_ps(xv, w[p], acc[r * P + p]);
    }
  }
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      const int64_t col = col0 + p * kPanel;
      __m512 v = acc[r * P + p];
      if (e.bias != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(e.bias + col));
      if (e.res != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(e.res + (m0 + r) * e.res_stride + col));
      if (e.relu) v = _mm512_max_ps(v, _mm512_setzero_ps());
      _mm512_storeu_ps(out + (m0 + r) * n + col, v);
    }
  }
}

// Rows [m0, m0 + R) against panels [p_begin, p_end): four panels per pass over K, a tail panel by panel.
template <int R>
void row_block(const float* x, int64_t ldx, const float* w, int64_t k, int64_t n, int64_t m0, int64_t p_begin,
               int64_t p_end, const Epilogue& e, float* out) {
  constexpr int P = kItemPanels;
  int64_t p = p_begin;
  for (; p + P <= p_end; p += P)
    block<R, P>(x, ldx, w + p * k * kPanel, k, m0, p * kPanel, n, e, out);
  for (; p < p_end; ++p) block<R, 1>(x, ldx, w + p * k * kPanel, k, m0, p * kPanel, n, e, out);
}

using RowBlockFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                            const Epilogue&, float*);

template <int... R>
constexpr std::array<RowBlockFn, sizeof...(R)> row_blocks(std::integer_sequence<int, R...>) {
  return {&row_block<R + 1>...};
}

constexpr auto kRowBlocks = row_blocks(std::make_integer_sequence<int, kRowBlock>{});  // [rows - 1]
#endif

at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n, const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& residual, bool relu) {
#ifdef APT_F32_LINEAR
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat,
              "x must be fp32 [M, K] and the weight packed by f32_pack");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(n % kPanel == 0 && packed.numel() == n * k, "x and the packed weight disagree");
  TORCH_CHECK(!(relu && residual.has_value()), "a residual and a ReLU cannot both be fused");
  const at::Tensor a = x.stride(1) == 1 ? x : x.contiguous();
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n, "bias must be fp32 [N]");
    bias_ptr = bias->data_ptr<float>();
  }
  const float* res_ptr = nullptr;
  int64_t res_stride = 0;
  if (residual.has_value()) {
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->dim() == 2 && residual->size(0) == m &&
                    residual->size(1) == n && residual->stride(1) == 1, "residual must be fp32 [M, N]");
    res_ptr = residual->data_ptr<float>();
    res_stride = residual->stride(0);
  }
  at::Tensor out = at::empty({m, n}, x.options());
  const float* a_ptr = a.data_ptr<float>();
  const int64_t lda = a.stride(0);
  const float* w = packed.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t panels = n / kPanel, items = (panels + kItemPanels - 1) / kItemPanels;
  const Epilogue epilogue{bias_ptr, res_ptr, res_stride, relu};
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p_begin = item * kItemPanels, p_end = std::min<int64_t>(panels, p_begin + kItemPanels);
      for (int64_t m0 = 0; m0 < m; m0 += kRowBlock) {
        const int64_t rows = std::min<int64_t>(kRowBlock, m - m0);
        kRowBlocks[rows - 1](a_ptr, lda, w, k, n, m0, p_begin, p_end, epilogue, o);
      }
    }
  });
  return out;
#else
  TORCH_CHECK(false, "this build of the aptserve kernels has no AVX-512 fp32 GEMM");
  return at::Tensor();
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(aptserve, m) {
  m.def("f32_linear_available() -> bool", &f32_linear_available);
  m.def("f32_pack(Tensor weight) -> Tensor");
  m.def("f32_linear(Tensor x, Tensor packed, int n, Tensor? bias=None, Tensor? residual=None, bool relu=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(aptserve, CPU, m) {
  m.impl("f32_pack", &f32_pack);
  m.impl("f32_linear", &f32_linear);
}
