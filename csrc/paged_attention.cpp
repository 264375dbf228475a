// Paged attention on the CPU: queries of a variable-length batch attend over K/V read where they lie
// (cache blocks addressed through block tables), fp32 accumulation, online softmax, no gather and no
// padding. Parallel over (sequence, query tile, K/V head); the query heads of a K/V head share each
// key tile (grouped-query attention reads K/V once per group).
//
// Registered as torch.ops.aptserve.paged_attention (see worker/kernels.py, which builds and loads it).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

constexpr int64_t kQueryTile = 16;  // queries of one sequence handled by one work item
constexpr int64_t kKeyTile = 32;    // keys converted to fp32 and scored together
static_assert(kKeyTile % 16 == 0, "a key tile is whole vectors of any width at::vec uses");

inline float dot(const float* a, const float* b, int64_t d) {
  int64_t i = 0;
  Vec acc(0.f);
  for (; i + Vec::size() <= d; i += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  float sum = at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return x + y; }, acc);
  for (; i < d; ++i) sum += a[i] * b[i];
  return sum;
}

// Scores of one query row against `n` keys stored row by row, four keys at a time (independent
// multiply-add chains), one horizontal sum per key.
inline void key_scores(const float* q, const float* k, int64_t n, int64_t d, float* scores) {
  int64_t j = 0;
  if (d % Vec::size() == 0) {
    for (; j + 4 <= n; j += 4) {
      Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
      const float* k0 = k + j * d;
      for (int64_t x = 0; x < d; x += Vec::size()) {
        Vec qv = Vec::loadu(q + x);
        a0 = at::vec::fmadd(qv, Vec::loadu(k0 + x), a0);
        a1 = at::vec::fmadd(qv, Vec::loadu(k0 + d + x), a1);
        a2 = at::vec::fmadd(qv, Vec::loadu(k0 + 2 * d + x), a2);
        a3 = at::vec::fmadd(qv, Vec::loadu(k0 + 3 * d + x), a3);
      }
      auto add = [](Vec x, Vec y) { return x + y; };
      scores[j] = at::vec::vec_reduce_all<float>(add, a0);
      scores[j + 1] = at::vec::vec_reduce_all<float>(add, a1);
      scores[j + 2] = at::vec::vec_reduce_all<float>(add, a2);
      scores[j + 3] = at::vec::vec_reduce_all<float>(add, a3);
    }
  }
  for (; j < n; ++j) scores[j] = dot(q, k + j * d, d);
}

// acc = acc * alpha + sum_j p[j] * v[j]
inline void scale_accumulate(float* acc, float alpha, const float* p, const float* v, int64_t n, int64_t d) {
  int64_t i = 0;
  for (; i + Vec::size() <= d; i += Vec::size()) {
    Vec a = Vec::loadu(acc + i) * Vec(alpha);
    for (int64_t j = 0; j < n; ++j) a = at::vec::fmadd(Vec(p[j]), Vec::loadu(v + j * d + i), a);
    a.store(acc + i);
  }
  for (; i < d; ++i) {
    float a = acc[i] * alpha;
    for (int64_t j = 0; j < n; ++j) a += p[j] * v[j * d + i];
    acc[i] = a;
  }
}

template <typename T>
inline void load_f32(const T* src, float* dst, int64_t d) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(src[i]);
}

// bfloat16 is the high half of a float: a shift the compiler vectorizes.
template <>
inline void load_f32<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t d) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* o = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < d; ++i) o[i] = static_cast<uint32_t>(s[i]) << 16;
}

