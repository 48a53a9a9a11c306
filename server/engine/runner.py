"""Owns the frozen model and runs its forward passes: prefill of new rows, decode of all rows. No policy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from server.engine import kv
from server.models import LoadedModel


@dataclass
class PrefillRow:
    """One new row: a soft prompt in front of input tokens."""

    prompt: torch.Tensor  # [P, H] virtual-token embeddings, model dtype and device
    input_ids: list[int]  # [L]


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
    def prefill(self, rows: list[PrefillRow], headroom: int) -> PrefillResult:
        """One forward pass over all new rows, whatever their tasks and lengths.

        Row i is laid out as [pad..., prompt_i (P_i), input_i (L_i)], right-aligned, with positions
        0..P_i+L_i-1 on its real tokens: the same numbers it would get alone.
        """
        lengths = [r.prompt.shape[0] + len(r.input_ids) for r in rows]
        b, t = len(rows), max(lengths)
        hidden = rows[0].prompt.shape[1]
        flat_ids = torch.tensor([i for r in rows for i in r.input_ids], dtype=torch.int64, device=self.device)
        token_embeds = self.embed(flat_ids).split([len(r.input_ids) for r in rows])  # each [L_i, H]
        embeds = torch.zeros(b, t, hidden, dtype=self.dtype, device=self.device)  # [B, T, H]
        mask = torch.zeros(b, t, dtype=torch.int64, device=self.device)  # [B, T]
        position_ids = torch.zeros(b, t, dtype=torch.int64, device=self.device)  # [B, T]
        for i, (row, n) in enumerate(zip(rows, lengths)):
            p = row.prompt.shape[0]
            embeds[i, t - n : t - n + p] = row.prompt
            embeds[i, t - n + p :] = token_embeds[i]
            mask[i, t - n :] = 1
            position_ids[i, t - n :] = torch.arange(n, device=self.device)
        cache = kv.empty_cache(self.num_layers, t + headroom)
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        positions = torch.tensor(lengths, dtype=torch.int64, device=self.device)
        return PrefillResult(cache=cache, mask=mask, positions=positions, logits=out.logits[:, -1])

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
