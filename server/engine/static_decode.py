"""A decode step of fixed shapes, recorded once per shape and replayed as a CUDA graph.

Why: the eager decode step has new shapes every step (rows join and leave, contexts grow), so it launches
some twenty kernels per layer from Python, and at 135M parameters a GPU waits on those launches (an H200
measured launch-bound at this size: docs/benchmarks.md). Here the rows are padded up to a bucket of rows and
each row's key table up to a bucket of columns, every input lives in one fixed device buffer, and the step's
kernels for each (rows, columns) bucket are recorded once at start and replayed with a single launch. Only
decode is static: prefill feeds a different number of tokens every time.

Padding: a padded row feeds token 0 at position 0, writes its key and value into NULL_SLOT (in the
reserved block) and sees only that slot; padded columns of a real row read NULL_SLOT and are masked
out. Every op of the step is row-wise, so padded rows never touch real rows' results; what they
write into NULL_SLOT is finite (token 0's keys), and masked columns weigh 0.

Inputs reach the device in one copy from one of two pinned host buffers used in turn (a DMA the host
does not wait for), so the step's one host sync stays the engine's read of the sampled tokens.

On a CPU the same static step runs eagerly (`Acceleration.static_decode=True`): there the native
kernels already take any shape, so it is there to be tested. tests/test_static_decode.py checks it
token for token against the eager step, replays it through a traced graph of the step (host values read
at record time stay frozen, as in a capture; what the engine reads after a replay), and traces it whole
with torch.compile, no graph break and no recompile across steps: the conditions a CUDA graph capture
needs. The capture itself (`CudaGraphRecorder`: streams, the memory pool) needs a GPU.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from server.engine.pool import NULL_SLOT


def row_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, up to max_rows (always included)."""
    sizes = [b for b in (1, 2, 4) if b < max_rows] + list(range(8, max_rows, 8))
    return sizes + [max_rows]


def width_buckets(max_context: int | None, smallest: int = 64, largest: int = 8192) -> list[int]:
    """Key columns per row: powers of two from `smallest` up to the first that holds max_context."""
    top = largest if max_context is None else max(smallest, max_context)
    sizes = [smallest]
    while sizes[-1] < top:
        sizes.append(sizes[-1] * 2)
    return sizes


def bucket(sizes: Sequence[int], n: int) -> int | None:
    """The smallest size >= n, or None past the largest."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


@dataclass(frozen=True)
class StaticInputs:
    """Views of the one input buffer for a (rows, width) bucket: fixed addresses for a graph."""

    rows: int  # R
    width: int  # W
    tokens: torch.Tensor  # [R] int64, last generated token of each row
    positions: torch.Tensor  # [R] int64
    write: torch.Tensor  # [R] int64, slot of each row's new key/value
    lengths: torch.Tensor  # [R] int64, key columns each row sees (its context + the new token)
    keys: torch.Tensor  # [R, W] int64, slot of each key column, padding -> NULL_SLOT
    all_rows: torch.Tensor  # [R] int64, 0..R-1 (every row wants logits)


class Recorder(Protocol):
    """Records a step once; returns (replay: runs it again on the same buffers, its output tensor,
    which every replay overwrites)."""

    def record(self, step: Callable[[], torch.Tensor]) -> tuple[Callable[[], object], torch.Tensor]: ...


class CudaGraphRecorder:
    """Records steps as CUDA graphs that share one memory pool (one replays at a time)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool: Any = None

    def record(self, step: Callable[[], torch.Tensor]) -> tuple[Callable[[], object], torch.Tensor]:
        # A few eager runs on a side stream first (cuBLAS and the allocator set themselves up outside
        # the capture), then the capture itself, on the model's device (cuda:N need not be the current one).
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = step()
        if self.pool is None:
            self.pool = graph.pool()

        def replay() -> None:
            with torch.cuda.device(self.device):
                graph.replay()

        return replay, out


