// Paged attention on the CPU: queries of a variable-length batch attend over K/V read where they lie
// (cache blocks addressed through block tables), fp32 accumulation, online softmax, no gather and no
// padding. A work item is a query tile of one sequence with all its K/V heads, or a run of them when
// tiles are too few for the threads; threads take items costliest first. The query heads of a K/V
// head share each key tile (grouped-query attention reads K/V once per group).
//
// Registered as torch.ops.aptserve.paged_attention (see hybrid_cache/kernels.py, which builds and loads it).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "bf16_vec.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
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


#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512F__)
#include <immintrin.h>
#define APT_FAST 1

// The sums of 16 vectors, one per lane, in order: r[j] = sum of a[j]'s lanes (a shuffle tree, 3 ops a key
// instead of a full horizontal reduction per key).
inline __m512 reduce16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    d[i] = _mm512_add_ps(_mm512_unpacklo_ps(c[2 * i], c[2 * i + 1]), _mm512_unpackhi_ps(c[2 * i], c[2 * i + 1]));
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 2, 3, 2)));
  // Lane 4k+p of e holds key 4p+k.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, e);
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) { return aptserve::bf16x16_to_f32(p); }

// Scores of one query row (fp32, scaled) against 16 keys read where they lie; d % 16 == 0.
template <typename T>
inline void scores16(const float* q, const T* const* keys, int64_t d, float* out) {
  __m512 a[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) a[j] = _mm512_setzero_ps();
  for (int64_t x = 0; x < d; x += 16) {
    const __m512 qv = _mm512_loadu_ps(q + x);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) a[j] = _mm512_fmadd_ps(qv, load16(keys[j] + x), a[j]);
  }
  _mm512_storeu_ps(out, reduce16(a));
}

#if defined(__AVX512BF16__)
#define APT_BF16_DOT 1
// Scores of one bf16 query row (unscaled) against 16 bf16 keys: native bf16 pair products (exact in
// fp32), fp32 accumulation; d % 32 == 0.
inline void scores16_bf16(const c10::BFloat16* q, const c10::BFloat16* const* keys, int64_t d, float scale,
                          float* out) {
  __m512 a[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) a[j] = _mm512_setzero_ps();
  for (int64_t x = 0; x < d; x += 32) {
    const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + x);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) a[j] = _mm512_dpbf16_ps(a[j], qv, (__m512bh)_mm512_loadu_si512(keys[j] + x));
  }
  _mm512_storeu_ps(out, _mm512_mul_ps(reduce16(a), _mm512_set1_ps(scale)));
}
#endif

// acc = acc * alpha + sum_j p[j] * v[j], values read where they lie; d % 16 == 0.
template <typename T>
inline void accumulate_inplace(float* acc, float alpha, const float* p, const T* const* values, int64_t n,
                               int64_t d) {
  const __m512 al = _mm512_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 64 <= d; i += 64) {
    __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(acc + i), al), a1 = _mm512_mul_ps(_mm512_loadu_ps(acc + i + 16), al);
    __m512 a2 = _mm512_mul_ps(_mm512_loadu_ps(acc + i + 32), al), a3 = _mm512_mul_ps(_mm512_loadu_ps(acc + i + 48), al);
    for (int64_t j = 0; j < n; ++j) {
      const __m512 pj = _mm512_set1_ps(p[j]);
      const T* v = values[j] + i;
      a0 = _mm512_fmadd_ps(pj, load16(v), a0);
      a1 = _mm512_fmadd_ps(pj, load16(v + 16), a1);
      a2 = _mm512_fmadd_ps(pj, load16(v + 32), a2);
      a3 = _mm512_fmadd_ps(pj, load16(v + 48), a3);
    }
    _mm512_storeu_ps(acc + i, a0);
    _mm512_storeu_ps(acc + i + 16, a1);
    _mm512_storeu_ps(acc + i + 32, a2);
    _mm512_storeu_ps(acc + i + 48, a3);
  }
  for (; i < d; i += 16) {
    __m512 a = _mm512_mul_ps(_mm512_loadu_ps(acc + i), al);
    for (int64_t j = 0; j < n; ++j) a = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), load16(values[j] + i), a);
    _mm512_storeu_ps(acc + i, a);
  }
}
#endif

