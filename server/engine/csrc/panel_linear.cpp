// y = x W^T + b for the few-to-a-hundred rows of a decode step, built with cpu_ops.cpp.
//
// Why: a decode step multiplies 1-128 rows by every weight of the model. oneDNN's packed GEMM
// stays well below the CPU's large-GEMM rate at 32 rows and below the memory bandwidth at one row
// (docs/architecture.md, "Panel linears", has the figures); a 16-bit model has no native GEMM on
// AVX2 at all (served through a float32 widening of its weights: twice the bytes). Here the weight
// is repacked once, at load, into panels of 16 output columns ([N/16, K, 16], zero-padded, in the
// model's own dtype: 16-bit weights stay 16-bit and are widened in registers), and each thread
// streams its own panels from memory once, multiplying every row of x against a panel while it is
// in cache: a 6 x 16 register tile, one FMA chain per output in order of k.
//
// Every output is the same chain of float32 FMAs over k = 0..K-1, whatever the number of rows and
// wherever the row sits in x: a row's result does not depend on the rest of the batch, bit for bit.
//
// Vectorised with AVX2 + FMA + F16C; elsewhere `panel_linear_vectorized()` is false and the caller
// keeps its GEMM (the scalar code is then only a correct fallback with the same chain order).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>
#include <cstdint>
#include <type_traits>

#include "ops.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SOFTMUX_AVX2 1
#endif

namespace softmux {
namespace {

constexpr int64_t kCols = 16;  // output columns per panel (two 8-wide vectors)
constexpr int64_t kRows = 6;   // rows of x per register tile
// Chains of FMAs per output (see tile), by weight type.
template <typename w_t>
constexpr int kChains = std::is_same<w_t, int8_t>::value ? 2 : 1;

inline float widen(float v) { return v; }
inline float widen(at::BFloat16 v) { return static_cast<float>(v); }
inline float widen(at::Half v) { return static_cast<float>(v); }
inline float widen(int8_t v) { return static_cast<float>(v); }

// One row's finished chains -> y (a 16-bit y rounds to nearest even, as torch's cast does).
template <typename y_t>
inline void store(const float* sums, const float* bias, const float* scale, y_t* y, int64_t cols) {
  for (int64_t c = 0; c < cols; ++c) {
    const float s = scale != nullptr ? sums[c] * scale[c] : sums[c];
    y[c] = static_cast<y_t>(bias != nullptr ? s + bias[c] : s);
  }
}

#ifdef SOFTMUX_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  // bfloat16 is the high half of a float32: widen to 32 bits and shift into place (exact).
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// int8 (quantized) weights: 8 bytes sign-extended to 32 bits and converted (exact).
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// One k of a tile: row r's value (a[r * ar]) times the panel's 16 columns at this k, into acc[r].
template <int MR, typename w_t>
inline void fma_rows(__m256 (&acc)[MR][2], const float* a, int64_t ar, const w_t* row) {
  const __m256 b0 = load8(row), b1 = load8(row + 8);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m256 av = _mm256_broadcast_ss(a + r * ar);
    acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
    acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
  }
}

// MR rows of x (row r's k-th value at a[k * ak + r * ar]) against one panel ([K, kCols]) -> y rows
// (stride ldy), `cols` valid. scale (int8 panels: one float per output column, else null) multiplies
// each column's finished sum: per-channel weights factor out of it exactly.
// Each output is kChains<w_t> chains of FMAs (chain j takes k = j, j + S, ...; then chain 0 +
// chain 1): one chain for float and 16-bit weights (the order their answers have always had), two for
// int8, whose one-row steps are otherwise bound by the FMA latency of a single chain rather than by
// memory.
// While it computes, a tile prefetches lines pf, pf + pf_step, ... of the next panel into L2 (one
// line per k): the row tiles of a panel share its next panel's lines, so that memory latency hides
// behind arithmetic instead of stalling the first tile of every panel.
template <typename w_t, typename y_t, int MR>
void tile(const float* a, int64_t ak, int64_t ar, const w_t* panel, int64_t K, const float* bias,
          const float* scale, y_t* y, int64_t ldy, int64_t cols, const w_t* next, int64_t pf,
          int64_t pf_step) {
  constexpr int S = kChains<w_t>;
  // Every loop over r and s is unrolled so that the accumulators live in registers (not on the stack).
  __m256 acc[S][MR][2];
#pragma GCC unroll 2
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) acc[s][r][0] = acc[s][r][1] = _mm256_setzero_ps();
  // k values per line
  constexpr int64_t kLineK = 64 / (kCols * sizeof(w_t)) > 0 ? 64 / (kCols * sizeof(w_t)) : 1;
  for (int64_t k0 = 0; k0 < K; k0 += S) {
#pragma GCC unroll 2
    for (int s = 0; s < S; ++s) {
      const int64_t k = k0 + s;
      if (S > 1 && k >= K) break;
      if (k == pf) {
        _mm_prefetch(reinterpret_cast<const char*>(next + pf * kLineK * kCols), _MM_HINT_T1);
        pf += pf_step;
      }
      fma_rows<MR>(acc[s], a + k * ak, ar, panel + k * kCols);
    }
  }
  alignas(32) float out[MR][kCols];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 2
    for (int s = 1; s < S; ++s) {
      acc[0][r][0] = _mm256_add_ps(acc[0][r][0], acc[s][r][0]);
      acc[0][r][1] = _mm256_add_ps(acc[0][r][1], acc[s][r][1]);
    }
    _mm256_store_ps(out[r], acc[0][r][0]);
    _mm256_store_ps(out[r] + 8, acc[0][r][1]);
  }
  for (int r = 0; r < MR; ++r) store(out[r], bias, scale, y + r * ldy, cols);
}

