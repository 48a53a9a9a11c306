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
from torch import nn

from server.engine.blocks import (
    KERNEL_DTYPES,
    Layer,
    Linear,
    Norm,
    UnsupportedModel,
    bias_of,
    fuse_linears,
    own_kept_tensors,
    release_weight,
    return_freed_memory,
)
from server.engine.kernels import DecoderStack, Kernels

LLAMA_LIKE = ("llama", "mistral", "qwen2", "gemma")
SUPPORTED = LLAMA_LIKE + ("gpt2",)

# attend(layer, q [N, H, D], k [N, H_kv, D], v [N, H_kv, D], scaling) -> [N, H * D]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class PoolAttention:
    """Attention by the native kernel over the key/value pool, one query token per row: an Attend,
    and also what the native DecoderStack takes whole (its index tensors are those of every layer)."""

    ops: Kernels
    k: torch.Tensor  # [L, H_kv, slots, D]
    v: torch.Tensor  # [L, H_kv, slots, D]
    write: torch.Tensor  # [N] int64, the slot of each new token
    slots: torch.Tensor  # [N, T] int64, each query row's key slots (padding: NULL_SLOT)
    lengths: torch.Tensor  # [N] int64, the slots each query row sees

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """Writes the new keys and values into the pool, then attends each row to its slots in place."""
        return self.ops.decode_attention(
            q, k, v, self.k[layer], self.v[layer], self.write, self.slots, self.lengths, scaling
        )