// Addresses of the cache rows (K/V head 0) of keys [from, from + n): one division for the first key, then
// the block offset is stepped (an integer division per key cost as much as scoring it in bf16).
template <typename T>
inline void token_rows(const T* k, const T* v, const int32_t* table, int64_t block_size, int64_t kb, int64_t kt,
                       int64_t vb, int64_t vt, int64_t from, int64_t n, const T** krow, const T** vrow) {
  int64_t block = from / block_size, offset = from % block_size;
  for (int64_t j = 0; j < n; ++j) {
    krow[j] = k + table[block] * kb + offset * kt;
    vrow[j] = v + table[block] * vb + offset * vt;
    if (++offset == block_size) {
      offset = 0;
      ++block;
    }
  }
}

// Fetch `bytes` from each of `n` K and V rows, starting `koff` / `voff` elements in, into L1 ahead of use.
template <typename T>
inline void prefetch_rows(const T* const* krow, const T* const* vrow, int64_t koff, int64_t voff, int64_t n,
                          int64_t bytes) {
  for (int64_t j = 0; j < n; ++j) {
    const char* kr = reinterpret_cast<const char*>(krow[j] + koff);
    const char* vr = reinterpret_cast<const char*>(vrow[j] + voff);
    for (int64_t b = 0; b < bytes; b += 64) {
      // (asm: GCC drops a loop of nothing but __builtin_prefetch as free of side effects)
      asm volatile("prefetcht0 %0" : : "m"(*(kr + b)));
      asm volatile("prefetcht0 %0" : : "m"(*(vr + b)));
    }
  }
}

// Work items per thread below which a query tile's K/V heads are split across items.
constexpr int64_t kMinItemsPerThread = 4;

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

  // Query tiles: (sequence, first query) pairs, the costliest first so that the dynamic hand-out below
  // ends with small items (a long prompt chunk beside many decodes would otherwise finish last).
  std::vector<int64_t> tile_seq, tile_first, tile_cost;
  for (int64_t s = 0; s < num_seqs; ++s) {
    for (int64_t first = 0; first < qlens[s]; first += kQueryTile) {
      tile_seq.push_back(s);
      tile_first.push_back(first);
      tile_cost.push_back(std::min<int64_t>(kQueryTile, qlens[s] - first) * static_cast<int64_t>(kvlens[s]));
    }
  }
  const int64_t num_tiles = static_cast<int64_t>(tile_seq.size());
  std::vector<int64_t> order(num_tiles);
  for (int64_t t = 0; t < num_tiles; ++t) order[t] = t;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return tile_cost[a] > tile_cost[b]; });

  // A work item is one query tile and a run of its K/V heads: all of them where there are tiles enough
  // for every thread, because a token's rows of all heads lie side by side in a block (one stream of
  // reads, one address computation per key for every head); fewer (down to one) when there are not.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t splits = std::clamp<int64_t>(
      (kMinItemsPerThread * threads + std::max<int64_t>(num_tiles, 1) - 1) / std::max<int64_t>(num_tiles, 1), 1,
      std::max<int64_t>(num_kv_heads, 1));
  const int64_t heads_per_item = (num_kv_heads + splits - 1) / splits;
  const int64_t head_runs = (num_kv_heads + heads_per_item - 1) / heads_per_item;
  const int64_t num_items = num_tiles * head_runs;
  const float neg_inf = -std::numeric_limits<float>::infinity();

  // Fast path (AVX-512, fp32 or bf16, head_dim a multiple of 16): K/V read in place, 16 keys scored per
  // pass; bf16 keys use the native bf16 dot product where the CPU has one (head_dim a multiple of 32).
  constexpr bool kFastType = std::is_same<scalar_t, float>::value || std::is_same<scalar_t, c10::BFloat16>::value;
