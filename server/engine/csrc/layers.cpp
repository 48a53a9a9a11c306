// DecoderStack: every layer of a llama-like decoder for one pass, in C++, over the kernels above.
//
// Why: the Python loop in Decoder.forward calls ~12 kernels a layer, and between them sit Python
// attribute lookups, dtype checks, tensor views and argument conversions: a measurable part of a
// one-row step (docs/architecture.md, "The layer loop in C++"). Here the loop calls the same kernels with the
// same inputs in the same order, so the results are the Python loop's bit for bit
// (tests/test_kernels.py), and it releases the GIL for the whole pass.

#include <torch/extension.h>

#include <atomic>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "ops.h"

namespace softmux {
namespace {

struct Linear {
  torch::Tensor panels;                // [ceil(n / 16), K, 16], from pack_panels or pack_panels_int8
  c10::optional<torch::Tensor> bias;   // [n] float32
  int64_t n;
  c10::optional<torch::Tensor> scales;  // [n] float32, for int8 panels
  torch::Tensor operator()(const torch::Tensor& x) const { return panel_linear(x, panels, n, bias, scales); }
};

struct Norm {
  torch::Tensor weight;  // [C], the model's dtype
  double eps, offset;
  // h += residual (when there is one), then the norm of h: as blocks.Norm does.
  torch::Tensor operator()(const torch::Tensor& h, const c10::optional<torch::Tensor>& residual) const {
    return rms_norm(h, residual, weight, eps, offset);
  }
};

struct Layer {
  Norm input_norm, post_norm;
  Linear qkv, o, up, gate, down;
  double scaling;
};

class DecoderStack {
 public:
  // Per layer, in order: 2 norms (input, post), 5 linears (qkv, o, up, gate, down; scales for int8 panels).
  DecoderStack(const std::vector<torch::Tensor>& norm_weights, const std::vector<double>& norm_eps,
               const std::vector<double>& norm_offsets, const std::vector<torch::Tensor>& panels,
               const std::vector<c10::optional<torch::Tensor>>& biases,
               const std::vector<int64_t>& out_features,
               const std::vector<c10::optional<torch::Tensor>>& scales, const std::vector<double>& scalings,
               int64_t heads, int64_t kv_heads, int64_t head_dim)
      : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), handle_(next_handle_++) {
    const size_t L = scalings.size();
    TORCH_CHECK(norm_weights.size() == 2 * L && norm_eps.size() == 2 * L && norm_offsets.size() == 2 * L,
                "two norms per layer");
    TORCH_CHECK(panels.size() == 5 * L && biases.size() == 5 * L && out_features.size() == 5 * L &&
                    scales.size() == 5 * L,
                "five linears per layer");
    auto linear = [&](size_t j) { return Linear{panels[j], biases[j], out_features[j], scales[j]}; };
    auto norm = [&](size_t j) { return Norm{norm_weights[j], norm_eps[j], norm_offsets[j]}; };
    for (size_t i = 0; i < L; ++i) {
      layers_.push_back(Layer{norm(2 * i), norm(2 * i + 1), linear(5 * i), linear(5 * i + 1),
                              linear(5 * i + 2), linear(5 * i + 3), linear(5 * i + 4), scalings[i]});
    }
    std::lock_guard<std::mutex> guard(registry_lock_);
    registry_[handle_] = this;
  }

  ~DecoderStack() {
    std::lock_guard<std::mutex> guard(registry_lock_);
    registry_.erase(handle_);
  }

  DecoderStack(const DecoderStack&) = delete;
  DecoderStack& operator=(const DecoderStack&) = delete;

  // The op softmux::decoder_stack names a stack by this number: an operator's schema takes tensors and
  // scalars, not a C++ object, and the number stays valid exactly while the Python object lives.
  int64_t handle() const { return handle_; }

  static const DecoderStack& find(int64_t handle) {
    std::lock_guard<std::mutex> guard(registry_lock_);
    auto it = registry_.find(handle);
    TORCH_CHECK(it != registry_.end(), "no DecoderStack with handle ", handle, " (released?)");
    return *it->second;
  }

  // h [N, C] the residual stream (updated in place), cos/sin [N, D] in h's dtype, kpool/vpool
  // [L, H_kv, slots, D], write [N], slots [N, T], lengths [N] as decode_attention takes them
  // -> (h, residual): the last layer's MLP output is not added yet, as in Decoder.forward.
  std::tuple<torch::Tensor, torch::Tensor> forward(torch::Tensor h, const torch::Tensor& cos,
                                                   const torch::Tensor& sin, const torch::Tensor& kpool,
                                                   const torch::Tensor& vpool, const torch::Tensor& write,
                                                   const torch::Tensor& slots,
                                                   const torch::Tensor& lengths) const {
    TORCH_CHECK(kpool.dim() == 4 && kpool.size(0) == static_cast<int64_t>(layers_.size()) &&
                    vpool.sizes() == kpool.sizes(),
                "kpool and vpool must be [layers, H_kv, slots, D]");
    const int64_t n = h.size(0), H = heads_, Hk = kv_heads_, D = head_dim_;
    c10::optional<torch::Tensor> residual;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& layer = layers_[i];
      torch::Tensor x = layer.input_norm(h, residual);
      torch::Tensor qkv = layer.qkv(x);  // [N, (H + 2 H_kv) * D]
      rotary(qkv.narrow(1, 0, (H + Hk) * D).view({n, H + Hk, D}), cos, sin);
      torch::Tensor q = qkv.narrow(1, 0, H * D).view({n, H, D});
      torch::Tensor k = qkv.narrow(1, H * D, Hk * D).view({n, Hk, D});
      torch::Tensor v = qkv.narrow(1, (H + Hk) * D, Hk * D).view({n, Hk, D});
      torch::Tensor attn = decode_attention(q, k, v, kpool.select(0, i), vpool.select(0, i), write, slots,
                                            lengths, layer.scaling);
      x = layer.post_norm(h, layer.o(attn));
      torch::Tensor up = layer.up(x);
      residual = layer.down(silu_mul(layer.gate(x), up));
    }
    return {h, residual.has_value() ? *residual : torch::zeros_like(h)};
  }

 private:
  std::vector<Layer> layers_;
  int64_t heads_, kv_heads_, head_dim_;
  int64_t handle_;
  static inline std::atomic<int64_t> next_handle_{1};
  static inline std::mutex registry_lock_;
  static inline std::unordered_map<int64_t, const DecoderStack*> registry_;
};

}  // namespace

torch::Tensor decoder_stack(int64_t stack, torch::Tensor h, const torch::Tensor& cos, const torch::Tensor& sin,
                            torch::Tensor kpool, torch::Tensor vpool, const torch::Tensor& write,
                            const torch::Tensor& slots, const torch::Tensor& lengths) {
  return std::get<1>(DecoderStack::find(stack).forward(h, cos, sin, kpool, vpool, write, slots, lengths));
}

void bind_decoder_stack(pybind11::module& m) {
  pybind11::class_<DecoderStack>(m, "DecoderStack",
                                 "every layer of a llama-like decoder for one pass, over these kernels")
      .def(pybind11::init<const std::vector<torch::Tensor>&, const std::vector<double>&,
                          const std::vector<double>&, const std::vector<torch::Tensor>&,
                          const std::vector<c10::optional<torch::Tensor>>&,
                          const std::vector<int64_t>&, const std::vector<c10::optional<torch::Tensor>>&,
                          const std::vector<double>&, int64_t, int64_t, int64_t>())
      .def_property_readonly("handle", &DecoderStack::handle);
}

}  // namespace softmux
