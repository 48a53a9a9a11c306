// softmux's CPU kernels for the decode step (built at start by server/engine/kernels.py).
//
// Why: at 32 rows a decode step of a 135M model spends ~20% outside matrix multiplies, in many
// tiny ops (each an OpenMP fork/join over a 32 x 576 tensor) and in gathering every row's keys and
// values out of the block pool before attention. These kernels do each of those in one pass:
//   decode_attention  writes the new keys/values into the pool and attends each row to its slots
//                     in place (no gather); float32 math for 16-bit dtypes, double for float64
//   rms_norm          optional residual add, then RMSNorm (llama-like and gemma)
//   rotary            rotary embedding of q and k together, in place
//   silu_mul          silu(gate) * up
// (the last three in float32, bfloat16 and float16, rounding where torch's separate ops round)
//   greedy            each row's argmax and whether it is finite, in one pass over the logits
//   panel_linear      x W^T + b over weights repacked in panels, for decode-sized inputs (panel_linear.cpp)
// Compiled with -ffp-contract=off so that a*b + c*d rounds as the separate torch ops do.

#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SOFTMUX_AVX2_EXP 1
#endif

namespace {

void check_cpu(const torch::Tensor& t, const char* name) {
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
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
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
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, h), _mm256_set1_epi32(127)), 23));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  y = _mm256_blendv_ps(y, _mm256_set1_ps(std::numeric_limits<float>::infinity()), _mm256_cmp_ps(x, big, _CMP_GT_OQ));
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
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
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

// Each of G score rows (stride Tpad): softmax over its first n values, in place.
template <typename acc_t>
void softmax_rows(acc_t* scores, int64_t G, int64_t Tpad, int64_t n) {
  for (int64_t g = 0; g < G; ++g) {
    acc_t* s = scores + g * Tpad;
    acc_t mx = -std::numeric_limits<acc_t>::infinity();
    for (int64_t t = 0; t < n; ++t) mx = std::max(mx, s[t]);
    exp_shifted(s, n, mx);
    acc_t sum = 0;
    for (int64_t t = 0; t < n; ++t) sum += s[t];
    for (int64_t t = 0; t < n; ++t) s[t] /= sum;
  }
}

// The attention of one (row, KV head) item, for any dtype and head size: q [G, D] in acc_t, the
// row's keys and values in the pool at row_slots[0..n); out [G, D].
template <typename scalar_t, typename acc_t>
void attend_item(const acc_t* qf, int64_t G, int64_t D, const scalar_t* keys, const scalar_t* values,
                 const int64_t* row_slots, int64_t n, acc_t scale, acc_t* scores, int64_t Tpad, acc_t* acc, scalar_t* out) {
  for (int64_t t = 0; t < n; ++t) {
    const scalar_t* kr = keys + row_slots[t] * D;
    for (int64_t g = 0; g < G; ++g) {
      const acc_t* qg = qf + g * D;
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qg[d] * static_cast<acc_t>(kr[d]);
      scores[g * Tpad + t] = dot * scale;
    }
  }
  softmax_rows(scores, G, Tpad, n);
  std::fill(acc, acc + G * D, acc_t(0));
  for (int64_t t = 0; t < n; ++t) {
    const scalar_t* vr = values + row_slots[t] * D;
    for (int64_t g = 0; g < G; ++g) {
      const acc_t p = scores[g * Tpad + t];
      acc_t* a = acc + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += p * static_cast<acc_t>(vr[d]);
    }
  }
  for (int64_t i = 0; i < G * D; ++i) out[i] = static_cast<scalar_t>(acc[i]);
}

#ifdef SOFTMUX_AVX2_EXP
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t D, int hint) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t byte = 0; byte < D * static_cast<int64_t>(sizeof(scalar_t)); byte += 64) {
    if (hint == _MM_HINT_T0) {
      _mm_prefetch(p + byte, _MM_HINT_T0);
    } else {
      _mm_prefetch(p + byte, _MM_HINT_T1);
    }
  }
}

