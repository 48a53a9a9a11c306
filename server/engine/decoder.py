"""The frozen model's forward pass, rewritten for serving over the Hugging Face model's own weights.

Why not call the transformers model: its forward takes a padded [B, T] batch and its own cache
object, rebuilds a 4-D mask every call and runs three projections where one would do. Here the
tokens of all rows are packed into one [N, hidden] matrix (no padding in the matrix multiplies),
q/k/v are one fused multiply, and attention is a callback that reads and writes the
engine's key/value pool. Norms, activations and rotary tables are the model's own modules, so the
arithmetic is the model's: the reference tests compare against transformers token for token.

Supported families: llama, mistral, qwen2, gemma (pre-norm, rotary, optional GQA and q/k/v bias)
and gpt2 (learned positions, fused c_attn). Anything else is refused at start with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LLAMA_LIKE = ("llama", "mistral", "qwen2", "gemma")
SUPPORTED = LLAMA_LIKE + ("gpt2",)

# attend(layer, q [N, H, D], k [N, H_kv, D], v [N, H_kv, D], scaling) -> [N, H * D]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


class UnsupportedModel(ValueError):
    """The model cannot be served exactly by this engine (the server refuses it at start)."""


@dataclass
class Layer:
    input_norm: Callable[[torch.Tensor], torch.Tensor]
    post_norm: Callable[[torch.Tensor], torch.Tensor]
    qkv_w: torch.Tensor  # [(H + 2 H_kv) * D, hidden]
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor  # [hidden, H * D]
    o_b: torch.Tensor | None
    up_w: torch.Tensor  # [I, hidden]
    up_b: torch.Tensor | None
    gate_w: torch.Tensor | None  # [I, hidden] when the MLP is gated (llama-like), else None
    gate_b: torch.Tensor | None
    down_w: torch.Tensor  # [hidden, I]
    down_b: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]
    scaling: float


def _fuse(modules: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
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


def _bias(m: nn.Module) -> torch.Tensor | None:
    b = getattr(m, "bias", None)
    return None if b is None else b.detach()


def _check_llama_like(config: Any, max_context: int | None) -> None:
    for attr in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, attr, None):
            raise UnsupportedModel(f"{config.model_type}: {attr} is not supported")
    window: int | None = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    # qwen2 slides only on layers typed so; mistral slides everywhere once a window is set
    uses_window = "sliding_attention" in layer_types if config.model_type == "qwen2" else True
    if window is not None and uses_window and max_context is not None and window < max_context:
        raise UnsupportedModel(
            f"{config.model_type}: sliding-window attention ({window} tokens) is shorter than the longest "
            f"sequence this server admits ({max_context}); lower --max-input-tokens/--max-new-tokens"
        )


class Decoder:
    """Weights and the forward pass. Call `forward` under torch.inference_mode()."""

    # The transformers model's submodules differ by family: they are typed Any here.
    pos_embed: Any
    rotary: Any
    final_norm: Any
    layers: list[Layer]

    def __init__(self, model: Any, max_context: int | None = None) -> None:
        """max_context: the longest sequence (prefix + input + output) the server admits; None: unchecked."""
        config = model.config.get_text_config()
        self.family = config.model_type
        if self.family not in SUPPORTED:
            raise UnsupportedModel(
                f"model type {self.family!r} is not supported by the serving engine (supported: {', '.join(SUPPORTED)})"
            )
        self.embed = model.get_input_embeddings()
        head = model.get_output_embeddings()
        self.lm_head_w, self.lm_head_b = head.weight.detach(), _bias(head)
        if self.family == "gpt2":
            if max_context is not None and max_context > config.n_positions:
                raise UnsupportedModel(
                    f"gpt2: learned positions end at {config.n_positions}, shorter than the longest sequence this server "
                    f"admits ({max_context}); lower --max-input-tokens/--max-new-tokens"
                )
            self._init_gpt2(model, config)
        else:
            _check_llama_like(config, max_context)
            self._init_llama_like(model, config)

    def _init_llama_like(self, model: Any, config: Any) -> None:
        base = model.model
        self.pos_embed = None
        self.rotary = base.rotary_emb
        self.final_norm = base.norm
        first = base.layers[0].self_attn
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = first.head_dim
        self.layers = []
        for block in base.layers:
            attn, mlp = block.self_attn, block.mlp
            qkv_w, qkv_b = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            # gate and up stay two multiplies: fused into one [2I, hidden] weight they measured slower
            # (1.9 vs 1.5 ms at 32 rows for SmolLM2's I = 1536, float32, AVX2)
            self.layers.append(
                Layer(
                    input_norm=block.input_layernorm,
                    post_norm=block.post_attention_layernorm,
                    qkv_w=qkv_w,
                    qkv_b=qkv_b,
                    o_w=attn.o_proj.weight.detach(),
                    o_b=_bias(attn.o_proj),
                    up_w=mlp.up_proj.weight.detach(),
                    up_b=_bias(mlp.up_proj),
                    gate_w=mlp.gate_proj.weight.detach(),
                    gate_b=_bias(mlp.gate_proj),
                    down_w=mlp.down_proj.weight.detach(),
                    down_b=_bias(mlp.down_proj),
                    act=mlp.act_fn,
                    scaling=float(attn.scaling),
                )
            )

    def _init_gpt2(self, model: Any, config: Any) -> None:
        base = model.transformer
        if config.reorder_and_upcast_attn or getattr(config, "add_cross_attention", False):
            raise UnsupportedModel("gpt2: reorder_and_upcast_attn and cross-attention are not supported")
        self.pos_embed = base.wpe
        self.rotary = None
        self.final_norm = base.ln_f
        self.num_heads = self.num_kv_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.layers = []
        for block in base.h:
            attn, mlp = block.attn, block.mlp
            # Conv1D stores [in, out]: its transpose is a linear weight (a view, no copy).
            self.layers.append(
                Layer(
                    input_norm=block.ln_1,
                    post_norm=block.ln_2,
                    qkv_w=attn.c_attn.weight.detach().t(),
                    qkv_b=_bias(attn.c_attn),
                    o_w=attn.c_proj.weight.detach().t(),
                    o_b=_bias(attn.c_proj),
                    up_w=mlp.c_fc.weight.detach().t(),
                    up_b=_bias(mlp.c_fc),
                    gate_w=None,
                    gate_b=None,
                    down_w=mlp.c_proj.weight.detach().t(),
                    down_b=_bias(mlp.c_proj),
                    act=mlp.act,
                    scaling=float(attn.scaling),
                )
            )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N] -> [N, hidden], with the model's own embedding scale (gemma) applied."""
        return self.embed(ids)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, attend: Attend, logit_rows: torch.Tensor) -> torch.Tensor:
        """embeds [N, hidden] (packed tokens of every row), positions [N] int64, logit_rows [R] int64
        (which tokens need next-token logits) -> logits [R, V]."""
        h = embeds
        if self.pos_embed is not None:
            h = h + self.pos_embed(positions)
        rope: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.rotary is not None:
            cos, sin = self.rotary(h, positions[None])  # [1, N, D] each
            rope = cos[0, :, None], sin[0, :, None]  # [N, 1, D]
        n = h.shape[0]
        hq, hk, d = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.head_dim
        for i, layer in enumerate(self.layers):
            x = layer.input_norm(h)
            qkv = F.linear(x, layer.qkv_w, layer.qkv_b)  # [N, (H + 2 H_kv) * D]
            q = qkv[:, :hq].view(n, self.num_heads, d)
            k = qkv[:, hq : hq + hk].view(n, self.num_kv_heads, d)
            v = qkv[:, hq + hk :].view(n, self.num_kv_heads, d)
            if rope is not None:
                cos, sin = rope
                q = q * cos + _rotate_half(q) * sin
                k = k * cos + _rotate_half(k) * sin
            h = h + F.linear(attend(i, q, k, v, layer.scaling), layer.o_w, layer.o_b)
            x = layer.post_norm(h)
            up = F.linear(x, layer.up_w, layer.up_b)  # [N, I]
            if layer.gate_w is not None:
                up = layer.act(F.linear(x, layer.gate_w, layer.gate_b)) * up
            else:
                up = layer.act(up)
            h = h + F.linear(up, layer.down_w, layer.down_b)
        last = self.final_norm(h[logit_rows])  # [R, hidden]
        return F.linear(last, self.lm_head_w, self.lm_head_b)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
