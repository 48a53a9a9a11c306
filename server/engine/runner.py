"""Owns the frozen model and runs its forward passes: prefixes, prefill of new rows, decode. No policy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from server.engine import kv
from server.models import LoadedModel


@dataclass
class PrefillRow:
    """One new row: either a key/value prefix or virtual-token embeddings, then input tokens."""

    input_ids: list[int]  # [L]
    prompt: torch.Tensor | None = None  # [P, H] virtual-token embeddings, run through the model here
    prefix_kv: torch.Tensor | None = None  # [num_layers, 2, H_kv, P, D] already computed

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix_kv is None else int(self.prefix_kv.shape[3])

    @property
    def chunk_len(self) -> int:
        """Tokens this row feeds through the model now."""
        return (0 if self.prompt is None else int(self.prompt.shape[0])) + len(self.input_ids)


@dataclass
class PrefillResult:
    cache: Cache  # per layer [B, H_kv, T, D], left-padded
    mask: torch.Tensor  # [B, T] int64
    positions: torch.Tensor  # [B] int64: position of each row's next token (P + L)
    logits: torch.Tensor  # [B, V] logits at each row's last token


class Runner:
    def __init__(self, lm: LoadedModel) -> None:
        self.model = lm.model
        self.device = lm.device
        self.dtype = lm.dtype
        self.embed = lm.model.get_input_embeddings()
        self.num_layers = lm.model.config.get_text_config().num_hidden_layers
        self.vocab_size = int(self.embed.weight.shape[0])

    @torch.inference_mode()
    def compute_prefixes(self, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Key/value prefixes of soft prompts ([P_i, H] each) in one forward pass at positions 0..P_i-1.

        Returns one [num_layers, 2, H_kv, P_i, D] per prompt.
        """
        rows = [PrefillRow(input_ids=[], prompt=p) for p in prompts]
        cache, mask, _ = self._forward_chunk(rows, headroom=0, keep_logits=False)
        t = mask.shape[1]
        layers = kv.layers_of(cache)
        out = []
        for i, p in enumerate(prompts):
            n = p.shape[0]
            per_layer = [torch.stack([layer.keys[i, :, t - n :], layer.values[i, :, t - n :]]) for layer in layers]
            out.append(torch.stack(per_layer).contiguous())  # [L, 2, H_kv, P, D]
        return out

    @torch.inference_mode()
    def prefill(self, rows: list[PrefillRow], headroom: int) -> PrefillResult:
        """One forward pass over all new rows, whatever their tasks, kinds and lengths.

        Row i's columns are [pad, prefix_i (cache) | pad, prompt_i?, input_i (this pass)], each part
        right-aligned; positions count only the row's own tokens, so they equal the solo positions.
        """
        cache, mask, logits = self._forward_chunk(rows, headroom, keep_logits=True)
        positions = torch.tensor([r.prefix_len + r.chunk_len for r in rows], dtype=torch.int64, device=self.device)
        assert logits is not None
        return PrefillResult(cache=cache, mask=mask, positions=positions, logits=logits)

    def _forward_chunk(self, rows: list[PrefillRow], headroom: int, keep_logits: bool) -> tuple[Cache, torch.Tensor, torch.Tensor | None]:
        b = len(rows)
        t0 = max(r.prefix_len for r in rows)  # cache columns before this pass
        t1 = max(r.chunk_len for r in rows)  # columns fed now
        hidden = self.embed.weight.shape[1]
        flat_ids = torch.tensor([i for r in rows for i in r.input_ids], dtype=torch.int64, device=self.device)
        token_embeds = self.embed(flat_ids).split([len(r.input_ids) for r in rows])  # each [L_i, H]
        embeds = torch.zeros(b, t1, hidden, dtype=self.dtype, device=self.device)  # [B, T1, H]
        mask = torch.zeros(b, t0 + t1, dtype=torch.int64, device=self.device)  # [B, T0+T1]
        position_ids = torch.zeros(b, t1, dtype=torch.int64, device=self.device)  # [B, T1]
        for i, row in enumerate(rows):
            p, n = row.prefix_len, row.chunk_len
            chunk = token_embeds[i] if row.prompt is None else torch.cat([row.prompt, token_embeds[i]])  # [n, H]
            embeds[i, t1 - n :] = chunk
            mask[i, t0 - p : t0] = 1
            mask[i, t0 + t1 - n :] = 1
            position_ids[i, t1 - n :] = torch.arange(p, p + n, device=self.device)
        if t0 > 0:
            cache = kv.from_prefixes([r.prefix_kv for r in rows], t0, t0 + t1 + headroom)
        else:
            cache = kv.empty_cache(self.num_layers, t1 + headroom)
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return cache, mask, (out.logits[:, -1] if keep_logits else None)

    @torch.inference_mode()
    def decode(self, cache: Cache, mask: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed one token per row. mask [B, T+1] already covers the new column; returns logits [B, V]."""
        out = self.model(
            input_ids=tokens[:, None],  # [B, 1]
            attention_mask=mask,
            position_ids=positions[:, None],  # [B, 1]
            cache=cache,
            use_cache=True,
        )
        return out.logits[:, -1]
