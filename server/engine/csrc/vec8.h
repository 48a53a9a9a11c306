// 8-lane (AVX2) helpers shared by softmux's CPU kernels: exp, silu, float32/bfloat16 loads and
// rounding stores, the scalar rounding rule, and the CPU-tensor check. Every value goes through the
// same lanes wherever it sits, so no result depends on its neighbours.
#pragma once

#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SOFTMUX_AVX2_EXP 1
#endif

namespace softmux {

inline void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.stride(-1) == 1, name, " must have a contiguous last dimension");
}

#ifdef SOFTMUX_AVX2_EXP
// exp of 8 float32 lanes within ~1-2 ulp (torch's own vectorised exp is also a polynomial, not
// glibc's): exp(x) = 2^n exp(r), x = n ln2 + r, |r| <= ln2 / 2, exp(r) a degree-7 polynomial (the
// Cephes coefficients), 2^n put in the exponent bits; saturating to inf above 88.72 and to 0 below -87.3.
inline __m256 exp8(__m256 x) {
  const __m256 big = _mm256_set1_ps(88.72283935546875f), small = _mm256_set1_ps(-87.33654022216797f);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, small), big);
  const __m256 n =
      _mm256_floor_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  // 2^n for n in [-126, 128]: split as 2^(n - h) * 2^h so that neither factor leaves the normal range
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i h = _mm256_srai_epi32(ni, 1);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, _mm256_set1_epi32(127)), 23));
  const __m256 s2 = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, h), _mm256_set1_epi32(127)), 23));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  y = _mm256_blendv_ps(y, _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                       _mm256_cmp_ps(x, big, _CMP_GT_OQ));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, small, _CMP_LT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));  // NaN stays NaN
}

// 8 lanes of float32 or bfloat16 (widened exactly); stores round to bfloat16 as c10 does (to nearest
// even, NaN -> 0x7FC0), so the vector and scalar paths give the same bits.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// x rounded to bfloat16, as float32 bits (the low 16 bits zero)
inline __m256i bf16_bits(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))),
                                     _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), _mm256_castps_si256(nan));
}
inline __m256 round8(__m256 x, float*) { return x; }
inline __m256 round8(__m256 x, c10::BFloat16*) { return _mm256_castsi256_ps(bf16_bits(x)); }
inline void store8(float* p, __m256 x) { _mm256_storeu_ps(p, x); }
inline void store8(c10::BFloat16* p, __m256 x) {
  const __m256i b = _mm256_srli_epi32(bf16_bits(x), 16);  // each lane's 16 bits, low
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}

// silu(x) = x / (1 + exp(-x)) of 8 values, the formula torch uses.
inline void silu8(const float* in, float* out) {
  const __m256 x = _mm256_loadu_ps(in);
  const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
  _mm256_storeu_ps(out, _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e)));
}
#else
inline void silu8(const float* in, float* out) {
  for (int j = 0; j < 8; ++j) out[j] = in[j] / (1.f + std::exp(-in[j]));
}
#endif

// s[t] = exp(s[t] - shift) for t < n, 8 lanes at a time (a partial last group padded), so that a
// value's result does not depend on its position; float64 (and non-AVX2 builds) use std::exp.
inline void exp_shifted(float* s, int64_t n, float shift) {
#ifdef SOFTMUX_AVX2_EXP
  const __m256 m = _mm256_set1_ps(shift);
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) _mm256_storeu_ps(s + t, exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), m)));
  if (t < n) {
    float buf[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t j = t; j < n; ++j) buf[j - t] = s[j];
    _mm256_storeu_ps(buf, exp8(_mm256_sub_ps(_mm256_loadu_ps(buf), m)));
    for (int64_t j = t; j < n; ++j) s[j] = buf[j - t];
  }
#else
  for (int64_t t = 0; t < n; ++t) s[t] = std::exp(s[t] - shift);
#endif
}
inline void exp_shifted(double* s, int64_t n, double shift) {
  for (int64_t t = 0; t < n; ++t) s[t] = std::exp(s[t] - shift);
}

// float32, or the value rounded to scalar_t and back: each torch op on a 16-bit tensor rounds its
// result once, and the kernels below round where those ops do (for float32 a no-op).
template <typename scalar_t>
inline float rnd(float v) {
  return static_cast<float>(static_cast<scalar_t>(v));
}

}  // namespace softmux