// Lane j: the sum of a[j]'s 8 lanes, ((0+1)+(2+3))+((4+5)+(6+7)) for every j alike.
inline __m256 sum_lanes8(const __m256* a) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));  // [j lanes 0-3 | j lanes 4-7], j=0..3
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// scores[g * Tpad + j] = scale * q_g . rows[j] for 8 key rows and the G query heads: one FMA chain
// per key over d (8 independent chains), the 8 sums then in one vector. A key's score is the same
// arithmetic whichever of the 8 places it takes.
template <typename scalar_t>
void scores8(const float* qf, int64_t G, int64_t D, const scalar_t* const* rows, float scale, float* scores, int64_t Tpad) {
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = qf + g * D;
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(qg + d);
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, load8(rows[j] + d), acc[j]);
    }
    _mm256_storeu_ps(scores + g * Tpad, _mm256_mul_ps(sum_lanes8(acc), _mm256_set1_ps(scale)));
  }
}

// out[g * D + d] = sum over t < n, in order, of p[g * Tpad + t] * v_t[d]; W vectors (8 W lanes of d)
// accumulate in registers across all t.
template <int W, typename scalar_t>
void weighted_values(const float* p, int64_t G, int64_t Tpad, const scalar_t* values, const int64_t* row_slots, int64_t n,
                     int64_t D, scalar_t* out) {
  for (int64_t g = 0; g < G; ++g) {
    const float* pg = p + g * Tpad;
    for (int64_t d0 = 0; d0 < D; d0 += 8 * W) {
      __m256 acc[W];
      for (int k = 0; k < W; ++k) acc[k] = _mm256_setzero_ps();
      for (int64_t t = 0; t < n; ++t) {
        const __m256 pt = _mm256_set1_ps(pg[t]);
        const scalar_t* vr = values + row_slots[t] * D + d0;
        for (int k = 0; k < W; ++k) acc[k] = _mm256_fmadd_ps(pt, load8(vr + 8 * k), acc[k]);
      }
      for (int k = 0; k < W; ++k) store8(out + g * D + d0 + 8 * k, acc[k]);
    }
  }
}
#endif