// int8 tiles of 4-6 rows: the same two chains per output as `tile`, in one pass over the panel each
// (chain 0, then chain 1 added to it as `tile` adds them: the same bits), so that each int8 value
// widened serves up to 6 rows instead of 3 (two chains of 6 rows would not fit the 16 registers).
template <typename y_t, int MR>
void tile_two_pass(const float* a, int64_t ak, int64_t ar, const int8_t* panel, int64_t K, const float* bias,
                   const float* scale, y_t* y, int64_t ldy, int64_t cols, const int8_t* next, int64_t pf,
                   int64_t pf_step) {
  constexpr int64_t kLineK = 64 / kCols;  // k values per line
  alignas(32) float out[MR][kCols];
#pragma GCC unroll 2
  for (int s = 0; s < 2; ++s) {
    __m256 acc[MR][2];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t k = s; k < K; k += 2) {
      if (s == 0 && k >= pf) {
        _mm_prefetch(reinterpret_cast<const char*>(next + pf * kLineK * kCols), _MM_HINT_T1);
        pf += pf_step;
      }
      fma_rows<MR>(acc, a + k * ak, ar, panel + k * kCols);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      if (s == 1) {
        acc[r][0] = _mm256_add_ps(_mm256_load_ps(out[r]), acc[r][0]);
        acc[r][1] = _mm256_add_ps(_mm256_load_ps(out[r] + 8), acc[r][1]);
      }
      _mm256_store_ps(out[r], acc[r][0]);
      _mm256_store_ps(out[r] + 8, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) store(out[r], bias, scale, y + r * ldy, cols);
}

template <typename w_t, typename y_t, int MR>
void tile_any(const float* a, int64_t ak, int64_t ar, const w_t* panel, int64_t K, const float* bias,
              const float* scale, y_t* y, int64_t ldy, int64_t cols, const w_t* next, int64_t pf,
              int64_t pf_step) {
  if constexpr (std::is_same<w_t, int8_t>::value && MR > 3)
    tile_two_pass<y_t, MR>(a, ak, ar, panel, K, bias, scale, y, ldy, cols, next, pf, pf_step);
  else
    tile<w_t, y_t, MR>(a, ak, ar, panel, K, bias, scale, y, ldy, cols, next, pf, pf_step);
}

template <typename w_t, typename y_t>
void tile_rows(int64_t mr, const float* a, int64_t ak, int64_t ar, const w_t* panel, int64_t K,
               const float* bias, const float* scale, y_t* y, int64_t ldy, int64_t cols, const w_t* next,
               int64_t pf, int64_t pf_step) {
  switch (mr) {
    case 1: return tile_any<w_t, y_t, 1>(a, ak, ar, panel, K, bias, scale, y, ldy, cols, next, pf, pf_step);
    case 2: return tile_any<w_t, y_t, 2>(a, ak, ar, panel, K, bias, scale, y, ldy, cols, next, pf, pf_step);
    case 3: return tile_any<w_t, y_t, 3>(a, ak, ar, panel, K, bias, scale, y, ldy, cols, next, pf, pf_step);
    case 4: return tile_any<w_t, y_t, 4>(a, ak, ar, panel, K, bias, scale, y, ldy, cols, next, pf, pf_step);
    case 5: return tile_any<w_t, y_t, 5>(a, ak, ar, panel, K, bias, scale, y, ldy, cols, next, pf, pf_step);
    default: return tile_any<w_t, y_t, 6>(a, ak, ar, panel, K, bias, scale, y, ldy, cols, next, pf, pf_step);
  }
}
#else
// The same chains of float32 multiply-adds per output, one output at a time.
template <typename w_t, typename y_t>
void tile_rows(int64_t mr, const float* a, int64_t ak, int64_t ar, const w_t* panel, int64_t K,
               const float* bias, const float* scale, y_t* y, int64_t ldy, int64_t cols, const w_t*, int64_t,
               int64_t) {
  constexpr int S = kChains<w_t>;
  float sums[kCols];
  for (int64_t r = 0; r < mr; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      float part[S] = {};
      for (int64_t k = 0; k < K; ++k)
        part[k % S] = std::fma(a[k * ak + r * ar], widen(panel[k * kCols + c]), part[k % S]);
      float total = part[0];
      for (int j = 1; j < S; ++j) total += part[j];
      sums[c] = total;
    }
    store(sums, bias, scale, y + r * ldy, cols);
  }
}
#endif

