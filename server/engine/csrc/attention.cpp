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
                 const int64_t* row_slots, int64_t n, acc_t scale, acc_t* scores, int64_t Tpad, acc_t* acc,
                 scalar_t* out) {
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
  // s0123: [j lanes 0-3 | j lanes 4-7], j=0..3
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                       _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// scores[g * Tpad + j] = scale * q_g . rows[j] for 8 key rows and the G query heads: one FMA chain
// per key over d (8 independent chains), the 8 sums then in one vector. A key's score is the same
// arithmetic whichever of the 8 places it takes.
template <typename scalar_t>
void scores8(const float* qf, int64_t G, int64_t D, const scalar_t* const* rows, float scale, float* scores,
             int64_t Tpad) {
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

// The next work item's keys and values (its first kAheadKeys), asked for into L2 while this item
// computes its weighted values from cache: memory then works while the core does.
constexpr int64_t kAheadKeys = 1024;
template <typename scalar_t>
struct Ahead {
  const scalar_t* keys = nullptr;
  const scalar_t* values = nullptr;
  const int64_t* slots = nullptr;
  int64_t n = 0;  // rows to ask for
  int64_t S = 0;  // slots in the pool (a slot outside is not asked for: it is refused when its item runs)
};

// out[g * D + d] = sum over t < n, in order, of p[g * Tpad + t] * v_t[d], for GB query heads at once:
// GB x W vectors (8 W lanes of d) accumulate in registers across all t, so each line of a value row
// is read once per group of heads. While the first lanes are summed, `ahead`'s rows are asked for.
template <int GB, int W, typename scalar_t>
void weighted_values_heads(const float* p, int64_t Tpad, const scalar_t* values, const int64_t* row_slots,
                           int64_t n, int64_t D, scalar_t* out, const Ahead<scalar_t>& ahead) {
  for (int64_t d0 = 0; d0 < D; d0 += 8 * W) {
    __m256 acc[GB][W];
    for (int g = 0; g < GB; ++g)
      for (int k = 0; k < W; ++k) acc[g][k] = _mm256_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      if (d0 == 0 && t < ahead.n && ahead.slots[t] >= 0 && ahead.slots[t] < ahead.S) {
        prefetch_row<_MM_HINT_T1>(ahead.keys + ahead.slots[t] * D, D);
        prefetch_row<_MM_HINT_T1>(ahead.values + ahead.slots[t] * D, D);
      }
      const scalar_t* vr = values + row_slots[t] * D + d0;
      __m256 v[W];
      for (int k = 0; k < W; ++k) v[k] = load8(vr + 8 * k);
      for (int g = 0; g < GB; ++g) {
        const __m256 pt = _mm256_set1_ps(p[g * Tpad + t]);
        for (int k = 0; k < W; ++k) acc[g][k] = _mm256_fmadd_ps(pt, v[k], acc[g][k]);
      }
    }
    for (int g = 0; g < GB; ++g)
      for (int k = 0; k < W; ++k) store8(out + g * D + d0 + 8 * k, acc[g][k]);
  }
}

// weighted_values_heads over all G heads, in groups that keep GB x W <= 12 accumulators in registers.
template <int W, typename scalar_t>
void weighted_values(const float* p, int64_t G, int64_t Tpad, const scalar_t* values,
                     const int64_t* row_slots, int64_t n, int64_t D, scalar_t* out,
                     const Ahead<scalar_t>& ahead) {
  constexpr int kHeads = std::min(4, 12 / W);
  for (int64_t g0 = 0; g0 < G; g0 += kHeads) {
    const float* pg = p + g0 * Tpad;
    scalar_t* o = out + g0 * D;
    const Ahead<scalar_t> a = g0 == 0 ? ahead : Ahead<scalar_t>();
    switch (std::min<int64_t>(kHeads, G - g0)) {
      case 1: weighted_values_heads<1, W>(pg, Tpad, values, row_slots, n, D, o, a); break;
      case 2: weighted_values_heads<2, W>(pg, Tpad, values, row_slots, n, D, o, a); break;
      case 3: weighted_values_heads<3, W>(pg, Tpad, values, row_slots, n, D, o, a); break;
      default:
        if constexpr (kHeads >= 4) weighted_values_heads<4, W>(pg, Tpad, values, row_slots, n, D, o, a);
    }
  }
}

// The largest of s[0..n): 8 lanes at a time, then across lanes (max is exact in any order, and a NaN
// is passed over as std::max(mx, s[t]) passes it over).
inline float max_row(const float* s, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) m = _mm256_max_ps(_mm256_loadu_ps(s + t), m);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float mx = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < 8; ++j) mx = std::max(mx, lanes[j]);
  for (; t < n; ++t) mx = std::max(mx, s[t]);
  return mx;
}

