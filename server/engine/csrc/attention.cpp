// decode_attention: writes the new tokens' keys and values into the block pool and attends each
// query row to its slots where they lie (no gather, no padding); see docs/architecture.md, Attention.

#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "vec8.h"

namespace softmux {
namespace {

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
// Every cache line of one key or value row; Hint (_MM_HINT_T0: L1, _MM_HINT_T1: L2) must be a constant.
template <int Hint, typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t byte = 0; byte < D * static_cast<int64_t>(sizeof(scalar_t)); byte += 64)
    _mm_prefetch(p + byte, static_cast<decltype(_MM_HINT_T0)>(Hint));
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
          for (int64_t t = 0; t < std::min<int64_t>(16, n); ++t) prefetch_row<_MM_HINT_T0>(keys + row_slots[t] * D, D);
          for (int64_t t0 = 0; t0 < n; t0 += 8) {
            for (int64_t t = t0 + 16; t < std::min(t0 + 24, n); ++t) prefetch_row<_MM_HINT_T0>(keys + row_slots[t] * D, D);
            for (int64_t t = t0; t < std::min(t0 + 8, n); ++t) prefetch_row<_MM_HINT_T1>(values + row_slots[t] * D, D);
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

}  // namespace

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

}  // namespace softmux
