// Helpers shared by the kernels in csrc/ (included by them; hybrid_cache/kernels.py hashes headers too,
// so an edit here rebuilds the library).
#pragma once

#if defined(__AVX512F__)
#include <c10/util/BFloat16.h>
#include <immintrin.h>

namespace aptserve {

// 16 bf16 values widened to fp32: a bf16 is the high half of a float, so a zero-extend and a shift.
inline __m512 bf16x16_to_f32(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

}  // namespace aptserve
#endif