// q [B, H, D] (row/head strides free), k_new/v_new [B, Hk, D] keys and values of the new tokens,
// kpool/vpool [Hk, S, D] one layer of the pool (contiguous), write [B] slot of each new token,
// slots [B, T] key slots of each row (its prefix, its own tokens, the new one; padding past
// lengths[b] is ignored), lengths [B]. Returns [B, H * D].
template <typename scalar_t>
void decode_attention_impl(const torch::Tensor& q, const torch::Tensor& k_new, const torch::Tensor& v_new,
                           torch::Tensor& kpool, torch::Tensor& vpool, const torch::Tensor& write,
                           const torch::Tensor& slots, const torch::Tensor& lengths, double scale, torch::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hk = k_new.size(1), S = kpool.size(1);
  const int64_t T = slots.size(1), G = H / Hk;
  const int64_t* wr = write.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  const int64_t* len = lengths.data_ptr<int64_t>();
  scalar_t* kp = kpool.data_ptr<scalar_t>();
  scalar_t* vp = vpool.data_ptr<scalar_t>();
  const scalar_t* qd = q.data_ptr<scalar_t>();
  const scalar_t* kn = k_new.data_ptr<scalar_t>();
  const scalar_t* vn = v_new.data_ptr<scalar_t>();
  scalar_t* od = out.data_ptr<scalar_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  const int64_t ks0 = k_new.stride(0), ks1 = k_new.stride(1), vs0 = v_new.stride(0), vs1 = v_new.stride(1);
  using acc_t = at::opmath_type<scalar_t>;  // float for 16-bit dtypes and float32, double for float64
  const acc_t ascale = static_cast<acc_t>(scale);

  // The new tokens' keys and values first: every row reads its own.
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(wr[b] >= 0 && wr[b] < S, "write slot out of range");
    TORCH_CHECK(len[b] >= 1 && len[b] <= T, "row length out of range");
    for (int64_t h = 0; h < Hk; ++h) {
      scalar_t* kd = kp + (h * S + wr[b]) * D;
      scalar_t* vd = vp + (h * S + wr[b]) * D;
      const scalar_t* ksrc = kn + b * ks0 + h * ks1;
      const scalar_t* vsrc = vn + b * vs0 + h * vs1;
      for (int64_t d = 0; d < D; ++d) {
        kd[d] = ksrc[d];
        vd[d] = vsrc[d];
      }
    }
  }

  // One work item per (row, KV head): its G query heads share the keys read.
  at::parallel_for(0, B * Hk, 1, [&](int64_t begin, int64_t end) {
    const int64_t Tpad = (T + 7) / 8 * 8;
    std::vector<acc_t> qf(G * D), acc(G * D), scores(G * Tpad);
    std::vector<scalar_t> zero_row(D, scalar_t(0));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hk, h = item % Hk, n = len[b];
      const int64_t* row_slots = sl + b * T;
      for (int64_t t = 0; t < n; ++t) TORCH_CHECK(row_slots[t] >= 0 && row_slots[t] < S, "key slot out of range");
      for (int64_t g = 0; g < G; ++g) {
        const scalar_t* qsrc = qd + b * qs0 + (h * G + g) * qs1;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<acc_t>(qsrc[d]);
      }
      const scalar_t* keys = kp + h * S * D;
      const scalar_t* values = vp + h * S * D;
      scalar_t* o = od + b * H * D + h * G * D;
      bool done = false;
#ifdef SOFTMUX_AVX2_EXP
      if constexpr (std::is_same<scalar_t, float>::value || std::is_same<scalar_t, c10::BFloat16>::value) {
        if (D % 8 == 0) {
          // Blocks sit at random places in the pool, past the hardware prefetcher's reach: keys are asked
          // for two groups of 8 ahead, and each group's values as its keys are read (used after the
          // softmax). Over a 30-layer pool at 32 rows, float32, attend_item's loops -> these: 640 keys 92 ->
          // 66 ms a step (75 without the prefetches), 64 keys 13.8 -> 8.5 ms (9.5).
          for (int64_t t = 0; t < std::min<int64_t>(16, n); ++t) prefetch_row(keys + row_slots[t] * D, D, _MM_HINT_T0);
          for (int64_t t0 = 0; t0 < n; t0 += 8) {
            for (int64_t t = t0 + 16; t < std::min(t0 + 24, n); ++t) prefetch_row(keys + row_slots[t] * D, D, _MM_HINT_T0);
            for (int64_t t = t0; t < std::min(t0 + 8, n); ++t) prefetch_row(values + row_slots[t] * D, D, _MM_HINT_T1);
            const scalar_t* rows[8];
            for (int64_t j = 0; j < 8; ++j) rows[j] = t0 + j < n ? keys + row_slots[t0 + j] * D : zero_row.data();
            scores8(qf.data(), G, D, rows, static_cast<float>(ascale), scores.data() + t0, Tpad);
          }
          softmax_rows(scores.data(), G, Tpad, n);
          if (D % 32 == 0) {
            weighted_values<4>(scores.data(), G, Tpad, values, row_slots, n, D, o);
          } else {
            weighted_values<1>(scores.data(), G, Tpad, values, row_slots, n, D, o);
          }
          done = true;
        }
      }
#endif
      if (!done) attend_item(qf.data(), G, D, keys, values, row_slots, n, ascale, scores.data(), Tpad, acc.data(), o);
    }
  });
}

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k_new, const torch::Tensor& v_new,
                               torch::Tensor kpool, torch::Tensor vpool, const torch::Tensor& write,
                               const torch::Tensor& slots, const torch::Tensor& lengths, double scale) {
  for (auto* t : {&q, &k_new, &v_new}) check_cpu(*t, "q/k/v");
  TORCH_CHECK(kpool.is_contiguous() && vpool.is_contiguous(), "the pool must be contiguous");
  TORCH_CHECK(q.scalar_type() == kpool.scalar_type() && k_new.scalar_type() == kpool.scalar_type() &&
                  v_new.scalar_type() == kpool.scalar_type(),
              "q, k, v and the pool must share a dtype");
  TORCH_CHECK(q.size(1) % k_new.size(1) == 0, "query heads must be a multiple of key/value heads");
  TORCH_CHECK(write.scalar_type() == torch::kInt64 && slots.scalar_type() == torch::kInt64 &&
                  lengths.scalar_type() == torch::kInt64 && slots.is_contiguous() && write.is_contiguous() &&
                  lengths.is_contiguous(),
              "write, slots and lengths must be contiguous int64");
  auto out = torch::empty({q.size(0), q.size(1) * q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    decode_attention_impl<scalar_t>(q, k_new, v_new, kpool, vpool, write, slots, lengths, scale, out);
  });
  return out;
}

