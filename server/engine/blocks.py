"""The decoder's building blocks over the Hugging Face model's own weights: Linear (the weight also
repacked once, at load, for the native panel kernel or oneDNN), Norm (the model's norm module, or the
fused native RMSNorm), Layer (one decoder layer's blocks). decoder.Decoder assembles them per family.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from server.engine.kernels import Kernels

KERNEL_DTYPES = (
    torch.float32,
    torch.bfloat16,
    torch.float16,
)  # what the native norm, rotary, SiLU and panel kernels take


class UnsupportedModel(ValueError):
    """The model cannot be served exactly by this engine (the server refuses it at start)."""


def fuse_linears(modules: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate linears' weights (and biases) and make the modules use views of the result, so
    the fused copy costs no extra memory and the transformers model still works (PEFT, training)."""
    weight = torch.cat([m.weight.detach() for m in modules])
    has_bias = [m.bias is not None for m in modules]
    if any(has_bias) and not all(has_bias):
        raise UnsupportedModel("projections with and without bias cannot be fused")
    bias = torch.cat([m.bias.detach() for m in modules]) if all(has_bias) else None
    start = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(weight[start : start + n], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[start : start + n], requires_grad=False)
        start += n
    return weight, bias


class Linear:
    """y = x W^T + b, with the weight also repacked once, at load, where that is available (CPU) and pays.

    Decode-sized inputs (at most `PANEL_MAX_ROWS` rows) run the native panel kernel
    (csrc/panel_linear.cpp) over a copy of the weight in panels of 16 output columns, in the model's
    own dtype: faster than oneDNN's packed GEMM at decode sizes, and a 16-bit model reads its 16-bit
    weights (docs/architecture.md, "Panel linears", has the measurements). Each output is
    one float32 FMA chain over k, so a row's result does not depend on the other rows, bit for bit.
    Longer inputs (prefill) use the GEMM: F.linear for float32.

    Without the native kernels (`--no-native-kernels`, or no compiler), `pack` reorders the weight
    into oneDNN's blocked layout for inputs of at most `PANEL_MAX_ROWS` rows.
    bfloat16/float16 on a CPU without native 16-bit GEMM (no AVX512-BF16/AMX, e.g. AVX2): torch's 16-bit
    matmul there is several times slower than float32 (docs/benchmarks.md), so every input size runs
    the panel kernel (or, without it, a float32 oneDNN copy of the 16-bit values): products of the
    exact 16-bit values accumulated in float32 and rounded back to the model's dtype, what a 16-bit
    GEMM with float32 accumulation computes. Where the CPU has native 16-bit GEMM, longer inputs use
    it.
    Memory: one more copy of the weights (float32 for 16-bit models served through oneDNN), unless
    `one_copy`: where the panel kernel serves, it then serves every input size (prefill included, at
    about the GEMM's rate on an AVX2 CPU) and the plain weight is dropped (`weight` is None): the
    panels are the only copy. The caller releases the transformers module's own reference.

    `quantize` ("int8"): the weight is quantized once, symmetric per output channel (scale =
    max |w| / 127). Where the panel kernel serves, into int8 panels that are its only copy; elsewhere (a
    GPU, no native kernels) into an int8 [out, in] copy for ATen's `_weight_int8pack_mm` (torch's own
    weight-only int8 kernel, CPU and CUDA). The panel kernel widens them
    in registers and multiplies each column's float32 chain by its scale, so x stays in the model's
    dtype and a row's result still does not depend on the other rows.
    """

    PANEL_MAX_ROWS = 128

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        pack: bool,
        ops: Kernels | None = None,
        rows_hint: int = 32,
        one_copy: bool = False,
        quantize: str | None = None,
    ) -> None:
        self.weight: torch.Tensor | None = weight
        self.bias, self.ops = bias, ops
        self.dtype = weight.dtype
        self.out_features = weight.shape[0]
        self.panels: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None  # [out_features] float32, for int8 panels
        self.panel_bias = None if bias is None else bias.float()
        self.packed: torch.Tensor | None = None  # oneDNN's layout
        self.packed_bias = bias  # in the packed weight's dtype
        self.widen = False  # run a 16-bit model's oneDNN product in float32
        self.max_rows = self.PANEL_MAX_ROWS  # rows up to which the repacked weight serves
        # int8 [out, in] and its scales in the model's dtype, for torch's own weight-only int8 kernel
        self.int8: tuple[torch.Tensor, torch.Tensor] | None = None
        if quantize is not None and quantize != "int8":
            raise UnsupportedModel(f"unknown quantization {quantize!r} (supported: int8)")
        if quantize is not None and not (pack and weight.device.type == "cpu" and _panels_apply(ops, weight)):
            # GPU, or a CPU without the native kernels: ATen's _weight_int8pack_mm (CPU and CUDA kernels)
            q, scale = quantize_int8(weight)
            self.int8, self.weight, self.max_rows = (q, scale.to(weight.dtype)), None, 1 << 62
            return
        if not pack or weight.device.type != "cpu":
            return
        if _panels_apply(ops, weight):
            assert ops is not None
            if quantize == "int8":
                self.panels, self.scales = ops.pack_panels_int8(weight)
            elif quantize is not None:
                raise UnsupportedModel(f"unknown quantization {quantize!r} (supported: int8)")
            else:
                self.panels = ops.pack_panels(weight)
            if one_copy or quantize is not None:
                drop_file_pages(weight)  # read once, now packed: its mapped file pages need not stay resident
                self.weight, self.max_rows = None, 1 << 62
                return
            if weight.dtype != torch.float32 and torch.backends.mkldnn.is_available():
                self.packed = _reorder(
                    weight, rows_hint
                )  # native 16-bit GEMM for long inputs, where there is one
                if self.packed is None:
                    self.max_rows = 1 << 62
            return
        if not torch.backends.mkldnn.is_available():
            return
        self.packed = _reorder(weight, rows_hint)
        if self.packed is None and weight.dtype in (
            torch.bfloat16,
            torch.float16,
        ):  # no native 16-bit GEMM here
            self.packed, self.widen = _reorder(weight.float(), rows_hint), True
            self.packed_bias = None if bias is None else bias.float()
            self.max_rows = 1 << 62

    @property
    def one_copy(self) -> bool:
        return self.weight is None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            if self.weight is None:  # the panels (or the int8 weight) are the only copy
                return self(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)
            return F.linear(x, self.weight, self.bias)
        if self.int8 is not None:
            y = torch._weight_int8pack_mm(x.contiguous(), *self.int8)  # [M, out] in x's dtype
            return y if self.bias is None else y + self.bias
        if self.panels is not None:
            assert self.ops is not None
            if x.shape[0] <= self.max_rows:
                if (
                    x.dtype == self.panels.dtype or self.scales is not None
                ):  # widened and rounded inside the kernel
                    return self.ops.panel_linear(
                        x.contiguous(), self.panels, self.out_features, self.panel_bias, self.scales
                    )
                y = self.ops.panel_linear(
                    x.float().contiguous(), self.panels, self.out_features, self.panel_bias
                )
                return y.to(x.dtype)  # a no-op for float32
            if self.packed is not None:  # native 16-bit GEMM
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.packed_bias, "none", [], "")
            assert self.weight is not None
            return F.linear(x, self.weight, self.bias)
        assert self.weight is not None  # without panels the plain weight is always kept
        if self.packed is None or x.shape[0] > self.max_rows:
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(
            x.float() if self.widen else x, self.packed, self.packed_bias, "none", [], ""
        )
        return y.to(x.dtype)  # a no-op unless widened


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q [N, K] int8, scale [N] float32): symmetric per output channel, as
    csrc/panel_linear.cpp's pack_panels_int8 (scale = max |w| / 127, 1 for an all-zero channel, rounded
    half to even), in blocks of 256 channels so the float32 working copy stays small."""
    n = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    for start in range(0, n, 256):
        w = weight[start : start + 256].float()
        s = w.abs().amax(1) / 127
        s[s == 0] = 1
        scale[start : start + 256] = s
        q[start : start + 256] = (w / s[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def _panels_apply(ops: Kernels | None, weight: torch.Tensor) -> bool:
    """The native panel kernel serves this (CPU) weight: built here, vectorised for this CPU,
    a dtype it reads."""
    return ops is not None and weight.dtype in KERNEL_DTYPES and ops.panel_linear_vectorized()


def _reorder(weight: torch.Tensor, rows_hint: int) -> torch.Tensor | None:
    """The weight in oneDNN's layout, or None where this build or CPU cannot (the plain path then)."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)
    except (RuntimeError, AttributeError):
        return None


