// The kernels' C++ entry points, shared by the files that call one another (cpu_ops.cpp binds them all).
#pragma once

#include <torch/extension.h>

#include <tuple>

namespace softmux {

// cpu_ops.cpp
torch::Tensor rms_norm(torch::Tensor h, const c10::optional<torch::Tensor>& residual, const torch::Tensor& w,
                       double eps, double offset);
void rotary(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin);
torch::Tensor silu_mul(const torch::Tensor& gate, const torch::Tensor& up);
std::tuple<torch::Tensor, torch::Tensor> greedy(const torch::Tensor& logits);
// attention.cpp
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k_new, const torch::Tensor& v_new,
                               torch::Tensor kpool, torch::Tensor vpool, const torch::Tensor& write,
                               const torch::Tensor& slots, const torch::Tensor& lengths, double scale);
// panel_linear.cpp
bool panel_linear_vectorized();
torch::Tensor pack_panels(const torch::Tensor& weight);
std::tuple<torch::Tensor, torch::Tensor> pack_panels_int8(const torch::Tensor& weight);
torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& panels, int64_t n,
                           const c10::optional<torch::Tensor>& bias,
                           const c10::optional<torch::Tensor>& scales = c10::nullopt);
// layers.cpp
void bind_decoder_stack(pybind11::module& m);
// h [N, C] updated in place through every layer of the stack `stack` (DecoderStack.handle) -> the last
// layer's MLP output [N, C], not yet added to h.
torch::Tensor decoder_stack(int64_t stack, torch::Tensor h, const torch::Tensor& cos, const torch::Tensor& sin,
                            torch::Tensor kpool, torch::Tensor vpool, const torch::Tensor& write,
                            const torch::Tensor& slots, const torch::Tensor& lengths);

}  // namespace softmux