// float32, or the value rounded to scalar_t and back: each torch op on a 16-bit tensor rounds its
// result once, and the kernels below round where those ops do (for float32 a no-op).
template <typename scalar_t>
inline float rnd(float v) {
  return static_cast<float>(static_cast<scalar_t>(v));
}

bool elementwise_dtype(const torch::Tensor& t) {
  const auto dt = t.scalar_type();
  return dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kHalf;
}

#define SOFTMUX_DISPATCH(dtype, NAME, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, NAME, __VA_ARGS__)


template <typename scalar_t>
void rms_norm_impl(scalar_t* hd, const scalar_t* rd, const scalar_t* wd, scalar_t* od, int64_t N, int64_t C, float eps,
                   bool gemma) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> x(C);
    for (int64_t n = begin; n < end; ++n) {
      scalar_t* hrow = hd + n * C;
      if (rd != nullptr) {
        const scalar_t* r = rd + n * C;
        for (int64_t c = 0; c < C; ++c) hrow[c] = static_cast<scalar_t>(static_cast<float>(hrow[c]) + static_cast<float>(r[c]));
      }
      for (int64_t c = 0; c < C; ++c) x[c] = static_cast<float>(hrow[c]);
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < C; ++c) ss += x[c] * x[c];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(C) + eps);
      scalar_t* o = od + n * C;
      if (gemma) {  // (1 + w) * normed, in float32, rounded once
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>((1.f + static_cast<float>(wd[c])) * (x[c] * inv));
      } else {  // w * normed.to(dtype): the normed value is rounded first
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(static_cast<float>(wd[c]) * rnd<scalar_t>(x[c] * inv));
      }
    }
  });
}

// h [N, C] contiguous, float32/bfloat16/float16; residual (optional, [N, C], h's dtype) is added into h
// first (h += residual), then RMSNorm as LlamaRMSNorm (offset 0: w * normed.to(dtype)) and GemmaRMSNorm
// (offset 1: (1 + w) * normed, in float32) compute it: statistics in float32, roundings where they round.
torch::Tensor rms_norm(torch::Tensor h, const c10::optional<torch::Tensor>& residual, const torch::Tensor& w, double eps,
                       double offset) {
  TORCH_CHECK(elementwise_dtype(h) && h.is_contiguous() && h.dim() == 2, "h must be contiguous float32/bfloat16/float16 [N, C]");
  TORCH_CHECK(w.scalar_type() == h.scalar_type() && w.is_contiguous() && w.numel() == h.size(1), "w must be [C] in h's dtype");
  TORCH_CHECK(offset == 0.0 || offset == 1.0, "offset must be 0 (llama-like) or 1 (gemma)");
  if (residual.has_value())
    TORCH_CHECK(residual->scalar_type() == h.scalar_type() && residual->is_contiguous() && residual->sizes() == h.sizes(),
                "residual must be contiguous like h");
  auto out = torch::empty_like(h);
  SOFTMUX_DISPATCH(h.scalar_type(), "rms_norm", [&] {
    rms_norm_impl<scalar_t>(h.data_ptr<scalar_t>(), residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr,
                            w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), h.size(0), h.size(1), static_cast<float>(eps),
                            offset == 1.0);
  });
  return out;
}