class StaticDecode:
    """Buckets, the input buffer, and one recorded step per bucket (CUDA) or the same step run eagerly."""

    def __init__(
        self,
        step: Callable[[StaticInputs], torch.Tensor],
        device: torch.device,
        max_rows: int,
        max_context: int | None,
        recorder: Recorder | None,
    ) -> None:
        """step(inputs) -> logits [R, V]: the decode forward over the buffers' views, shapes fixed by the
        bucket; recorder: CudaGraphRecorder, or None to run the step eagerly."""
        self.step = step
        self.device = device
        self.rows = row_buckets(max_rows)
        self.widths = width_buckets(max_context)
        r, w = self.rows[-1], self.widths[-1]
        self.buffer = torch.zeros(4 * r + r * w, dtype=torch.int64, device=device)
        # Two host buffers the step's inputs are written into, in turn: pinned on a GPU, so the copy to
        # `buffer` is a DMA the host does not wait for, and one step's copy can still be in flight while
        # the next step's inputs are written into the other.
        pin = device.type == "cuda"
        self._host = [torch.zeros(self.buffer.shape[0], dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._turn = 0
        self.arange = torch.arange(r, dtype=torch.int64, device=device)
        self.recorder = recorder
        self._inputs: dict[tuple[int, int], StaticInputs] = {}
        self._recorded: dict[tuple[int, int], tuple[Callable[[], object], torch.Tensor]] = {}
        self.replays = 0  # steps served by a recorded graph (counters for /stats and tests)
        self.eager_steps = 0  # static steps run eagerly (CPU, or graphs off)

    def inputs(self, rows: int, width: int) -> StaticInputs:
        key = (rows, width)
        if key not in self._inputs:
            b, r = self.buffer, rows
            self._inputs[key] = StaticInputs(
                rows=rows,
                width=width,
                tokens=b[0:r],
                positions=b[r : 2 * r],
                write=b[2 * r : 3 * r],
                lengths=b[3 * r : 4 * r],
                keys=b[4 * r : 4 * r + r * width].view(r, width),
                all_rows=self.arange[:r],
            )
        return self._inputs[key]

    def decode(
        self, tokens: list[int], positions: list[int], key_tables: list[list[int]]
    ) -> torch.Tensor | None:
        """One step for B = len(tokens) rows: key_tables[i] = row i's slots, its new token's last;
        returns logits [B, V] (a view of a fixed buffer: valid until the next step), or None when the
        rows or a key table are past the largest bucket (the caller runs the eager step)."""
        n = len(tokens)
        rows = bucket(self.rows, n)
        width = bucket(self.widths, max(len(t) for t in key_tables))
        if rows is None or width is None:
            return None
        pad = rows - n
        flat: list[int] = tokens + [0] * pad
        flat += positions + [0] * pad
        flat += [t[-1] for t in key_tables] + [NULL_SLOT] * pad
        flat += [len(t) for t in key_tables] + [1] * pad
        for t in key_tables:
            flat += t
            flat += [NULL_SLOT] * (width - len(t))
        flat += [NULL_SLOT] * (width * pad)
        host, self._turn = self._host[self._turn], 1 - self._turn
        host.numpy()[: len(flat)] = flat  # one conversion of the list, into the pinned buffer
        self.buffer[: len(flat)].copy_(host[: len(flat)], non_blocking=True)
        return self._run(rows, width)[:n]

    def _run(self, rows: int, width: int) -> torch.Tensor:
        if self.recorder is not None:
            if (rows, width) not in self._recorded:
                self._record(rows, width)
            replay, out = self._recorded[(rows, width)]
            replay()
            self.replays += 1
            return out
        self.eager_steps += 1
        return self.step(self.inputs(rows, width))

    def record_all(self) -> None:
        """Record every bucket's step now (at start), largest first so a shared pool is sized once."""
        if self.recorder is None:
            return
        for rows in reversed(self.rows):
            for width in reversed(self.widths):
                self._record(rows, width)

    def _record(self, rows: int, width: int) -> None:
        assert self.recorder is not None
        inputs = self.inputs(rows, width)
        self._pad(inputs)
        self._recorded[(rows, width)] = self.recorder.record(lambda: self.step(inputs))

    def _pad(self, inputs: StaticInputs) -> None:
        """Every row a padding row: what the recording runs write goes to NULL_SLOT only."""
        inputs.tokens.zero_()
        inputs.positions.zero_()
        inputs.write.fill_(NULL_SLOT)
        inputs.lengths.fill_(1)
        inputs.keys.fill_(NULL_SLOT)

    @property
    def recorded(self) -> int:
        return len(self._recorded)