def _check_llama_like(config: Any, max_context: int | None) -> None:
    for attr in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, attr, None):
            raise UnsupportedModel(f"{config.model_type}: {attr} is not supported")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) == "dynamic":
        # transformers rescales dynamic rotary frequencies by the largest position in the call: in a
        # mixed batch a row's answer would depend on its neighbours (and it syncs the host every step)
        raise UnsupportedModel(
            f"{config.model_type}: dynamic rope scaling rescales every row by the longest row of its batch; "
            "not supported (a fixed scaling such as linear, yarn or llama3 is)"
        )
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
    final_norm: Norm
    layers: list[Layer]

    def __init__(
        self,
        model: Any,
        max_context: int | None = None,
        pack: bool = False,
        ops: Kernels | None = None,
        native_layers: bool = True,
        one_copy: bool = False,
        quantize: str | None = None,
    ) -> None:
        """max_context: the longest sequence (prefix + input + output) the server admits; None: unchecked.
        pack: keep float32 weights also in oneDNN's layout (see Linear); ops: the native kernels
        (server/engine/kernels.py) or None for torch ops only; native_layers: with ops, run the layers
        in one native call where the model allows (`stack`). one_copy: where the panel kernel serves a
        weight, its panels become the only copy: the transformers model's own weights are released (it
        can no longer run; the server's own model only: tests and training keep theirs). quantize
        ("int8"): the decoder layers' linears are quantized (blocks.Linear) into their only copy, the
        transformers modules' weights released as with one_copy; the head and the embedding table keep
        the model's dtype (they are a small share of a large model and the most sensitive)."""
        self.ops = ops
        self._one_copy = one_copy
        self._quantize = quantize
        self._linear_modules: list[tuple[nn.Module, Linear]] = []  # to release with one_copy
        config = model.config.get_text_config()
        self.family = config.model_type
        if self.family not in SUPPORTED:
            raise UnsupportedModel(
                f"model type {self.family!r} is not supported by the serving engine (supported: "
                f"{', '.join(SUPPORTED)})"
            )
        self.embed = model.get_input_embeddings()
        head = model.get_output_embeddings()
        self.vocab_size = int(head.weight.shape[0])
        tied = head.weight.data_ptr() == self.embed.weight.data_ptr()
        if one_copy and model.device.type == "cpu":
            own_kept_tensors(model, skip=self.embed if tied else None)
        self.lm_head = Linear(head.weight.detach(), bias_of(head), pack, ops, one_copy=one_copy)
        if self.family == "gpt2":
            if max_context is not None and max_context > config.n_positions:
                raise UnsupportedModel(
                    f"gpt2: learned positions end at {config.n_positions}, shorter than the longest sequence "
                    f"this server admits ({max_context}); lower --max-input-tokens/--max-new-tokens"
                )
            self._init_gpt2(model, config, pack)
        else:
            _check_llama_like(config, max_context)
            self._init_llama_like(model, config, pack)
        # The native DecoderStack (an object of the compiled module) and the most tokens it takes.
        self.stack: DecoderStack | None = None
        self.stack_rows = 0
        if native_layers:
            self.stack, self.stack_rows = self._native_stack()
        # A tied table read from the head's panels (row t: panel t // 16, column t % 16): one copy of it.
        self.embed_panels = one_copy and tied and self.lm_head.one_copy and type(self.embed) is nn.Embedding
        if one_copy or quantize is not None:
            self._release(head)

    def _release(self, head: Any) -> None:
        """Drop the transformers modules' references to weights whose panels are now the only copy."""
        if self.lm_head.one_copy:
            release_weight(head)
            if self.embed_panels:
                release_weight(self.embed)
        for module, lin in self._linear_modules:
            if lin.one_copy:
                release_weight(module)
        self._linear_modules = []
        return_freed_memory()

    def _linear(
        self, modules: list[nn.Module], weight: torch.Tensor, bias: torch.Tensor | None, pack: bool
    ) -> Linear:
        """A Linear over `modules`' weight (several when fused); they are released with one_copy."""
        lin = Linear(weight, bias, pack, self.ops, one_copy=self._one_copy, quantize=self._quantize)
        self._linear_modules += [(m, lin) for m in modules]
        return lin

    def _init_llama_like(self, model: Any, config: Any, pack: bool) -> None:
        base = model.model
        self.pos_embed = None
        self.rotary = base.rotary_emb
        self.final_norm = Norm(base.norm, self.ops)
        first = base.layers[0].self_attn
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = first.head_dim
        self.layers = []
        for block in base.layers:
            attn, mlp = block.self_attn, block.mlp
            qkv_w, qkv_b = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
            # gate and up stay two multiplies: fused into one [2I, hidden] weight they measured slower
            # at decode sizes (docs/how-it-works.md)
            self.layers.append(
                Layer(
                    input_norm=Norm(block.input_layernorm, self.ops),
                    post_norm=Norm(block.post_attention_layernorm, self.ops),
                    qkv=self._linear([attn.q_proj, attn.k_proj, attn.v_proj], qkv_w, qkv_b, pack),
                    o=self._linear([attn.o_proj], attn.o_proj.weight.detach(), bias_of(attn.o_proj), pack),
                    up=self._linear([mlp.up_proj], mlp.up_proj.weight.detach(), bias_of(mlp.up_proj), pack),
                    gate=self._linear(
                        [mlp.gate_proj], mlp.gate_proj.weight.detach(), bias_of(mlp.gate_proj), pack
                    ),
                    down=self._linear(
                        [mlp.down_proj], mlp.down_proj.weight.detach(), bias_of(mlp.down_proj), pack
                    ),
                    act=mlp.act_fn,
                    scaling=float(attn.scaling),
                )
            )

    def _init_gpt2(self, model: Any, config: Any, pack: bool) -> None:
        base = model.transformer
        if config.reorder_and_upcast_attn or getattr(config, "add_cross_attention", False):
            raise UnsupportedModel("gpt2: reorder_and_upcast_attn and cross-attention are not supported")
        self.pos_embed = base.wpe
        self.rotary = None
        self.final_norm = Norm(base.ln_f, self.ops)
        self.num_heads = self.num_kv_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.layers = []
        for block in base.h:
            attn, mlp = block.attn, block.mlp
            # Conv1D stores [in, out]: its transpose is a linear weight (a view, no copy).
            self.layers.append(
                Layer(
                    input_norm=Norm(block.ln_1, self.ops),
                    post_norm=Norm(block.ln_2, self.ops),
                    qkv=self._linear(
                        [attn.c_attn], attn.c_attn.weight.detach().t(), bias_of(attn.c_attn), pack
                    ),
                    o=self._linear(
                        [attn.c_proj], attn.c_proj.weight.detach().t(), bias_of(attn.c_proj), pack
                    ),
                    up=self._linear([mlp.c_fc], mlp.c_fc.weight.detach().t(), bias_of(mlp.c_fc), pack),
                    gate=None,
                    down=self._linear(
                        [mlp.c_proj], mlp.c_proj.weight.detach().t(), bias_of(mlp.c_proj), pack
                    ),
                    act=mlp.act,
                    scaling=float(attn.scaling),
                )
            )

    def _native_stack(self) -> tuple[DecoderStack | None, int]:
        """The native DecoderStack (csrc/layers.cpp) where every op of every layer has its kernel:
        llama-like, rotary, fused RMSNorms, SiLU-gated MLP, panel-packed linears in one dtype; and the
        most tokens it takes (the linears' panel limit). (None, 0) otherwise: the Python loop serves."""
        if self.ops is None or self.rotary is None:
            return None, 0
        if not all(layer.silu and layer.gate is not None for layer in self.layers):
            return None, 0
        dtype = self.lm_head.dtype
        norms = [n for layer in self.layers for n in (layer.input_norm, layer.post_norm)]
        lins = [
            lin
            for layer in self.layers
            for lin in (layer.qkv, layer.o, layer.up, layer.gate, layer.down)
            if lin is not None
        ]
        norm_weights = [
            n.weight for n in norms if n.fused and n.weight is not None and n.weight.dtype == dtype
        ]
        panels = [
            lin.panels for lin in lins if lin.panels is not None and lin.panels.dtype in (dtype, torch.int8)
        ]
        if len(norm_weights) != len(norms) or len(panels) != len(lins):
            return None, 0
        stack = self.ops.decoder_stack(
            norm_weights,
            [n.eps for n in norms],
            [n.offset for n in norms],
            panels,
            [lin.panel_bias for lin in lins],
            [lin.out_features for lin in lins],
            [lin.scales for lin in lins],
            [layer.scaling for layer in self.layers],
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        return stack, min(lin.max_rows for lin in lins)

    def linears(self) -> list[Linear]:
        return [self.lm_head] + [
            lin
            for layer in self.layers
            for lin in (layer.qkv, layer.o, layer.up, layer.gate, layer.down)
            if lin
        ]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N] -> [N, hidden], with the model's own embedding scale (gemma) applied."""
        if self.embed_panels:
            assert self.lm_head.panels is not None
            return self.lm_head.panels[ids // 16, :, ids % 16]  # [N, K] gathered from [P, K, 16]
        return self.embed(ids)

    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, attend: Attend, logit_rows: torch.Tensor
    ) -> torch.Tensor:
        """embeds [N, hidden] (packed tokens of every row), positions [N] int64, logit_rows [R] int64
        (which tokens need next-token logits) -> logits [R, V]."""
        h = embeds.clone()  # the residual stream; the fused norm adds into it in place
        if self.pos_embed is not None:
            h = h + self.pos_embed(positions)
        rope: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.rotary is not None:
            cos, sin = self.rotary(h, positions[None])  # [1, N, D] each
            rope = cos[0], sin[0]  # [N, D]
        residual: torch.Tensor | None
        if (
            self.stack is not None
            and rope is not None
            and isinstance(attend, PoolAttention)
            and h.shape[0] <= self.stack_rows
            and h.dtype == rope[0].dtype == self.lm_head.dtype
        ):  # _layers whole in C++: the same kernels in the same order, no Python between them
            assert self.ops is not None
            h, residual = self.ops.run_stack(
                self.stack, h, *rope, attend.k, attend.v, attend.write, attend.slots, attend.lengths
            )
        else:
            h, residual = self._layers(h, rope, attend)
        if residual is not None:
            h = h + residual
        _, last = self.final_norm(h[logit_rows], None)  # [R, hidden]
        return self.lm_head(last)

    def _layers(
        self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, attend: Attend
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every layer over h [N, hidden] -> (h, the last sublayer's output, not yet added to h)."""
        n = h.shape[0]
        heads, kv_heads, d = self.num_heads, self.num_kv_heads, self.head_dim
        residual: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            h, x = layer.input_norm(h, residual)
            qkv = layer.qkv(x)  # [N, (H + 2 H_kv) * D]
            if rope is not None:
                self._rotate(qkv[:, : (heads + kv_heads) * d].view(n, heads + kv_heads, d), *rope)
            q = qkv[:, : heads * d].view(n, heads, d)
            k = qkv[:, heads * d : (heads + kv_heads) * d].view(n, kv_heads, d)
            v = qkv[:, (heads + kv_heads) * d :].view(n, kv_heads, d)
            h, x = layer.post_norm(h, layer.o(attend(i, q, k, v, layer.scaling)))
            up = layer.up(x)  # [N, I]
            residual = layer.down(self._activate(layer, x, up))
        return h, residual

    def _rotate(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotary embedding of q and k heads together, in place: qk [N, H + H_kv, D], cos/sin [N, D]."""
        if self.ops is not None and qk.dtype in KERNEL_DTYPES and cos.dtype == qk.dtype:
            self.ops.rotary(qk, cos, sin)
        else:
            cos, sin = cos[:, None], sin[:, None]  # [N, 1, D]
            qk.copy_(qk * cos + _rotate_half(qk) * sin)

    def _activate(self, layer: Layer, x: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """act(gate(x)) * up for gated MLPs, act(up) otherwise; [N, I]."""
        if layer.gate is None:
            return layer.act(up)
        gate = layer.gate(x)
        if self.ops is not None and layer.silu and gate.dtype in KERNEL_DTYPES:
            return self.ops.silu_mul(gate, up)
        return layer.act(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