// x [M, K] row-major, float32 or the weight's 16-bit dtype (widened exactly); y [M, N] the same dtype.
// Rows go in tiles of at most kRows. Over float32 weights the tiles are of near-equal sizes (32 rows:
// 6, 6, 5, 5, 5, 5 rather than five of 6 and one of 2, whose 4 FMA chains cannot hide the FMA
// latency: faster for float32, no gain measured for 16-bit weights, which keep tiles of kRows;
// docs/architecture.md, "Panel linears"). The
// tiles only group rows: every output is the same chain either way. One tile of float32 rows reads x
// where it lies; otherwise each tile's rows are first copied (as float32) k-major ([K, rows]), so that
// a tile's k-th values are adjacent.
template <typename w_t, typename x_t>
void run(const x_t* x, int64_t M, int64_t K, const w_t* wp, int64_t N, const float* bias, const float* scale,
         x_t* y) {
  constexpr int64_t tr = kRows;
  const int64_t panels = (N + kCols - 1) / kCols, chunks = (M + tr - 1) / tr;
  constexpr bool balance = std::is_same<w_t, float>::value || std::is_same<w_t, int8_t>::value;
  auto first_row = [&](int64_t c) {  // of tile c; first_row(chunks) == M
    return balance ? c * (M / chunks) + std::min(c, M % chunks) : std::min(c * tr, M);
  };
  std::vector<float> tiles;
  const bool direct = chunks == 1 && std::is_same<x_t, float>::value;  // read x where it lies
  if (!direct) {
    tiles.resize(M * K);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t m0 = first_row(c), rows = first_row(c + 1) - m0;
      for (int64_t m = m0; m < m0 + rows; ++m) {
        float* dst = tiles.data() + m0 * K + (m - m0);
        for (int64_t k = 0; k < K; ++k) dst[k * rows] = widen(x[m * K + k]);
      }
    }
  }
  // Threads split the panels: each streams its share of the weight from memory once, and every row
  // tile reuses a panel while it is in cache.
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const w_t* panel = wp + p * K * kCols;
      const int64_t n0 = p * kCols, cols = std::min(kCols, N - n0);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t m0 = first_row(c), rows = first_row(c + 1) - m0;
        const float* a = direct ? reinterpret_cast<const float*>(x) : tiles.data() + m0 * K;
        tile_rows(rows, a, direct ? 1 : rows, direct ? K : 1, panel, K, bias != nullptr ? bias + n0 : nullptr,
                  scale != nullptr ? scale + n0 : nullptr, y + m0 * N + n0, N, cols, panel + K * kCols, c,
                  chunks);
      }
    }
  });
}

}  // namespace

bool panel_linear_vectorized() {
#ifdef SOFTMUX_AVX2
  return true;
#else
  return false;
#endif
}

// weight [N, K] (any strides), float32/bfloat16/float16 -> panels [ceil(N / 16), K, 16], same dtype,
// columns past N zero.
torch::Tensor pack_panels(const torch::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2, "weight must be a 2-D CPU tensor");
  const auto dt = weight.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kHalf,
              "weight dtype must be float32, bfloat16 or float16");
  const int64_t N = weight.size(0), K = weight.size(1), panels = (N + kCols - 1) / kCols;
  auto padded = torch::zeros({panels * kCols, K}, weight.options());
  padded.narrow(0, 0, N).copy_(weight);
  // [P * 16, K] -> [P, 16, K] -> [P, K, 16]
  return padded.view({panels, kCols, K}).transpose(1, 2).contiguous();
}