template <typename scalar_t, typename out_t>
void paged_attention_impl(
    at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_tables, const at::Tensor& q_start, const at::Tensor& q_len, const at::Tensor& kv_len,
    double scale, bool causal, float* lse) {
  const int64_t num_seqs = q_start.size(0);
  const int64_t num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t table_stride = block_tables.stride(0);
  const int32_t* starts = q_start.data_ptr<int32_t>();
  const int32_t* qlens = q_len.data_ptr<int32_t>();
  const int32_t* kvlens = kv_len.data_ptr<int32_t>();
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.data_ptr<scalar_t>();
  out_t* op = out.data_ptr<out_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  const int64_t os0 = out.stride(0), os1 = out.stride(1);
  const int64_t kb = k_cache.stride(0), kt = k_cache.stride(1), kh = k_cache.stride(2);
  const int64_t vb = v_cache.stride(0), vt = v_cache.stride(1), vh = v_cache.stride(2);

  // Work items: (sequence, query tile) pairs times K/V heads.
  std::vector<int64_t> tile_seq, tile_first;
  for (int64_t s = 0; s < num_seqs; ++s) {
    for (int64_t first = 0; first < qlens[s]; first += kQueryTile) {
      tile_seq.push_back(s);
      tile_first.push_back(first);
    }
  }
  const int64_t num_items = static_cast<int64_t>(tile_seq.size()) * num_kv_heads;
  const float neg_inf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, num_items, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows_max = kQueryTile * group;
    std::vector<float> qf(rows_max * head_dim), acc(rows_max * head_dim), m(rows_max), l(rows_max);
    std::vector<float> kf(kKeyTile * head_dim), vf(kKeyTile * head_dim), scores(kKeyTile);
    std::fill(kf.begin(), kf.end(), 0.f);  // keys past a tile's end score garbage-free zeros (masked anyway)
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tile = item / num_kv_heads, kvh = item % num_kv_heads;
      const int64_t s = tile_seq[tile], first = tile_first[tile];
      const int64_t nq = std::min<int64_t>(kQueryTile, qlens[s] - first);
      const int64_t nkv = kvlens[s];
      const int64_t shift = causal ? nkv - qlens[s] : nkv;  // query i sees keys j <= i + shift (all if !causal)
      const int32_t* table = tables + s * table_stride;
      const int64_t rows = nq * group;
      for (int64_t i = 0; i < nq; ++i) {
        for (int64_t g = 0; g < group; ++g) {
          float* dst = qf.data() + (i * group + g) * head_dim;
          load_f32(qp + (starts[s] + first + i) * qs0 + (kvh * group + g) * qs1, dst, head_dim);
          for (int64_t x = 0; x < head_dim; ++x) dst[x] *= static_cast<float>(scale);
        }
      }
      std::fill(acc.begin(), acc.begin() + rows * head_dim, 0.f);
      std::fill(m.begin(), m.begin() + rows, neg_inf);
      std::fill(l.begin(), l.begin() + rows, 0.f);
      const int64_t key_end = std::min<int64_t>(nkv, causal ? first + nq - 1 + shift + 1 : nkv);
      for (int64_t j0 = 0; j0 < key_end; j0 += kKeyTile) {
        const int64_t nk = std::min<int64_t>(kKeyTile, key_end - j0);
        for (int64_t j = 0; j < nk; ++j) {
          const int64_t pos = j0 + j;
          const int64_t block = table[pos / block_size], offset = pos % block_size;
          load_f32(kp + block * kb + offset * kt + kvh * kh, kf.data() + j * head_dim, head_dim);
        }
        for (int64_t j = 0; j < nk; ++j) {
          const int64_t pos = j0 + j;
          const int64_t block = table[pos / block_size], offset = pos % block_size;
          load_f32(vp + block * vb + offset * vt + kvh * vh, vf.data() + j * head_dim, head_dim);
        }
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t visible = causal ? std::min<int64_t>(nk, first + i + shift + 1 - j0) : nk;
          if (visible <= 0) continue;
          for (int64_t g = 0; g < group; ++g) {
            const int64_t r = i * group + g;
            key_scores(qf.data() + r * head_dim, kf.data(), visible, head_dim, scores.data());
            for (int64_t j = visible; j < kKeyTile; ++j) scores[j] = neg_inf;
            Vec top_vec = Vec::loadu(scores.data());
            for (int64_t c = Vec::size(); c < kKeyTile; c += Vec::size())
              top_vec = at::vec::maximum(top_vec, Vec::loadu(scores.data() + c));
            const float top = at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return at::vec::maximum(x, y); },
                                                              top_vec);
            const float m_new = std::max(m[r], top);
            const float alpha = std::exp(m[r] - m_new);  // exp(-inf) = 0 on the first tile
            Vec sum_vec(0.f);
            for (int64_t c = 0; c < kKeyTile; c += Vec::size()) {
              Vec p = (Vec::loadu(scores.data() + c) - Vec(m_new)).exp_u20();
              p.store(scores.data() + c);
              sum_vec = sum_vec + p;
            }
            const float sum = at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return x + y; }, sum_vec);
            l[r] = l[r] * alpha + sum;
            m[r] = m_new;
            scale_accumulate(acc.data() + r * head_dim, alpha, scores.data(), vf.data(), visible, head_dim);
          }
        }
      }
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t token = starts[s] + first + i;
        for (int64_t g = 0; g < group; ++g) {
          const int64_t r = i * group + g, head = kvh * group + g;
          const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
          out_t* dst = op + token * os0 + head * os1;
          const float* src = acc.data() + r * head_dim;
          for (int64_t x = 0; x < head_dim; ++x) dst[x] = static_cast<out_t>(src[x] * inv);
          if (lse != nullptr) lse[token * num_heads + head] = l[r] > 0.f ? m[r] + std::log(l[r]) : neg_inf;
        }
      }
    }
  });
}

