"""The decoder's building blocks (server/engine/blocks.py): the fused norm against the model's own
module, the packed and panel-kernel linears against F.linear, the SiLU probe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from server.engine.blocks import Linear, Norm, is_silu


@pytest.mark.parametrize(
    "module", [LlamaRMSNorm(64, eps=1e-5), GemmaRMSNorm(64, eps=1e-6)], ids=["llama", "gemma"]
)
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_norm_matches_the_models_own_module(ops, module, with_residual):
    with torch.no_grad():
        module.weight.copy_(torch.randn(64) * 0.3 + (0.0 if isinstance(module, GemmaRMSNorm) else 1.0))
    norm = Norm(module, ops)
    assert norm.fused
    h, residual = torch.randn(9, 64) * 3, torch.randn(9, 64)
    h_after, x = norm(h.clone(), residual if with_residual else None)
    expected_h = h + residual if with_residual else h
    assert torch.equal(h_after, expected_h)  # the residual add rounds as torch's
    with torch.inference_mode():
        torch.testing.assert_close(x, module(expected_h), atol=2e-6, rtol=2e-6)
    plain = Norm(module, None)  # --no-native-kernels: the module itself
    assert not plain.fused and torch.equal(plain(h.clone(), None)[1], module(h).detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("module_type", [LlamaRMSNorm, GemmaRMSNorm])
def test_fused_norm_in_16_bits_rounds_where_the_module_rounds(ops, module_type, dtype):
    module = module_type(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        module.weight.copy_(torch.randn(64) * 0.3 + (0.0 if module_type is GemmaRMSNorm else 1.0))
    norm = Norm(module, ops)
    assert norm.fused
    h, residual = (torch.randn(40, 64) * 3).to(dtype), torch.randn(40, 64).to(dtype)
    h_after, x = norm(h.clone(), residual)
    assert torch.equal(h_after, h + residual)  # the residual add rounds as torch's
    with torch.inference_mode():
        expected = module(h + residual)
    assert x.dtype == dtype
    # The same roundings; only the sum of squares may add up in another order (a rare last-bit flip).
    assert (x == expected).float().mean() > 0.99
    torch.testing.assert_close(x.float(), expected.float(), atol=1e-2, rtol=1e-2)


def test_norm_of_an_unknown_kind_is_the_module(ops):
    layer_norm = nn.LayerNorm(64)
    norm = Norm(layer_norm, ops)
    h = torch.randn(3, 64)
    assert not norm.fused and torch.equal(norm(h, None)[1], layer_norm(h))


@pytest.mark.parametrize("rows", [1, 7, 32, 300])
def test_packed_float32_linear_matches_f_linear(rows):
    w, b = torch.randn(96, 48) * 0.1, torch.randn(96)
    x = torch.randn(rows, 48)
    packed, plain = Linear(w, b, pack=True), Linear(w, None, pack=False)
    assert packed.packed is not None and plain.packed is None
    torch.testing.assert_close(packed(x), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    assert torch.equal(plain(x), F.linear(x, w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_16bit_linear_rounds_a_float32_product_back(dtype):
    w, x = (torch.randn(96, 48) * 0.1).to(dtype), torch.randn(40, 48).to(dtype)
    out = Linear(w, None, pack=True)(x)
    assert out.dtype == dtype
    exact = (x.float() @ w.float().t()).to(dtype)  # a 16-bit GEMM with float32 accumulation
    assert (out == exact).float().mean() > 0.99  # the rest: one 16-bit rounding step apart
    torch.testing.assert_close(out.float(), exact.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_runs_the_panel_kernel_for_decode_sized_inputs(ops, dtype):
    w, b = (torch.randn(96, 48) * 0.1).to(dtype), torch.randn(96).to(dtype)
    layer = Linear(w, b, pack=True, ops=ops)
    assert layer.panels is not None
    for rows in (1, 32, Linear.PANEL_MAX_ROWS, Linear.PANEL_MAX_ROWS + 1):
        x = torch.randn(rows, 48).to(dtype)
        out = layer(x)
        assert out.dtype == dtype
        exact = F.linear(x.double(), w.double(), b.double())
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.double(), exact, atol=tol, rtol=tol)
    assert Linear(w, b, pack=False, ops=ops).panels is None  # --no-prepack-weights: the plain GEMM


def test_the_silu_kernel_applies_to_silu_activations_only():
    from transformers.activations import ACT2FN

    assert is_silu(nn.SiLU()) and is_silu(ACT2FN["silu"])
    assert not is_silu(ACT2FN["gelu_pytorch_tanh"]) and not is_silu(nn.GELU())
