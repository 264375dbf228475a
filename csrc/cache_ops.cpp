// Small per-step ops around the attention kernel, each replacing several PyTorch ops:
//   store_kv      this step's K/V rows written into their cache slots (one pass, no index tensors built);
//   greedy_tokens the argmax of every row of the logits (first maximum, NaN wins, as torch.argmax),
//                 parallel over rows and vectorized, reading bf16 logits without a float32 copy.
//
// Registered next to paged_attention as torch.ops.aptserve.* (hybrid_cache/kernels.py builds and loads them).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

// key_cache/value_cache: [num_blocks, block_size, num_kv_heads, head_dim] views (any block and slot
// strides, heads and head_dim packed); k/v: [T, num_kv_heads, head_dim] with packed rows; slots: int32 [T],
// block * block_size + offset, or -1 for a token that has no K/V slot (a hidden request's token).
void store_kv(at::Tensor key_cache, at::Tensor value_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slots) {
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.dim() == 4 && k.dim() == 3 && v.dim() == 3, "bad ranks");
  TORCH_CHECK(slots.scalar_type() == at::kInt && slots.is_contiguous() && slots.size(0) == k.size(0) &&
                  v.size(0) == k.size(0), "slots must be int32 [T], one per row of k and v");
  TORCH_CHECK(k.scalar_type() == key_cache.scalar_type() && v.scalar_type() == key_cache.scalar_type() &&
                  value_cache.scalar_type() == key_cache.scalar_type(), "k, v and the cache must share a dtype");
  const int64_t heads = key_cache.size(2), dim = key_cache.size(3);
  TORCH_CHECK(k.size(1) == heads && k.size(2) == dim && v.size(1) == heads && v.size(2) == dim, "shapes disagree");
  for (const at::Tensor* t : {&key_cache, &value_cache}) {
    TORCH_CHECK(t->stride(3) == 1 && t->stride(2) == dim, "a cache slot's heads must be packed");
  }
  for (const at::Tensor* t : {&k, &v}) {
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == dim, "a token's K/V heads must be packed");
  }
  const int64_t block_size = key_cache.size(1), num_slots = key_cache.size(0) * block_size;
  const int64_t row_bytes = heads * dim * static_cast<int64_t>(key_cache.element_size());
  const int32_t* slot = slots.data_ptr<int32_t>();
  auto* kc = static_cast<char*>(key_cache.data_ptr());
  auto* vc = static_cast<char*>(value_cache.data_ptr());
  const auto* ks = static_cast<const char*>(k.data_ptr());
  const auto* vs = static_cast<const char*>(v.data_ptr());
  const int64_t es = key_cache.element_size();
  const int64_t kb = key_cache.stride(0) * es, kt = key_cache.stride(1) * es;
  const int64_t vb = value_cache.stride(0) * es, vt = value_cache.stride(1) * es;
  const int64_t k0 = k.stride(0) * es, v0 = v.stride(0) * es;
  for (int64_t i = 0; i < slots.size(0); ++i) {
    TORCH_CHECK(slot[i] < num_slots, "slot ", slot[i], " is outside the cache");
  }
  // Rows are a few hundred bytes: one thread copies them faster than a parallel region starts.
  for (int64_t i = 0; i < slots.size(0); ++i) {
    const int64_t s = slot[i];
    if (s < 0) continue;
    const int64_t block = s / block_size, offset = s % block_size;
    std::memcpy(kc + block * kb + offset * kt, ks + i * k0, row_bytes);
    std::memcpy(vc + block * vb + offset * vt, vs + i * v0, row_bytes);
  }
}

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

// One vector of `row` as floats (`tmp`: scratch of one vector). bfloat16 is the high half of a float:
// a shift the compiler vectorizes.
template <typename scalar_t>
inline at::vec::Vectorized<float> load_float(const scalar_t* row, float* tmp) {
  using Vec = at::vec::Vectorized<float>;
  if constexpr (std::is_same<scalar_t, float>::value) {
    return Vec::loadu(row);
  } else if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {
    const auto* src = reinterpret_cast<const uint16_t*>(row);
    uint32_t bits[Vec::size()];
    for (int64_t t = 0; t < Vec::size(); ++t) bits[t] = static_cast<uint32_t>(src[t]) << 16;
    return Vec::loadu(bits);
  } else {
    for (int64_t t = 0; t < Vec::size(); ++t) tmp[t] = to_float(row[t]);
    return Vec::loadu(tmp);
  }
}

// The index of the first maximum of one row; a NaN counts as the maximum (the first NaN wins), as in
// torch.argmax.
template <typename scalar_t>
int64_t row_argmax(const scalar_t* row, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t W = Vec::size();
  // Pass 1: the maximum (NaN-propagating), vectorized.
  Vec best(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  float tmp[W];
  for (; i + W <= n; i += W) {
    const Vec x = load_float(row + i, tmp);
    best = at::vec::maximum(best, x);  // propagates NaN
  }
  float m = -std::numeric_limits<float>::infinity();
  bool nan = false;
  best.store(tmp);
  for (int64_t j = 0; j < W; ++j) {
    nan = nan || std::isnan(tmp[j]);
    m = std::max(m, tmp[j]);
  }
  for (; i < n; ++i) {
    const float x = to_float(row[i]);
    if (std::isnan(x)) nan = true;
    m = std::max(m, x);
  }
  // Pass 2: the first position holding it (or the first NaN), a vector at a time.
  if (!nan) {
    const Vec target(m);
    const int full = (1 << W) - 1;
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      const Vec x = load_float(row + j, tmp);
      // zero_mask() marks the lanes where the comparison came out false.
      const int hits = ~(x == target).zero_mask() & full;
      if (hits) return j + __builtin_ctz(hits);
    }
    for (; j < n; ++j) {
      if (to_float(row[j]) == m) return j;
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(to_float(row[j]))) return j;
  }
  return 0;  // unreachable for n > 0
}

at::Tensor greedy_tokens(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 && logits.size(1) > 0,
              "logits must be [B, vocab] with a contiguous vocabulary");
  const int64_t rows = logits.size(0), n = logits.size(1), stride = logits.stride(0);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  auto run = [&](auto* base) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) o[r] = row_argmax(base + r * stride, n);
    });
  };
  switch (logits.scalar_type()) {
    case at::kFloat: run(logits.data_ptr<float>()); break;
    case at::kBFloat16: run(logits.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: run(logits.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "unsupported dtype ", logits.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(aptserve, m) {
  m.def("store_kv(Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor k, Tensor v, Tensor slots) -> ()");
  m.def("greedy_tokens(Tensor logits) -> Tensor");
}

TORCH_LIBRARY_IMPL(aptserve, CPU, m) {
  m.impl("store_kv", &store_kv);
  m.impl("greedy_tokens", &greedy_tokens);
}