// weight [N, K] (any strides), float32/bfloat16/float16 -> (panels [ceil(N / 16), K, 16] int8, scales [N]
// float32): symmetric per output channel, scale = max |w| / 127 over the channel (1 where it is all zero),
// each value rounded to nearest (ties to even) in float32. Columns past N are zero.
std::tuple<torch::Tensor, torch::Tensor> pack_panels_int8(const torch::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2, "weight must be a 2-D CPU tensor");
  // Row blocks of 256 channels: the float32 working copy stays small (an 8B model's widest weight
  // widened at once would be ~1 GB of transient memory).
  const int64_t N = weight.size(0), K = weight.size(1), panels = (N + kCols - 1) / kCols;
  auto q = torch::zeros({panels * kCols, K}, weight.options().dtype(torch::kInt8));
  auto scales = torch::empty({N}, weight.options().dtype(torch::kFloat32));
  for (int64_t n0 = 0; n0 < N; n0 += 256) {
    const int64_t rows = std::min<int64_t>(256, N - n0);
    auto w = weight.narrow(0, n0, rows).to(torch::kFloat32);
    auto s = std::get<0>(w.abs().max(1)).div_(127.f);
    s.masked_fill_(s.eq(0), 1.f);
    scales.narrow(0, n0, rows).copy_(s);
    // w may be the weight itself: not in place
    q.narrow(0, n0, rows).copy_(w.div(s.unsqueeze(1)).round_().clamp_(-127, 127));
  }
  return {q.view({panels, kCols, K}).transpose(1, 2).contiguous(), scales};
}

// x [M, K] contiguous, float32 or the model's 16-bit dtype; panels from pack_panels (then x is float32
// or the panels' dtype) or pack_panels_int8 (then scales, its [n] float32 scales, is given); n = the
// weight's N, bias [n] float32 or None -> [M, n] in x's dtype (16-bit: the float32 result rounded, as
// `.to()` does).
torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& panels, int64_t n,
                           const c10::optional<torch::Tensor>& bias,
                           const c10::optional<torch::Tensor>& scales) {
  TORCH_CHECK(x.device().is_cpu() && panels.device().is_cpu(), "panel_linear: CPU tensors only");
  const auto xt = x.scalar_type(), wt = panels.scalar_type();
  const bool quantized = wt == torch::kInt8;
  TORCH_CHECK(quantized == scales.has_value(), "scales are given exactly for int8 panels");
  TORCH_CHECK((xt == torch::kFloat32 || xt == wt ||
               (quantized && (xt == torch::kBFloat16 || xt == torch::kHalf))) &&
                  x.dim() == 2 && x.is_contiguous(),
              "x must be contiguous [M, K], float32 or the model's dtype");
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == kCols && panels.is_contiguous() &&
                  panels.size(1) == x.size(1) && n > (panels.size(0) - 1) * kCols &&
                  n <= panels.size(0) * kCols,
              "panels must come from pack_panels of an [n, K] weight with K = x.size(1)");
  const int64_t M = x.size(0), K = x.size(1);
  const float* bd = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->dim() == 1 && bias->size(0) == n &&
                    bias->is_contiguous(),
                "bias must be contiguous float32 [n]");
    bd = bias->data_ptr<float>();
  }
  const float* sd = nullptr;
  if (quantized) {
    TORCH_CHECK(scales->scalar_type() == torch::kFloat32 && scales->dim() == 1 && scales->size(0) == n &&
                    scales->is_contiguous(),
                "scales must be contiguous float32 [n]");
    sd = scales->data_ptr<float>();
  }
  auto y = torch::empty({M, n}, x.options());
  if (M == 0) return y;
  // Every (weight, x) pair the checks admit; y is in x's dtype.
  auto over = [&](const auto* wp) {
    switch (xt) {
      case torch::kFloat32: run(x.data_ptr<float>(), M, K, wp, n, bd, sd, y.data_ptr<float>()); break;
      case torch::kBFloat16:
        run(x.data_ptr<at::BFloat16>(), M, K, wp, n, bd, sd, y.data_ptr<at::BFloat16>());
        break;
      case torch::kHalf: run(x.data_ptr<at::Half>(), M, K, wp, n, bd, sd, y.data_ptr<at::Half>()); break;
      default: TORCH_CHECK(false, "x dtype must be float32, bfloat16 or float16");
    }
  };
  switch (wt) {
    case torch::kFloat32: over(panels.data_ptr<float>()); break;
    case torch::kBFloat16: over(panels.data_ptr<at::BFloat16>()); break;
    case torch::kHalf: over(panels.data_ptr<at::Half>()); break;
    case torch::kInt8: over(panels.data_ptr<int8_t>()); break;
    default: TORCH_CHECK(false, "panels dtype must be float32, bfloat16, float16 or int8");
  }
  return y;
}

}  // namespace softmux
