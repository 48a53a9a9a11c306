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
//   DecoderStack      every layer of a llama-like decoder for one pass, calling the above (layers.cpp)
// decode_attention lives in attention.cpp, the 8-lane helpers they share in vec8.h, the entry points in
// ops.h.
// Compiled with -ffp-contract=off so that a*b + c*d rounds as the separate torch ops do.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "vec8.h"

namespace softmux {
namespace {

bool elementwise_dtype(const torch::Tensor& t) {
  const auto dt = t.scalar_type();
  return dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kHalf;
}

}  // namespace

#define SOFTMUX_DISPATCH(dtype, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, NAME, __VA_ARGS__)

template <typename scalar_t>
void rms_norm_impl(scalar_t* hd, const scalar_t* rd, const scalar_t* wd, scalar_t* od, int64_t N, int64_t C,
                   float eps, bool gemma) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> x(C);
    for (int64_t n = begin; n < end; ++n) {
      scalar_t* hrow = hd + n * C;
      if (rd != nullptr) {
        const scalar_t* r = rd + n * C;
        for (int64_t c = 0; c < C; ++c)
          hrow[c] = static_cast<scalar_t>(static_cast<float>(hrow[c]) + static_cast<float>(r[c]));
      }
      for (int64_t c = 0; c < C; ++c) x[c] = static_cast<float>(hrow[c]);
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < C; ++c) ss += x[c] * x[c];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(C) + eps);
      scalar_t* o = od + n * C;
      if (gemma) {  // (1 + w) * normed, in float32, rounded once
        for (int64_t c = 0; c < C; ++c)
          o[c] = static_cast<scalar_t>((1.f + static_cast<float>(wd[c])) * (x[c] * inv));
      } else {  // w * normed.to(dtype): the normed value is rounded first
        for (int64_t c = 0; c < C; ++c)
          o[c] = static_cast<scalar_t>(static_cast<float>(wd[c]) * rnd<scalar_t>(x[c] * inv));
      }
    }
  });
}

// h [N, C] contiguous, float32/bfloat16/float16; residual (optional, [N, C], h's dtype) is added into h
// first (h += residual), then RMSNorm as LlamaRMSNorm (offset 0: w * normed.to(dtype)) and GemmaRMSNorm
// (offset 1: (1 + w) * normed, in float32) compute it: statistics in float32, roundings where they round.
torch::Tensor rms_norm(torch::Tensor h, const c10::optional<torch::Tensor>& residual, const torch::Tensor& w,
                       double eps, double offset) {
  TORCH_CHECK(elementwise_dtype(h) && h.is_contiguous() && h.dim() == 2,
              "h must be contiguous float32/bfloat16/float16 [N, C]");
  TORCH_CHECK(w.scalar_type() == h.scalar_type() && w.is_contiguous() && w.numel() == h.size(1),
              "w must be [C] in h's dtype");
  TORCH_CHECK(offset == 0.0 || offset == 1.0, "offset must be 0 (llama-like) or 1 (gemma)");
  if (residual.has_value())
    TORCH_CHECK(residual->scalar_type() == h.scalar_type() && residual->is_contiguous() &&
                    residual->sizes() == h.sizes(),
                "residual must be contiguous like h");
  auto out = torch::empty_like(h);
  SOFTMUX_DISPATCH(h.scalar_type(), "rms_norm", [&] {
    rms_norm_impl<scalar_t>(h.data_ptr<scalar_t>(),
                            residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr,
                            w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), h.size(0), h.size(1),
                            static_cast<float>(eps), offset == 1.0);
  });
  return out;
}