class Norm:
    """The model's own norm module. RMSNorm of llama-like models (gemma's `1 + w` too) runs as one
    native kernel, with the residual add before it fused in (`h += residual` in place); in 16-bit
    dtypes it rounds where the module's own ops round."""

    FUSED = {"LlamaRMSNorm": 0.0, "MistralRMSNorm": 0.0, "Qwen2RMSNorm": 0.0, "GemmaRMSNorm": 1.0}

    def __init__(self, module: nn.Module, ops: Kernels | None) -> None:
        self.module = module
        self.ops = ops
        offset = self.FUSED.get(type(module).__name__)
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        weight = getattr(module, "weight", None)
        self.fused = ops is not None and offset is not None and eps is not None and weight is not None
        self.weight = weight.detach() if weight is not None else None
        self.eps, self.offset = float(eps or 0.0), float(offset or 0.0)

    def __call__(self, h: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """h [N, hidden], residual [N, hidden] or None -> (h + residual, norm(h + residual))."""
        if (
            self.fused
            and h.dtype in KERNEL_DTYPES
            and self.weight is not None
            and self.weight.dtype == h.dtype
        ):
            assert self.ops is not None
            return h, self.ops.rms_norm(h, residual, self.weight, self.eps, self.offset)
        if residual is not None:
            h = h + residual
        return h, self.module(h)


@dataclass
class Layer:
    input_norm: Norm
    post_norm: Norm
    qkv: Linear  # -> [N, (H + 2 H_kv) * D]
    o: Linear  # [N, H * D] -> [N, hidden]
    up: Linear  # -> [N, I]
    gate: Linear | None  # -> [N, I] when the MLP is gated (llama-like), else None
    down: Linear  # [N, I] -> [N, hidden]
    act: Callable[[torch.Tensor], torch.Tensor]
    scaling: float

    def __post_init__(self) -> None:
        self.silu = is_silu(self.act)  # the native silu(gate) * up applies


def is_silu(act: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether the activation computes SiLU (transformers wraps it in classes of its own): probed."""
    probe = torch.linspace(-8, 8, 33)
    with torch.no_grad():
        return bool(torch.equal(act(probe), F.silu(probe)))


def own_kept_tensors(model: nn.Module, skip: nn.Module | None) -> None:
    """Give the tensors that stay after packing (norms, biases, embeddings, buffers) memory of their own.

    transformers maps a safetensors file into memory and its tensors point into that mapping; while any
    one of them lives, the whole mapping stays and every page packing read counts as resident. Copying
    the few tensors that stay lets the mapping go once the packed weights are released. `skip`: a module
    whose weights are packed and released too (a tied embedding), left as it is."""
    for module in model.modules():
        if module is skip:
            continue
        for name, p in list(module._parameters.items()):
            if p is not None and (p.dim() < 2 or isinstance(module, nn.Embedding)):
                module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = b.clone()


_MADV_DONTNEED = 4


def drop_file_pages(t: torch.Tensor) -> None:
    """Let the kernel drop the resident pages of a tensor that lies in a mapped safetensors file (Linux).

    transformers maps the weights' files; packing reads every page of a weight, and those pages would
    stay resident until the whole mapping goes, so a model's load would peak at the file plus its
    panels. The mapping is private and read-only: a page dropped here is read again from the file if
    anything touches it, so this changes memory, never values. Tensors outside such a mapping are left."""
    start = t.untyped_storage().data_ptr()
    end = start + t.untyped_storage().nbytes()
    try:
        with open("/proc/self/maps") as maps:
            mapped = any(_within(line, start, end) for line in maps if line.rstrip().endswith(".safetensors"))
        if not mapped:
            return
        page = 4096
        lo, hi = -(-start // page) * page, end // page * page
        if hi > lo:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)
    except (OSError, AttributeError):
        pass


def _within(maps_line: str, start: int, end: int) -> bool:
    lo, hi = (int(x, 16) for x in maps_line.split(None, 1)[0].split("-"))
    return lo <= start and end <= hi


def return_freed_memory() -> None:
    """Ask glibc to hand freed heap memory back to the system (the packing's temporaries and the
    released weights); a no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release_weight(module: nn.Module) -> None:
    """Drop a transformers module's weight (its panels hold the only copy now): the module keeps an
    empty parameter of the same dtype, so the model still describes itself but cannot run."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        module.weight = nn.Parameter(
            torch.empty(0, dtype=weight.dtype, device=weight.device), requires_grad=False
        )


def bias_of(m: nn.Module) -> torch.Tensor | None:
    b = getattr(m, "bias", None)
    return None if b is None else b.detach()
