// Shared by the CPU kernels: exp by Cephes' polynomial (scalar and AVX-512), and 16-lane loads/stores that widen
// bf16 to fp32 and round back to nearest even, as torch does.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace flotilla_cpu {

// e^x, |x| clamped to [-87, 88]: 2^k * e^r with |r| <= ln2/2 and a degree-6 polynomial for e^r (about 1 ulp).
// Arguments below -87 give ~1e-38 rather than 0.
inline float exp_poly(float v) {
  v = std::min(std::max(v, -87.f), 88.f);
  const float k = std::floor(v * 1.44269504088896341f + 0.5f);
  const float r = v - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#if defined(__AVX512F__)
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 k = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f),
                                                        _mm512_set1_ps(0.5f)), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(k, _mm512_set1_ps(2.12194440e-4f),
                                   _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, k);  // p * 2^k
}

// The first n (<= 16) elements as fp32; lanes past n are 0.
inline __m512 load16(const float* p, int64_t n = 16) {
  return n >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
}
inline __m512 load16(const c10::BFloat16* p, int64_t n = 16) {  // the 16 bits become the high half
  const __m256i raw = n >= 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                              : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1u), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// bf16 bits (in the low half of each lane) of x rounded to nearest even; NaN stays a quiet NaN.
inline __m512i bf16_bits(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

// x as a value of T would hold it (identity for float).
inline __m512 round16(__m512 x, float) { return x; }
inline __m512 round16(__m512 x, c10::BFloat16) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(x), 16));
}

inline void store16(float* p, __m512 x, int64_t n = 16) {
  if (n >= 16) _mm512_storeu_ps(p, x);
  else _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1u), x);
}
inline void store16(c10::BFloat16* p, __m512 x, int64_t n = 16) {
  const __m256i packed = _mm512_cvtepi32_epi16(bf16_bits(x));
  if (n >= 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
  else _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1u), packed);
}
#endif  // __AVX512F__

}  // namespace flotilla_cpu