template <typename scalar_t>
void rotary_impl(scalar_t* xd, const scalar_t* cd, const scalar_t* sd, int64_t N, int64_t Hx, int64_t D,
                 int64_t s0, int64_t s1) {
  const int64_t half = D / 2;
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* c = cd + n * D;
      const scalar_t* s = sd + n * D;
      for (int64_t h = 0; h < Hx; ++h) {
        scalar_t* v = xd + n * s0 + h * s1;
        int64_t i = 0;
#ifdef SOFTMUX_AVX2_EXP
        // the compiler leaves bfloat16 scalar: explicit 8-lane code (docs/architecture.md, the CPU fast path)
        if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {
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
  TORCH_CHECK(elementwise_dtype(x) && x.dim() == 3 && x.stride(2) == 1,
              "x must be float32/bfloat16/float16 [N, Hx, D]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type() &&
                  cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == x.size(0) &&
                  cos.size(1) == x.size(2) && sin.sizes() == cos.sizes(),
              "cos and sin must be contiguous [N, D] in x's dtype");
  SOFTMUX_DISPATCH(x.scalar_type(), "rotary", [&] {
    rotary_impl<scalar_t>(x.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
                          x.size(0), x.size(1), x.size(2), x.stride(0), x.stride(1));
  });
}



template <typename scalar_t>
void silu_mul_range(const scalar_t* g, const scalar_t* u, scalar_t* o, int64_t i, int64_t end) {
  float xs[8], ss[8];
#ifdef SOFTMUX_AVX2_EXP
  if constexpr (std::is_same<scalar_t, float>::value || std::is_same<scalar_t, c10::BFloat16>::value) {
    for (; i + 8 <= end; i += 8) {  // whole groups in registers, faster than the copying loop below
      const __m256 x = load8(g + i);
      const __m256 s =
          _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
      store8(o + i, _mm256_mul_ps(round8(s, o), load8(u + i)));
    }
  }
#endif
  for (; i < end; i += 8) {  // float16, and the last partial group (padded)
    const int64_t n = std::min<int64_t>(8, end - i);
    for (int64_t j = 0; j < 8; ++j) xs[j] = j < n ? static_cast<float>(g[i + j]) : 0.f;
    silu8(xs, ss);
    for (int64_t j = 0; j < n; ++j)
      o[i + j] = static_cast<scalar_t>(rnd<scalar_t>(ss[j]) * static_cast<float>(u[i + j]));
  }
}

// silu(gate) * up, [N, I] each, float32/bfloat16/float16 (silu rounded to the dtype before the product, as
// torch's two ops).
// Every value goes through the same 8-lane silu (a partial last group is padded), so a value's
// result does not depend on where it sits: the batch does not change it.
torch::Tensor silu_mul(const torch::Tensor& gate, const torch::Tensor& up) {
  TORCH_CHECK(elementwise_dtype(gate) && up.scalar_type() == gate.scalar_type() && gate.is_contiguous() &&
                  up.is_contiguous() && gate.sizes() == up.sizes(),
              "gate and up must be contiguous, of one shape and one dtype (float32/bfloat16/float16)");
  auto out = torch::empty_like(gate);
  SOFTMUX_DISPATCH(gate.scalar_type(), "silu_mul", [&] {
    const scalar_t* g = gate.data_ptr<scalar_t>();
    const scalar_t* u = up.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, gate.numel(), 4096,
                     [&](int64_t begin, int64_t end) { silu_mul_range<scalar_t>(g, u, o, begin, end); });
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
      // inf - inf, NaN
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(x, x), _mm256_setzero_ps(), _CMP_NEQ_UQ));
      const __m256 gt = _mm256_cmp_ps(x, vbest, _CMP_GT_OQ);
      vbest = _mm256_blendv_ps(vbest, x, gt);
      vbest_i =
          _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(vbest_i), _mm256_castsi256_ps(vidx), gt));
      vidx = _mm256_add_epi32(vidx, eight);
    }
    alignas(32) float lane_best[8];
    alignas(32) int32_t lane_i[8];
    _mm256_store_ps(lane_best, vbest);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lane_i), vbest_i);
    best_i = lane_i[0];
    best = lane_best[0];
    for (int j = 1; j < 8; ++j)
      if (lane_best[j] > best || (lane_best[j] == best && lane_i[j] < best_i))
        best = lane_best[j], best_i = lane_i[j];
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
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.is_contiguous() &&
                  elementwise_dtype(logits),
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

}  // namespace softmux

// The kernels a pass runs, as operators with schemas: torch.ops.softmux.<name>. The schema says which
// arguments a kernel writes (Tensor(a!)), so torch.compile and make_fx trace through them with the shapes
// that server/engine/kernels.py registers (register_fake), and the dispatcher checks every call's types.
TORCH_LIBRARY(softmux, m) {
  m.def("rms_norm(Tensor(a!) h, Tensor? residual, Tensor weight, float eps, float offset) -> Tensor");
  m.def("rotary(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("greedy(Tensor logits) -> (Tensor, Tensor)");
  m.def(
      "decode_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) kpool, Tensor(b!) vpool, "
      "Tensor write, Tensor slots, Tensor lengths, float scale) -> Tensor");
  m.def("panel_linear(Tensor x, Tensor panels, int n, Tensor? bias, Tensor? scales) -> Tensor");
  m.def(
      "decoder_stack(int stack, Tensor(a!) h, Tensor cos, Tensor sin, Tensor(b!) kpool, Tensor(c!) vpool, "
      "Tensor write, Tensor slots, Tensor lengths) -> Tensor");
}

TORCH_LIBRARY_IMPL(softmux, CPU, m) {
  m.impl("rms_norm", &softmux::rms_norm);
  m.impl("rotary", &softmux::rotary);
  m.impl("silu_mul", &softmux::silu_mul);
  m.impl("greedy", &softmux::greedy);
  m.impl("decode_attention", &softmux::decode_attention);
  m.impl("panel_linear", &softmux::panel_linear);
  m.impl("decoder_stack", &softmux::decoder_stack);
}

// Load-time helpers (no tensors of a pass) stay plain Python functions.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_panels", &softmux::pack_panels, "a weight in panels of 16 output columns, for panel_linear");
  m.def("pack_panels_int8", &softmux::pack_panels_int8,
        "a weight quantized to int8 per output channel, in panels");
  m.def("panel_linear_vectorized", &softmux::panel_linear_vectorized,
        "whether panel_linear is vectorised here");
  softmux::bind_decoder_stack(m);
}