#ifdef APT_FAST
  const bool fast = kFastType && head_dim % 16 == 0;
#else
  const bool fast = false;
#endif
#ifdef APT_BF16_DOT
  const bool bf16_dot = std::is_same<scalar_t, c10::BFloat16>::value && head_dim % 32 == 0;
#endif
  // An item's heads are one run of bytes in a token's cache row when heads are contiguous (always, in our
  // cache layout): the fast path prefetches that run for the next key tile.
  const bool prefetch = fast && kh == head_dim && vh == head_dim;

  std::atomic<int64_t> next_item{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const scalar_t* krow[kKeyTile];
    const scalar_t* vrow[kKeyTile];
    const scalar_t* krow_next[kKeyTile];
    const scalar_t* vrow_next[kKeyTile];
    const scalar_t* kptr[kKeyTile];
    const scalar_t* vptr[kKeyTile];
    const int64_t rows_max = kQueryTile * group * heads_per_item;
    std::vector<float> qf(rows_max * head_dim), acc(rows_max * head_dim), m(rows_max), l(rows_max);
    std::vector<float> kf(kKeyTile * head_dim), vf(kKeyTile * head_dim), scores(kKeyTile);
    std::fill(kf.begin(), kf.end(), 0.f);  // keys past a tile's end score garbage-free zeros (masked anyway)
    for (;;) {
      const int64_t item = next_item.fetch_add(1, std::memory_order_relaxed);
      if (item >= num_items) break;
      const int64_t tile = order[item / head_runs];
      const int64_t h0 = (item % head_runs) * heads_per_item;
      const int64_t nh = std::min<int64_t>(heads_per_item, num_kv_heads - h0);
      const int64_t s = tile_seq[tile], first = tile_first[tile];
      const int64_t nq = std::min<int64_t>(kQueryTile, qlens[s] - first);
      const int64_t nkv = kvlens[s];
      const int64_t shift = causal ? nkv - qlens[s] : nkv;  // query i sees keys j <= i + shift (all if !causal)
      const int32_t* table = tables + s * table_stride;
      const int64_t rows = nq * group;  // per K/V head
      const int64_t fetch_bytes = nh * head_dim * static_cast<int64_t>(sizeof(scalar_t));
      for (int64_t hh = 0; hh < nh; ++hh) {
        const int64_t kvh = h0 + hh;
        for (int64_t i = 0; i < nq; ++i) {
          for (int64_t g = 0; g < group; ++g) {
            float* dst = qf.data() + (hh * rows + i * group + g) * head_dim;
            load_f32(qp + (starts[s] + first + i) * qs0 + (kvh * group + g) * qs1, dst, head_dim);
            for (int64_t x = 0; x < head_dim; ++x) dst[x] *= static_cast<float>(scale);
          }
        }
      }
      std::fill(acc.begin(), acc.begin() + nh * rows * head_dim, 0.f);
      std::fill(m.begin(), m.begin() + nh * rows, neg_inf);
      std::fill(l.begin(), l.begin() + nh * rows, 0.f);
      const int64_t key_end = std::min<int64_t>(nkv, causal ? first + nq - 1 + shift + 1 : nkv);
      if (key_end > 0) {
        token_rows(kp, vp, table, block_size, kb, kt, vb, vt, 0, std::min<int64_t>(kKeyTile, key_end), krow_next,
                   vrow_next);
        if (prefetch)
          prefetch_rows(krow_next, vrow_next, h0 * kh, h0 * vh, std::min<int64_t>(kKeyTile, key_end), fetch_bytes);
      }
      for (int64_t j0 = 0; j0 < key_end; j0 += kKeyTile) {
        const int64_t nk = std::min<int64_t>(kKeyTile, key_end - j0);
        // Keys past the tile's end point at its last key (finite scores, masked below).
        for (int64_t j = 0; j < kKeyTile; ++j) {
          krow[j] = krow_next[std::min<int64_t>(j, nk - 1)];
          vrow[j] = vrow_next[std::min<int64_t>(j, nk - 1)];
        }
        if (j0 + kKeyTile < key_end) {
          const int64_t n_next = std::min<int64_t>(kKeyTile, key_end - j0 - kKeyTile);
          token_rows(kp, vp, table, block_size, kb, kt, vb, vt, j0 + kKeyTile, n_next, krow_next, vrow_next);
          // Fetch the next tile's rows while this one is scored.
          if (prefetch) prefetch_rows(krow_next, vrow_next, h0 * kh, h0 * vh, n_next, fetch_bytes);
        }
        for (int64_t hh = 0; hh < nh; ++hh) {
          const int64_t kvh = h0 + hh;
          if (fast) {
            for (int64_t j = 0; j < kKeyTile; ++j) {
              kptr[j] = krow[j] + kvh * kh;
              vptr[j] = vrow[j] + kvh * vh;
            }
          } else {
            for (int64_t j = 0; j < nk; ++j) load_f32(krow[j] + kvh * kh, kf.data() + j * head_dim, head_dim);
            for (int64_t j = 0; j < nk; ++j) load_f32(vrow[j] + kvh * vh, vf.data() + j * head_dim, head_dim);
          }
          for (int64_t i = 0; i < nq; ++i) {
            const int64_t visible = causal ? std::min<int64_t>(nk, first + i + shift + 1 - j0) : nk;
            if (visible <= 0) continue;
            for (int64_t g = 0; g < group; ++g) {
              const int64_t r = hh * rows + i * group + g;
              if (fast) {
#ifdef APT_FAST
                if constexpr (kFastType) {
#ifdef APT_BF16_DOT
                  if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {
                    if (bf16_dot) {
                      const scalar_t* qrow = qp + (starts[s] + first + i) * qs0 + (kvh * group + g) * qs1;
                      for (int64_t c = 0; c < kKeyTile; c += 16)
                        scores16_bf16(qrow, kptr + c, head_dim, static_cast<float>(scale), scores.data() + c);
                    }
                  }
                  if (!bf16_dot)
#endif
                    for (int64_t c = 0; c < kKeyTile; c += 16)
                      scores16(qf.data() + r * head_dim, kptr + c, head_dim, scores.data() + c);
                }
#endif
              } else {
                key_scores(qf.data() + r * head_dim, kf.data(), visible, head_dim, scores.data());
              }
              for (int64_t j = visible; j < kKeyTile; ++j) scores[j] = neg_inf;
              Vec top_vec = Vec::loadu(scores.data());
              for (int64_t c = Vec::size(); c < kKeyTile; c += Vec::size())
                top_vec = at::vec::maximum(top_vec, Vec::loadu(scores.data() + c));
              const float top = at::vec::vec_reduce_all<float>(
                  [](Vec x, Vec y) { return at::vec::maximum(x, y); }, top_vec);
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
              if (fast) {
#ifdef APT_FAST
                if constexpr (kFastType)
                  accumulate_inplace(acc.data() + r * head_dim, alpha, scores.data(), vptr, visible, head_dim);
#endif
              } else {
                scale_accumulate(acc.data() + r * head_dim, alpha, scores.data(), vf.data(), visible, head_dim);
              }
            }
          }
        }
      }
      for (int64_t hh = 0; hh < nh; ++hh) {
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t token = starts[s] + first + i;
          for (int64_t g = 0; g < group; ++g) {
            const int64_t r = hh * rows + i * group + g, head = (h0 + hh) * group + g;
            const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
            out_t* dst = op + token * os0 + head * os1;
            const float* src = acc.data() + r * head_dim;
            for (int64_t x = 0; x < head_dim; ++x) dst[x] = static_cast<out_t>(src[x] * inv);
            if (lse != nullptr) lse[token * num_heads + head] = l[r] > 0.f ? m[r] + std::log(l[r]) : neg_inf;
          }
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