template <typename scalar_t>
void rotary_impl(scalar_t* xd, const scalar_t* cd, const scalar_t* sd, int64_t N, int64_t Hx, int64_t D, int64_t s0, int64_t s1) {
  const int64_t half = D / 2;
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* c = cd + n * D;
      const scalar_t* s = sd + n * D;
      for (int64_t h = 0; h < Hx; ++h) {
        scalar_t* v = xd + n * s0 + h * s1;
        int64_t i = 0;
#ifdef SOFTMUX_AVX2_EXP
        if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {  // the compiler leaves bfloat16 scalar: ~10x
          const __m256 sign = _mm256_set1_ps(-0.f);
          for (; i + 8 <= half; i += 8) {
            const __m256 x1 = load8(v + i), x2 = load8(v + i + half);
            const __m256 p1 = _mm256_add_ps(round8(_mm256_mul_ps(x1, load8(c + i)), v),
                                            round8(_mm256_mul_ps(_mm256_xor_ps(x2, sign), load8(s + i)), v));
            const __m256 p2 = _mm256_add_ps(round8(_mm256_mul_ps(x2, load8(c + i + half)), v),
                                            round8(_mm256_mul_ps(x1, load8(s + i + half)), v));
            store8(v + i, p1);
            store8(v + i + half, p2);
          }
        }
#endif
#pragma omp simd
        for (int64_t j = i; j < half; ++j) {
          const float x1 = static_cast<float>(v[j]), x2 = static_cast<float>(v[j + half]);
          const float c1 = static_cast<float>(c[j]), c2 = static_cast<float>(c[j + half]);
          const float sn1 = static_cast<float>(s[j]), sn2 = static_cast<float>(s[j + half]);
          v[j] = static_cast<scalar_t>(rnd<scalar_t>(x1 * c1) + rnd<scalar_t>((-x2) * sn1));
          v[j + half] = static_cast<scalar_t>(rnd<scalar_t>(x2 * c2) + rnd<scalar_t>(x1 * sn2));
        }
      }
    }
  });
}

// x [N, Hx, D] (q and k heads side by side; strides free but the last), rotated in place by cos/sin
// [N, D] of x's dtype: x * cos + rotate_half(x) * sin, each product and the sum rounded as torch's ops do.
void rotary(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(elementwise_dtype(x) && x.dim() == 3 && x.stride(2) == 1, "x must be float32/bfloat16/float16 [N, Hx, D]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type() && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.size(0) == x.size(0) && cos.size(1) == x.size(2) && sin.sizes() == cos.sizes(),
              "cos and sin must be contiguous [N, D] in x's dtype");
  SOFTMUX_DISPATCH(x.scalar_type(), "rotary", [&] {
    rotary_impl<scalar_t>(x.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(), x.size(0), x.size(1),
                          x.size(2), x.stride(0), x.stride(1));
  });
}



template <typename scalar_t>
void silu_mul_range(const scalar_t* g, const scalar_t* u, scalar_t* o, int64_t i, int64_t end) {
  float xs[8], ss[8];
#ifdef SOFTMUX_AVX2_EXP
  if constexpr (std::is_same<scalar_t, float>::value || std::is_same<scalar_t, c10::BFloat16>::value) {
    for (; i + 8 <= end; i += 8) {  // whole groups in registers: ~3x the copying loop below
      const __m256 x = load8(g + i);
      const __m256 s = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
      store8(o + i, _mm256_mul_ps(round8(s, o), load8(u + i)));
    }
  }
#endif
  for (; i < end; i += 8) {  // float16, and the last partial group (padded)
    const int64_t n = std::min<int64_t>(8, end - i);
    for (int64_t j = 0; j < 8; ++j) xs[j] = j < n ? static_cast<float>(g[i + j]) : 0.f;
    silu8(xs, ss);
    for (int64_t j = 0; j < n; ++j) o[i + j] = static_cast<scalar_t>(rnd<scalar_t>(ss[j]) * static_cast<float>(u[i + j]));
  }
}

// silu(gate) * up, [N, I] each, float32/bfloat16/float16 (silu rounded to the dtype before the product, as torch's two ops).
// Every value goes through the same 8-lane silu (a partial last group is padded), so a value's
// result does not depend on where it sits: the batch does not change it.
torch::Tensor silu_mul(const torch::Tensor& gate, const torch::Tensor& up) {
  TORCH_CHECK(elementwise_dtype(gate) && up.scalar_type() == gate.scalar_type() && gate.is_contiguous() && up.is_contiguous() &&
                  gate.sizes() == up.sizes(),
              "gate and up must be contiguous, of one shape and one dtype (float32/bfloat16/float16)");
  auto out = torch::empty_like(gate);
  SOFTMUX_DISPATCH(gate.scalar_type(), "silu_mul", [&] {
    const scalar_t* g = gate.data_ptr<scalar_t>();
    const scalar_t* u = up.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, gate.numel(), 4096, [&](int64_t begin, int64_t end) { silu_mul_range<scalar_t>(g, u, o, begin, end); });
  });
  return out;
}

