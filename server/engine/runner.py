"""Owns the model's tensors: the decoder weights, the key/value pool, and the forward passes. No policy.

The pool is one tensor per layer for keys and one for values, `[slots, H_kv, D]`; which slots hold
which sequence is decided by the scheduler (server/engine/pool.py). A forward pass feeds the new
tokens of every row packed together, writes their keys and values into the rows' slots, and lets
each row attend to its slots (its task's shared soft-prompt prefix first, then its own tokens).
Decode steps can instead run at fixed shapes, recorded as CUDA graphs (server/engine/static_decode.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from server.config import default_cache_dir
from server.engine import kernels
from server.engine.decoder import Attend, Decoder, PoolAttention
from server.engine.pool import NULL_SLOT, BlockPool, SeqBlocks
from server.engine.prefix_cache import PrefixEntry
from server.engine.request import Request
from server.engine.static_decode import CudaGraphRecorder, StaticDecode, StaticInputs
from server.engine.transfer import device_tensor
from server.models import LoadedModel
from server.prompts.types import SoftPrompt


@dataclass(frozen=True)
class Acceleration:
    """Speed-ups, each with a flag to turn it off; results agree with the plain path to float
    rounding (tests/test_kernels.py, tests/test_static_decode.py, and the reference tests run both ways)."""

    prepack_weights: bool = (
        True  # CPU: weights also repacked for decode-sized inputs (blocks.Linear): one more copy in memory
    )
    native_kernels: bool = True  # CPU: server/engine/csrc/, built at start (server/engine/kernels.py)
    native_layers: bool = True  # with native_kernels: a pass's layers in one C++ call (decoder.Decoder.stack)
    kernel_dir: Path = field(default_factory=default_cache_dir)  # where the kernels are built and cached
    cuda_graphs: bool = (
        True  # CUDA: decode steps at bucketed fixed shapes, recorded at start as CUDA graphs and replayed
    )
    # The fixed-shape decode step without graphs (run eagerly): None = wherever graphs are recorded;
    # True also on a CPU (tests; no speed-up there: the native kernels take any shape).
    static_decode: bool | None = None
    # CPU with the native kernels: each weight kept once, in the panel layout, the transformers model's
    # own copy released (it can no longer run). For a server's own model only (Service sets it).
    one_copy: bool = False
    # "int8": the decoder layers' linears quantized at load (blocks.Linear); None: the model's dtype.
    quantize: str | None = None


@dataclass
class Chunk:
    """New tokens of one sequence fed in this pass."""

    seq: SeqBlocks
    embeds: torch.Tensor  # [n, hidden]
    start: int  # position of the first new token


@dataclass
class _Layout:
    """Index tensors of one pass, shared by every layer."""

    write: torch.Tensor  # [N] slot of each new token
    keys: torch.Tensor  # [B * T] slot of each key column, row-major, padding -> NULL_SLOT
    rows: int  # B
    width: int  # T, key columns per row
    queries: int  # Tq, query rows per row (1 for decode)
    q_index: torch.Tensor | None  # [N] where each packed token sits in [B * Tq] (None: decode, N == B)
    mask: (
        torch.Tensor | None
    )  # decode: [H_kv * B, 1, T] additive float (None: the native kernel); prefill: [B, 1, Tq, T] bool
    lengths: torch.Tensor  # [B] key columns in use per row
    # With the native kernel every query token is a row (B = N, Tq = 1), prefill included.


def _seq(request: Request) -> SeqBlocks:
    assert request.kv is not None, "a running row has its blocks"
    return request.kv


def default_kv_cache_bytes(device: torch.device) -> int:
    """A quarter of available memory, at most 4 GiB, on CPU; half of the free memory on a GPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    available = 8 << 30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return min(available // 4, 4 << 30)


def kv_bytes_per_token(lm: LoadedModel, decoder: Decoder) -> int:
    elem = torch.empty((), dtype=lm.dtype).element_size()
    return decoder.num_layers * 2 * decoder.num_kv_heads * decoder.head_dim * elem


class Runner:
    def __init__(
        self,
        lm: LoadedModel,
        kv_cache_bytes: int,  # 0: default_kv_cache_bytes, measured after the weights are packed
        block_size: int = 16,
        max_context: int | None = None,
        accel: Acceleration | None = None,
        max_rows: int = 32,
    ) -> None:
        """max_rows: the most rows a decode step runs (the scheduler's batch size), the largest bucket."""
        accel = accel or Acceleration()
        self.lm = lm
        self.device = lm.device
        self.dtype = lm.dtype
        self.ops = (
            kernels.load(accel.kernel_dir) if accel.native_kernels and self.device.type == "cpu" else None
        )
        self.decoder = Decoder(
            lm.model,
            max_context,
            pack=accel.prepack_weights,
            ops=self.ops,
            native_layers=accel.native_layers,
            one_copy=accel.one_copy and accel.prepack_weights,
            quantize=accel.quantize,
        )
        self.vocab_size = self.decoder.vocab_size
        self.bytes_per_token = kv_bytes_per_token(lm, self.decoder)
        # 0: sized from the memory left once the weights are in their final layout
        kv_cache_bytes = kv_cache_bytes or default_kv_cache_bytes(self.device)
        num_blocks = max(2, kv_cache_bytes // (self.bytes_per_token * block_size))
        self.pool = BlockPool(num_blocks, block_size)
        shape = (
            self.decoder.num_layers,
            self.decoder.num_kv_heads,
            num_blocks * block_size,
            self.decoder.head_dim,
        )
        # Uninitialised, so the memory is only committed as blocks get used: every slot is written
        # before it is read, except the reserved block's, which padding reads (masked out) and padding
        # rows of a static step write: zeroed, so it holds finite values from the start.
        self.k = torch.empty(shape, dtype=self.dtype, device=self.device)  # [L, H_kv, slots, D]
        self.v = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.k[:, :, :block_size].zero_()
        self.v[:, :, :block_size].zero_()
        graphs = accel.cuda_graphs and self.device.type == "cuda"
        static = graphs if accel.static_decode is None else accel.static_decode
        recorder = CudaGraphRecorder(self.device) if graphs else None
        self.static = (
            StaticDecode(self._static_step, self.device, max_rows, max_context, recorder) if static else None
        )
        if self.static is not None:
            with torch.inference_mode():
                self.static.record_all()  # at start, so that no request pays for it

    @property
    def block_bytes(self) -> int:
        return self.bytes_per_token * self.pool.block_size

    def weight_bytes(self) -> int:
        """Bytes the model's weights take in this process: every distinct storage of the transformers
        model's parameters and of the decoder's own layouts (panels, oneDNN copies), each counted once."""
        tensors: list[torch.Tensor] = list(self.lm.model.parameters())
        for lin in self.decoder.linears():
            layouts = (lin.weight, lin.panels, lin.scales, lin.packed, *(lin.int8 or ()))
            tensors += [t for t in layouts if t is not None]
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.numel()
        }
        return sum(storages.values())

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks of keys and values, (source, destination): a forked sample's own copy of the
        block its parent is still writing into."""
        bs = self.pool.block_size
        for src, dst in pairs:
            self.k[:, :, dst * bs : (dst + 1) * bs] = self.k[:, :, src * bs : (src + 1) * bs]
            self.v[:, :, dst * bs : (dst + 1) * bs] = self.v[:, :, src * bs : (src + 1) * bs]

    # ---- passes ------------------------------------------------------------------------------
    @torch.inference_mode()
    def fill_prefixes(self, items: list[tuple[PrefixEntry, SoftPrompt]]) -> None:
        """Write soft prompts' keys and values into their (new) prefix entries, in a pass of their own."""
        chunks = self._prefix_chunks(items)
        if chunks:
            self._forward(chunks, logit_from=None)

    def _prefix_chunks(self, items: list[tuple[PrefixEntry, SoftPrompt]]) -> list[Chunk]:
        """Prefix-tuning prompts are written as they are; embedding prompts become chunks at
        positions 0..P-1 for the next forward pass (returned)."""
        chunks = []
        for entry, prompt in items:
            if prompt.prefix_kv is not None:
                self._write_prefix_kv(entry.seq, prompt.prefix_kv)
            else:
                assert prompt.embeddings is not None
                chunks.append(Chunk(seq=entry.seq, embeds=prompt.embeddings, start=0))
        return chunks

    def _write_prefix_kv(self, seq: SeqBlocks, kv: torch.Tensor) -> None:
        """kv [L, 2, H_kv, P, D] -> the sequence's next P slots in every layer."""
        p = kv.shape[3]
        slots = device_tensor(seq.new_slots(p), torch.int64, self.device)
        self.k.index_copy_(2, slots, kv[:, 0].to(self.dtype))  # kv[:, 0]: [L, H_kv, P, D]
        self.v.index_copy_(2, slots, kv[:, 1].to(self.dtype))

    @torch.inference_mode()
    def prefill(
        self, requests: list[Request], new_prefixes: Sequence[tuple[PrefixEntry, SoftPrompt]] = ()
    ) -> torch.Tensor:
        """Feed each request's uncomputed tokens (its input, plus what it generated before a
        preemption, less the blocks found in the token block cache); returns next-token logits [B, V].

        Soft-prompt prefixes not resident yet are computed in the same pass, ahead of the rows: every
        layer writes all new keys and values before any row reads its slots, so a row attends to its
        task's prefix computed a moment earlier in the same layer (one weight read instead of two)."""
        prefix_chunks = self._prefix_chunks(list(new_prefixes))
        seqs = [_seq(r) for r in requests]
        ids = [(r.input_ids + r.output_ids)[s.own_len :] for r, s in zip(requests, seqs)]
        flat = device_tensor([t for row in ids for t in row], torch.int64, self.device)
        embeds = self.decoder.embed_tokens(flat).split([len(row) for row in ids])  # each [L_i, hidden]
        chunks = [
            Chunk(seq=s, embeds=e, start=r.virtual_tokens + s.own_len)
            for r, s, e in zip(requests, seqs, embeds)
        ]
        return self._forward(prefix_chunks + chunks, logit_from=len(prefix_chunks))

    @torch.inference_mode()
    def decode(self, requests: list[Request]) -> torch.Tensor:
        """Feed each row its last generated token; returns next-token logits [B, V]."""
        seqs = [_seq(r) for r in requests]
        if self.static is not None:
            tables = [s.slots() + s.new_slots(1) for s in seqs]  # each row's keys, its new token's last
            positions = [r.virtual_tokens + s.own_len for r, s in zip(requests, seqs)]
            logits = self.static.decode([r.output_ids[-1] for r in requests], positions, tables)
            if logits is not None:
                return logits
        tokens = device_tensor([r.output_ids[-1] for r in requests], torch.int64, self.device)
        embeds = self.decoder.embed_tokens(tokens)  # [B, hidden]
        chunks = [
            Chunk(seq=s, embeds=embeds[i : i + 1], start=r.virtual_tokens + s.own_len)
            for i, (r, s) in enumerate(zip(requests, seqs))
        ]
        return self._forward(chunks, logit_from=0)

    def _forward(self, chunks: list[Chunk], logit_from: int | None) -> torch.Tensor:
        """One pass over the chunks; logits [B - logit_from, V] of the last token of chunks[logit_from:]
        (None: no logits, an empty tensor)."""
        lengths = [int(c.embeds.shape[0]) for c in chunks]
        layout = self._layout(chunks, lengths)
        positions = device_tensor(
            [c.start + j for c, n in zip(chunks, lengths) for j in range(n)], torch.int64, self.device
        )
        embeds = torch.cat([c.embeds for c in chunks]).to(self.dtype)  # [N, hidden]
        ends = device_tensor(lengths, torch.int64, self.device).cumsum(0) - 1  # [B] last token of each row
        rows = ends[:0] if logit_from is None else ends[logit_from:]
        return self.decoder.forward(embeds, positions, self._attention(layout), rows)

    def _static_step(self, inputs: StaticInputs) -> torch.Tensor:
        """The decode forward over a bucket's fixed buffers -> logits [R, V]. Reads no host values,
        so that it can be recorded once and replayed (no syncs, no shapes that depend on data)."""
        embeds = self.decoder.embed_tokens(inputs.tokens).to(self.dtype)  # [R, hidden]
        mask = None if self.ops is not None else self._decode_mask(inputs.lengths, inputs.width)
        layout = _Layout(
            write=inputs.write,
            keys=inputs.keys.view(-1),
            rows=inputs.rows,
            width=inputs.width,
            queries=1,
            q_index=None,
            mask=mask,
            lengths=inputs.lengths,
        )
        return self.decoder.forward(embeds, inputs.positions, self._attention(layout), inputs.all_rows)

    # ---- attention over the pool -----------------------------------------------------------
    def _layout(self, chunks: list[Chunk], lengths: list[int]) -> _Layout:
        write = [s for c, n in zip(chunks, lengths) for s in c.seq.new_slots(n)]
        contexts = [c.seq.length for c in chunks]  # keys already cached per row
        totals = [ctx + n for ctx, n in zip(contexts, lengths)]
        width = max(totals)
        keys = []
        for c, n, total in zip(chunks, lengths, totals):
            slots = c.seq.slots() + c.seq.new_slots(n)
            keys.extend(slots + [NULL_SLOT] * (width - total))
        dev = self.device
        write_t = device_tensor(write, torch.int64, dev)
        keys_t = device_tensor(keys, torch.int64, dev)  # [B * T]
        build = self._kernel_layout if self.ops is not None else self._torch_layout
        return build(write_t, keys_t, contexts, lengths, width)

    def _kernel_layout(
        self, write: torch.Tensor, keys: torch.Tensor, contexts: list[int], lengths: list[int], width: int
    ) -> _Layout:
        """The native kernel's: one query per row and each row's visible key count; no mask."""
        dev = self.device
        if max(lengths) == 1:  # decode
            key_lengths = torch.tensor([ctx + 1 for ctx in contexts], device=dev)
        else:
            # Every query token is a row of its own: its sequence's slots, of which it sees those up to
            # itself. A token's attention then is the same arithmetic alone or in any batch, and the same
            # as a decode step's.
            keys = (
                keys.view(len(lengths), width)
                .repeat_interleave(torch.tensor(lengths, device=dev), dim=0)
                .view(-1)
            )
            key_lengths = torch.cat(
                [torch.arange(ctx + 1, ctx + n + 1, device=dev) for ctx, n in zip(contexts, lengths)]
            )
        rows = int(write.shape[0])
        return _Layout(
            write=write,
            keys=keys,
            rows=rows,
            width=width,
            queries=1,
            q_index=None,
            mask=None,
            lengths=key_lengths,
        )

    def _torch_layout(
        self, write: torch.Tensor, keys: torch.Tensor, contexts: list[int], lengths: list[int], width: int
    ) -> _Layout:
        """The torch path's: padded rows and a mask (decode: additive for baddbmm; prefill:
        causal for SDPA)."""
        dev = self.device
        b, queries = len(lengths), max(lengths)
        key_lengths = device_tensor([ctx + n for ctx, n in zip(contexts, lengths)], torch.int64, dev)
        total_t = key_lengths[:, None]  # [B, 1]
        col = torch.arange(width, device=dev)[None, :]  # [1, T]
        q_index: torch.Tensor | None = None
        if queries == 1:
            mask = self._decode_mask(key_lengths, width)
        else:
            ctx_t = device_tensor(contexts, torch.int64, dev)[:, None, None]  # [B, 1, 1]
            qi = torch.arange(queries, device=dev)[None, :, None]  # [1, Tq, 1]
            mask = ((col[:, None, :] < total_t[:, :, None]) & (col[:, None, :] <= ctx_t + qi))[
                :, None
            ]  # [B, 1, Tq, T]
            q_index = device_tensor(
                [i * queries + j for i, n in enumerate(lengths) for j in range(n)], torch.int64, dev
            )
        return _Layout(
            write=write,
            keys=keys,
            rows=b,
            width=width,
            queries=queries,
            q_index=q_index,
            mask=mask,
            lengths=key_lengths,
        )

    def _decode_mask(self, lengths: torch.Tensor, width: int) -> torch.Tensor:
        """lengths [B] visible key columns per row -> additive mask [H_kv * B, 1, T=width],
        the bmm batch order."""
        hidden = torch.arange(width, device=self.device)[None, :] >= lengths[:, None]  # [B, T]
        dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        mask = torch.zeros(hidden.shape[0], 1, width, dtype=dtype, device=self.device)
        mask.masked_fill_(hidden[:, None, :], float("-inf"))
        return mask.repeat(self.decoder.num_kv_heads, 1, 1)

    def _attention(self, lay: _Layout) -> Attend:
        """The pass's attention: the native kernel reading the pool in place (no mask: one query per
        row; it writes k/v itself), else torch ops over gathered keys."""
        if lay.mask is None:
            assert self.ops is not None
            return PoolAttention(
                self.ops, self.k, self.v, lay.write, lay.keys.view(lay.rows, lay.width), lay.lengths
            )
        return lambda i, q, k, v, s: self._attend(lay, i, q, k, v, s)

    def _attend(
        self, lay: _Layout, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """q [N, H, D], k/v [N, H_kv, D] of the new tokens -> attention output [N, H * D], torch ops."""
        kpool, vpool = self.k[layer], self.v[layer]  # [H_kv, slots, D]
        kpool.index_copy_(1, lay.write, k.transpose(0, 1))
        vpool.index_copy_(1, lay.write, v.transpose(0, 1))
        b, t = lay.rows, lay.width
        n, h, d = q.shape
        hk = k.shape[1]
        # One gather per layer; (H_kv, B) as the batch dims keeps it contiguous for bmm: no more copies.
        keys = kpool.index_select(1, lay.keys).view(hk * b, t, d)  # [H_kv * B, T, D]
        values = vpool.index_select(1, lay.keys).view(hk * b, t, d)
        if lay.q_index is None:  # decode: one query per row; the G query heads of a KV head share its keys
            g = h // hk
            qg = q.view(b, hk, g, d).transpose(0, 1).reshape(hk * b, g, d)  # [H_kv * B, G, D]
            if qg.dtype in (torch.bfloat16, torch.float16):  # scores and softmax in float32, as SDPA does
                qg, keys, values = qg.float(), keys.float(), values.float()
            assert lay.mask is not None
            scores = torch.baddbmm(lay.mask, qg, keys.transpose(1, 2), alpha=scaling)  # [H_kv * B, G, T]
            out = torch.bmm(scores.softmax(dim=-1), values).to(q.dtype)  # [H_kv * B, G, D]
            return out.view(hk, b, g, d).transpose(0, 1).reshape(b, h * d)
        tq = lay.queries
        qp = (
            q.new_zeros(b * tq, h, d).index_copy_(0, lay.q_index, q).view(b, tq, h, d).transpose(1, 2)
        )  # [B, H, Tq, D]
        out = F.scaled_dot_product_attention(
            qp,
            keys.view(hk, b, t, d).transpose(0, 1),
            values.view(hk, b, t, d).transpose(0, 1),
            attn_mask=lay.mask,
            scale=scaling,
            enable_gqa=hk != h,
        )  # [B, H, Tq, D]
        return out.transpose(1, 2).reshape(b * tq, h * d).index_select(0, lay.q_index)