// sums[g] = s[g * Tpad] + ... + s[g * Tpad + n - 1], added in order of t, for GB rows whose chains
// interleave (one chain's add latency hides behind the others').
template <int GB>
void sum_rows(const float* s, int64_t Tpad, int64_t n, float* sums) {
  float acc[GB];
  for (int g = 0; g < GB; ++g) acc[g] = 0.f;
  for (int64_t t = 0; t < n; ++t)
    for (int g = 0; g < GB; ++g) acc[g] += s[g * Tpad + t];
  for (int g = 0; g < GB; ++g) sums[g] = acc[g];
}

// softmax_rows' results, bit for bit, faster: the max vectorised, the sums of up to 4 heads interleaved.
void softmax_heads(float* scores, int64_t G, int64_t Tpad, int64_t n, float* sums) {
  for (int64_t g = 0; g < G; ++g) exp_shifted(scores + g * Tpad, n, max_row(scores + g * Tpad, n));
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    switch (std::min<int64_t>(4, G - g0)) {
      case 1: sum_rows<1>(scores + g0 * Tpad, Tpad, n, sums + g0); break;
      case 2: sum_rows<2>(scores + g0 * Tpad, Tpad, n, sums + g0); break;
      case 3: sum_rows<3>(scores + g0 * Tpad, Tpad, n, sums + g0); break;
      default: sum_rows<4>(scores + g0 * Tpad, Tpad, n, sums + g0);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * Tpad;
    const float sum = sums[g];
    for (int64_t t = 0; t < n; ++t) s[t] /= sum;
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
                           const torch::Tensor& slots, const torch::Tensor& lengths, double scale,
                           torch::Tensor& out) {
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
    std::vector<float> sums(G);
    std::vector<scalar_t> zero_row(D, scalar_t(0));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hk, h = item % Hk, n = len[b];
      const int64_t* row_slots = sl + b * T;
      for (int64_t t = 0; t < n; ++t)
        TORCH_CHECK(row_slots[t] >= 0 && row_slots[t] < S, "key slot out of range");
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
          // softmax). The softmax's max is vectorised and its sums interleaved across heads, each value
          // line read once per group of heads, and the next item asked for while this one sums its
          // values (`Ahead`); outputs bit for bit those of the plain loop (the step times each change
          // bought: docs/architecture.md, "Attention").
          for (int64_t t = 0; t < std::min<int64_t>(16, n); ++t)
            prefetch_row<_MM_HINT_T0>(keys + row_slots[t] * D, D);
          for (int64_t t0 = 0; t0 < n; t0 += 8) {
            for (int64_t t = t0 + 16; t < std::min(t0 + 24, n); ++t)
              prefetch_row<_MM_HINT_T0>(keys + row_slots[t] * D, D);
            for (int64_t t = t0; t < std::min(t0 + 8, n); ++t)
              prefetch_row<_MM_HINT_T1>(values + row_slots[t] * D, D);
            const scalar_t* rows[8];
            for (int64_t j = 0; j < 8; ++j)
              rows[j] = t0 + j < n ? keys + row_slots[t0 + j] * D : zero_row.data();
            scores8(qf.data(), G, D, rows, static_cast<float>(ascale), scores.data() + t0, Tpad);
          }
          softmax_heads(scores.data(), G, Tpad, n, sums.data());
          Ahead<scalar_t> ahead;
          if (item + 1 < end) {
            const int64_t nb = (item + 1) / Hk, nh = (item + 1) % Hk;
            ahead = {kp + nh * S * D, vp + nh * S * D, sl + nb * T, std::min(len[nb], kAheadKeys), S};
          }
          if (D % 32 == 0) {
            weighted_values<4>(scores.data(), G, Tpad, values, row_slots, n, D, o, ahead);
          } else {
            weighted_values<1>(scores.data(), G, Tpad, values, row_slots, n, D, o, ahead);
          }
          done = true;
        }
      }
#endif
      if (!done)
        attend_item(qf.data(), G, D, keys, values, row_slots, n, ascale, scores.data(), Tpad, acc.data(), o);
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