// One row's greedy pick: the first index of its largest value (torch.argmax's answer) and whether
// every value is finite. 8 lanes keep their own best value and index (strictly greater wins, so each
// keeps its earliest); the lanes are merged at the end, the lowest index among equal bests.
template <typename scalar_t>
void greedy_row(const scalar_t* row, int64_t V, int64_t* token, bool* finite) {
  int64_t i = 0, best_i = 0;
  float best = -std::numeric_limits<float>::infinity();
  bool ok = true;
#ifdef SOFTMUX_AVX2_EXP
  if (V >= 8) {
    float buf[8];
    __m256 vbest = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), bad = _mm256_setzero_ps();
    __m256i vidx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), vbest_i = vidx;
    const __m256i eight = _mm256_set1_epi32(8);
    for (; i + 8 <= V; i += 8) {
      __m256 x;
      if constexpr (std::is_same<scalar_t, float>::value) {
        x = _mm256_loadu_ps(row + i);
      } else {
        for (int j = 0; j < 8; ++j) buf[j] = static_cast<float>(row[i + j]);
        x = _mm256_loadu_ps(buf);
      }
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(x, x), _mm256_setzero_ps(), _CMP_NEQ_UQ));  // inf - inf, NaN
      const __m256 gt = _mm256_cmp_ps(x, vbest, _CMP_GT_OQ);
      vbest = _mm256_blendv_ps(vbest, x, gt);
      vbest_i = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(vbest_i), _mm256_castsi256_ps(vidx), gt));
      vidx = _mm256_add_epi32(vidx, eight);
    }
    alignas(32) float lane_best[8];
    alignas(32) int32_t lane_i[8];
    _mm256_store_ps(lane_best, vbest);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lane_i), vbest_i);
    best_i = lane_i[0];
    best = lane_best[0];
    for (int j = 1; j < 8; ++j)
      if (lane_best[j] > best || (lane_best[j] == best && lane_i[j] < best_i)) best = lane_best[j], best_i = lane_i[j];
    ok = _mm256_movemask_ps(bad) == 0;
  }
#endif
  for (; i < V; ++i) {
    const float x = static_cast<float>(row[i]);
    ok = ok && std::isfinite(x);
    if (x > best) best = x, best_i = i;
  }
  *token = best_i;
  *finite = ok;
}

// logits [B, V] contiguous, float32/bfloat16/float16 -> (tokens [B] int64: each row's torch.argmax,
// finite [B] bool: the row holds no NaN or infinity). One pass over the logits, rows split between threads.
std::tuple<torch::Tensor, torch::Tensor> greedy(const torch::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.is_contiguous() && elementwise_dtype(logits),
              "logits must be a contiguous [B, V] CPU tensor, float32/bfloat16/float16");
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0 && V < (int64_t(1) << 31), "vocabulary size out of range");
  auto tokens = torch::empty({B}, logits.options().dtype(torch::kInt64));
  auto finite = torch::empty({B}, logits.options().dtype(torch::kBool));
  int64_t* td = tokens.data_ptr<int64_t>();
  bool* fd = finite.data_ptr<bool>();
  SOFTMUX_DISPATCH(logits.scalar_type(), "greedy", [&] {
    const scalar_t* ld = logits.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) greedy_row(ld + b * V, V, td + b, fd + b);
    });
  });
  return {tokens, finite};
}

}  // namespace

namespace softmux {  // panel_linear.cpp
bool panel_linear_vectorized();
torch::Tensor pack_panels(const torch::Tensor& weight);
torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& panels, int64_t n, const c10::optional<torch::Tensor>& bias);
}  // namespace softmux

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "write new keys/values into the pool and attend each row to its slots");
  m.def("rms_norm", &rms_norm, "optional residual add, then RMSNorm");
  m.def("rotary", &rotary, "rotary embedding in place");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("greedy", &greedy, "each row's argmax and whether the row is finite");
  m.def("pack_panels", &softmux::pack_panels, "a weight in panels of 16 output columns, for panel_linear");
  m.def("panel_linear", &softmux::panel_linear, "x W^T + b over panel-packed weights, float32 accumulation");
  m.def("panel_linear_vectorized", &softmux::panel_linear_vectorized, "whether panel_linear is vectorised here");
}