void paged_attention(
    at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_tables, const at::Tensor& q_start, const at::Tensor& q_len, const at::Tensor& kv_len,
    double scale, bool causal, const c10::optional<at::Tensor>& lse) {
  TORCH_CHECK(q.dim() == 3 && out.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "bad ranks");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "the head dimension must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q and the K/V cache must share a dtype");
  TORCH_CHECK(k_cache.size(3) == q.size(2) && q.size(1) % k_cache.size(2) == 0, "head shapes disagree");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && q_start.scalar_type() == at::kInt &&
                  q_len.scalar_type() == at::kInt && kv_len.scalar_type() == at::kInt,
              "index tensors must be int32");
  TORCH_CHECK(block_tables.stride(1) == 1 && q_start.is_contiguous() && q_len.is_contiguous() &&
                  kv_len.is_contiguous(), "index tensors must be contiguous");
  float* lse_ptr = nullptr;
  if (lse.has_value()) {
    TORCH_CHECK(lse->scalar_type() == at::kFloat && lse->is_contiguous() && lse->size(0) == q.size(0) &&
                    lse->size(1) == q.size(1), "lse must be float32 [T, heads]");
    lse_ptr = lse->data_ptr<float>();
  }
  const bool out_f32 = out.scalar_type() == at::kFloat;
  TORCH_CHECK(out_f32 || out.scalar_type() == q.scalar_type(), "out must be float32 or q's dtype");
#define APT_CASE(T)                                                                                          \
  if (out_f32) {                                                                                             \
    paged_attention_impl<T, float>(out, q, k_cache, v_cache, block_tables, q_start, q_len, kv_len, scale,   \
                                   causal, lse_ptr);                                                         \
  } else {                                                                                                   \
    paged_attention_impl<T, T>(out, q, k_cache, v_cache, block_tables, q_start, q_len, kv_len, scale, causal, \
                               lse_ptr);                                                                     \
  }
  switch (q.scalar_type()) {
    case at::kFloat: { APT_CASE(float) break; }
    case at::kBFloat16: { APT_CASE(c10::BFloat16) break; }
    case at::kHalf: { APT_CASE(c10::Half) break; }
    default: TORCH_CHECK(false, "unsupported dtype ", q.scalar_type());
  }
#undef APT_CASE
}

}  // namespace

TORCH_LIBRARY(aptserve, m) {
  m.def(
      "paged_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor q_start, Tensor q_len, Tensor kv_len, float scale, bool causal, Tensor(b!)? lse=None) -> ()");
}

TORCH_LIBRARY_IMPL(aptserve, CPU, m) { m.impl("paged_attention", &paged_attention); }
