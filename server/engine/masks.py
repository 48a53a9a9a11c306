"""Token masks of constrained rows, filled while the forward pass runs.

The mask of a row depends only on the tokens it has consumed, so it can be computed before its
logits exist. The engine calls `start(rows)` just before a forward pass: a worker thread fills one
bitmask row per constrained row (llguidance releases the GIL and fills rows in parallel), while the
engine thread runs the model; `Pending.wait()` after the pass returns the bitmask for the sampler.
Rows without a constraint keep an all-allowed row (-1: every bit set), so the batch's shape, and a
GPU's static buffers, stay the same whatever mix of rows it holds.

The worker only calls into llguidance: it runs no torch operation, so it never joins torch's
OpenMP team (server/engine/engine.py, the OpenMP note). The bitmask tensor is made on the engine thread.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass

import llguidance
import torch

from server.engine.request import Request


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


@dataclass
class Pending:
    """A mask fill under way for one pass's rows."""

    bitmask: torch.Tensor  # [B, W] int32, W = ceil(V / 32): bit j of word w allows token 32 w + j
    future: concurrent.futures.Future[float] | None  # the fill's own seconds
    started: float

    def wait(self) -> tuple[torch.Tensor, float, float]:
        """(bitmask, seconds the fill took, seconds the engine waited for it after the pass)."""
        before = time.perf_counter()
        fill = self.future.result() if self.future is not None else 0.0
        return self.bitmask, fill, time.perf_counter() - before


class MaskWorker:
    def __init__(self, vocab_size: int, threads: int | None = None) -> None:
        self.words = bitmask_words(vocab_size)
        self._executor = llguidance.LLExecutor(threads)
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="softmux-masks")

    def start(self, rows: list[Request]) -> Pending | None:
        """Start filling the masks of `rows` (None when no row is constrained)."""
        constrained = [(r.matcher, i) for i, r in enumerate(rows) if r.matcher is not None]
        if not constrained:
            return None
        bitmask = torch.full((len(rows), self.words), -1, dtype=torch.int32)
        pointer, row_bytes = bitmask.data_ptr(), self.words * 4

        def fill() -> float:
            began = time.perf_counter()
            self._executor.unsafe_compute_mask_ptr(constrained, pointer, row_bytes, len(rows))
            return time.perf_counter() - began

        return Pending(bitmask, self._worker.submit(fill), time.perf_counter())

    def close(self) -> None:
        self._worker.shutdown(wait=True)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bitmask [B, W] int32 -> allowed [B, V] bool."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)  # [32]
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [B, W, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_mask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [B, V] float -> a copy with the tokens the rows' grammars forbid set to -inf."""
    allowed = allowed_tokens(bitmask.to(logits.device, non_blocking=True), logits.shape[-1])
    return logits.masked_fill(~allowed, float("-inf"))
