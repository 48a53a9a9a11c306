"""The running batch: its rows, their key/value cache and per-row tensors; rows join and leave here."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from transformers.cache_utils import Cache

from server.engine import kv
from server.engine.request import Request
from server.engine.sampler import SamplingTensors


@dataclass
class Batch:
    """Row i of every tensor belongs to requests[i]. The cache is left-padded: row i's tokens are the
    columns where mask[i] == 1; positions are per row, so padding never shifts a row's positions."""

    requests: list[Request]
    cache: Cache  # per layer [B, H_kv, T, D]
    mask: torch.Tensor  # [B, T] int64, 1 = a real (virtual or input or generated) token
    positions: torch.Tensor  # [B] int64, position of the token fed next
    next_tokens: torch.Tensor  # [B] int64, the token fed at the next decode step
    steps: torch.Tensor  # [B] int64, tokens generated so far
    sampling: SamplingTensors
    seen: torch.Tensor | None  # [B, V] bool, tokens in each row's input/output (repetition penalty)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def headroom(self) -> int:
        """Columns the cache may still need: the longest remaining generation among the rows."""
        return max(r.params.max_new_tokens - len(r.output_ids) for r in self.requests)

    def append_step(self, tokens: torch.Tensor) -> None:
        """Record the tokens just chosen [B]; the decode step that feeds them extends the mask."""
        self.next_tokens = tokens
        self.steps = self.steps + 1
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)

    def extend_mask(self) -> None:
        """Open the column for the token the next decode step feeds."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)  # [B, T+1]

    def filter(self, keep: list[int]) -> "Batch":
        """A batch of only the rows `keep`, trimming columns that no remaining row uses."""
        rows = torch.tensor(keep, device=self.mask.device, dtype=torch.int64)
        mask = self.mask[rows]
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        requests = [self.requests[i] for i in keep]
        headroom = max(r.params.max_new_tokens - len(r.output_ids) for r in requests)
        return Batch(
            requests=requests,
            cache=kv.select_rows(self.cache, rows, start, headroom),
            mask=mask[:, start:],
            positions=self.positions[rows],
            next_tokens=self.next_tokens[rows],
            steps=self.steps[rows],
            sampling=SamplingTensors(**{f.name: getattr(self.sampling, f.name)[rows] for f in fields(SamplingTensors)}),
            seen=None if self.seen is None else self.seen[rows],
        )

    @staticmethod
    def concat(a: "Batch", b: "Batch") -> "Batch":
        """Rows of a then rows of b; the shorter cache and mask are left-padded."""
        t = max(a.mask.shape[1], b.mask.shape[1])

        def pad(mask: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(mask, (t - mask.shape[1], 0))

        if a.seen is None and b.seen is None:
            seen = None
        else:
            vocab = (a.seen if a.seen is not None else b.seen).shape[1]  # type: ignore[union-attr]
            seen = torch.cat([x.seen if x.seen is not None else x.mask.new_zeros(len(x), vocab, dtype=torch.bool) for x in (a, b)])
        return Batch(
            requests=a.requests + b.requests,
            cache=kv.concat(a.cache, b.cache, max(a.headroom, b.headroom)),
            mask=torch.cat([pad(a.mask), pad(b.mask)]),
            positions=torch.cat([a.positions, b.positions]),
            next_tokens=torch.cat([a.next_tokens, b.next_tokens]),
            steps=torch.cat([a.steps, b.steps]),
            sampling=SamplingTensors(**{f.name: torch.cat([getattr(a.sampling, f.name), getattr(b.sampling, f.name)]) for f in fields(SamplingTensors)}),
            seen=seen,
        )
