"""Vectorised per-row sampling: every row its own logit bias, penalties, temperature, top-k, top-p and seed.

The order, vLLM's: the structured-output mask, logit_bias, the repetition penalty (over input and output), the
frequency and presence penalties (over generated tokens), temperature, top-k and top-p, then the draw.

Seeded sampling must not depend on the batch, so randomness is not drawn from a shared generator:
each row's noise is a hash of (seed, step, token id). That makes a seeded row's draws identical
alone or in any batch, and keeps the whole step one vectorised computation (Gumbel-max trick:
argmax(log p + Gumbel noise) is an exact sample from p).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.blocks import KERNEL_DTYPES
from server.engine.kernels import Kernels
from server.engine.masks import apply_mask
from server.engine.request import Request
from server.engine.transfer import device_tensor

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A well-mixing 32-bit integer hash (lowbias32), computed in int64 to avoid sign trouble."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def row_uniforms(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform(0, 1) noise [B, V] that depends only on each row's (seed, step) and the token id."""
    seeds = seeds.to(torch.int64)
    key = _hash32(
        _hash32(seeds) ^ _hash32((seeds >> 32) + 0x9E3779B9) ^ _hash32(steps.to(torch.int64) * 0x85EBCA6B)
    )  # [B]
    token = torch.arange(vocab, device=seeds.device, dtype=torch.int64)  # [V]
    bits = _hash32(key[:, None] ^ _hash32(token * 0xC2B2AE35)[None, :])  # [B, V]
    return ((bits >> 8).to(torch.float64) + 0.5) / float(1 << 24)  # in (0, 1), never 0 or 1


@dataclass
class SamplingTensors:
    """Per-row sampling parameters, one entry per batch row."""

    sampling: torch.Tensor  # [B] bool: False rows are greedy
    temperature: torch.Tensor  # [B] float
    top_k: torch.Tensor  # [B] int64, 0 = off
    top_p: torch.Tensor  # [B] float, 1 = off
    repetition_penalty: torch.Tensor  # [B] float, 1 = off
    seeds: torch.Tensor  # [B] int64
    frequency_penalty: torch.Tensor | None = None  # [B] float, 0 = off (None: no row has one)
    presence_penalty: torch.Tensor | None = None  # [B] float, 0 = off


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty (as in transformers): seen tokens' logits divided (if > 0) or multiplied by it.

    logits [B, V] float, seen [B, V] bool, penalty [B].
    """
    p = penalty[:, None].to(logits.dtype)
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def apply_openai_penalties(
    logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor
) -> torch.Tensor:
    """OpenAI's formula: logit[j] -= count[j] * frequency + (count[j] > 0) * presence, counts over the
    generated tokens. logits [B, V] float, counts [B, V] float, frequency and presence [B]."""
    return logits - counts * frequency[:, None] - (counts > 0).to(logits.dtype) * presence[:, None]


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k and nucleus (top-p) to -inf. logits [B, V]."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    rank = torch.arange(vocab, device=logits.device)[None, :]  # [1, V]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))[:, None]
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
    mass_before = probs.cumsum(dim=-1) - probs
    # Rows with top_p == 1 are off: float32 mass can reach 1.0 before the tail and must not cut it.
    drop |= (mass_before >= top_p[:, None].to(probs.dtype)) & (top_p[:, None] < 1.0)
    drop[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


@dataclass(frozen=True)
class BatchFlags:
    """What the batch's rows need, known on the host: skipping work (and device syncs) for the rest."""

    sampling: bool  # some row samples
    penalty: bool  # some row has a repetition, frequency or presence penalty or a logit bias
    filtering: bool  # some sampling row uses top-k or top-p
    logprobs: bool  # some row wants log-probabilities (streams report them)
    masked: bool = False  # some row has a structured output's token mask

    @classmethod
    def of(cls, params: SamplingTensors) -> BatchFlags:
        """Derived from the tensors (syncs a device); the engine builds them from its requests instead."""
        sampling = bool(params.sampling.any())
        return cls(
            sampling=sampling,
            penalty=bool((params.repetition_penalty != 1.0).any()) or params.frequency_penalty is not None,
            filtering=sampling and bool(((params.top_k > 0) | (params.top_p < 1.0)).any()),
            logprobs=True,
        )


def sample(
    logits: torch.Tensor,  # [B, V] last-position logits
    params: SamplingTensors,
    steps: torch.Tensor,  # [B] int64: tokens generated so far per row
    seen: torch.Tensor | None,  # [B, V] bool: tokens present in each row's input and output
    flags: BatchFlags | None = None,
    counts: torch.Tensor | None = None,  # [B, V] float: each token's count among the generated ones
    bias: torch.Tensor | None = None,  # [B, V] float: each row's logit bias
    mask: torch.Tensor | None = None,  # [B, W] int32 bitmask of the tokens each row's grammar allows
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Choose one token per row. Returns (token ids [B] int64, their log-probabilities [B] float32,
    or None when no row asked for them).

    The log-probability is that of the distribution the token was chosen from (after the bias and
    penalties; for sampled rows after temperature and top-k/top-p too), as TGI reports it.
    """
    tokens, logprobs, _ = sample_with_top(logits, params, steps, seen, flags, counts, bias, mask=mask)
    return tokens, logprobs


def sample_with_top(
    logits: torch.Tensor,
    params: SamplingTensors,
    steps: torch.Tensor,
    seen: torch.Tensor | None,
    flags: BatchFlags | None = None,
    counts: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    top: int = 0,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """`sample`, plus each row's `top` most likely tokens of that same distribution: (log-probabilities
    [B, top], ids [B, top]), or None when top is 0."""
    flags = flags or BatchFlags.of(params)
    logits = logits.float()
    if mask is not None:  # first: what a grammar forbids stays forbidden whatever the bias
        logits = apply_mask(logits, mask)
    if bias is not None:
        logits = logits + bias
    if seen is not None and flags.penalty:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if counts is not None and params.frequency_penalty is not None and params.presence_penalty is not None:
        logits = apply_openai_penalties(logits, counts, params.frequency_penalty, params.presence_penalty)
    greedy_tokens = logits.argmax(dim=-1)  # [B]
    if not flags.sampling:
        if not flags.logprobs:
            return greedy_tokens, None, None
        dist = logits.log_softmax(dim=-1)
        return greedy_tokens, dist.gather(-1, greedy_tokens[:, None]).squeeze(-1), _top(dist, top)

    temperature = torch.where(params.sampling, params.temperature, torch.ones_like(params.temperature))
    warped = logits / temperature[:, None].to(logits.dtype)
    if flags.filtering:
        warped = _filter_top_k_top_p(warped, params.top_k, params.top_p)
    logp = warped.log_softmax(dim=-1)  # [B, V]
    gumbel = -torch.log(-torch.log(row_uniforms(params.seeds, steps, logits.shape[-1]))).to(logp.dtype)
    sampled = (logp + gumbel).argmax(dim=-1)  # [B]
    tokens = torch.where(params.sampling, sampled, greedy_tokens)
    if not flags.logprobs:
        return tokens, None, None
    dist = torch.where(params.sampling[:, None], logp, logits.log_softmax(dim=-1))
    return tokens, dist.gather(-1, tokens[:, None]).squeeze(-1), _top(dist, top)


def _top(dist: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """dist [B, V] log-probabilities -> (values [B, k], ids [B, k]), the most likely first."""
    if k <= 0:
        return None
    values, ids = dist.topk(min(k, dist.shape[-1]), dim=-1)
    return values, ids


@dataclass
class SamplingBatch:
    """Everything `sample` needs for a batch of rows, built from the requests themselves."""

    params: SamplingTensors
    steps: torch.Tensor  # [B] int64: tokens generated so far per row
    seen: torch.Tensor | None  # [B, V] bool, only when some row has a repetition penalty
    flags: BatchFlags
    counts: torch.Tensor | None = None  # [B, V] float, only when some row has a frequency or presence penalty
    bias: torch.Tensor | None = None  # [B, V] float, only when some row has a logit bias
    top: int = 0  # alternatives per token the batch's rows ask for at most
    mask: torch.Tensor | None = None  # [B, W] int32: tokens each row's grammar allows (None: no row has one)


def prepare(
    requests: list[Request], vocab_size: int, device: torch.device, mask: torch.Tensor | None = None
) -> SamplingBatch:
    """One rule for what a batch needs: per-row tensors, plus host-side flags that skip the work
    (and device syncs) no row asks for."""
    params = [r.params for r in requests]
    sampling = [p.sampling for p in params]
    repetition = any(p.repetition_penalty != 1.0 for p in params)
    openai = any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params)
    biased = any(p.logit_bias for p in params)
    seen = None
    if repetition:  # a row's seen tokens are its input and what it generated
        rows = [i for i, r in enumerate(requests) for _ in range(len(r.input_ids) + len(r.output_ids))]
        cols = [t for r in requests for t in (*r.input_ids, *r.output_ids)]
        seen = torch.zeros(len(requests), vocab_size, dtype=torch.bool, device=device)
        seen[device_tensor(rows, torch.int64, device), device_tensor(cols, torch.int64, device)] = True
    counts = None
    if openai:  # OpenAI's penalties count the generated tokens only
        rows = [i for i, r in enumerate(requests) for _ in r.output_ids]
        cols = [t for r in requests for t in r.output_ids]
        counts = torch.zeros(len(requests), vocab_size, dtype=torch.float32, device=device)
        ones = torch.ones(len(cols), dtype=torch.float32, device=device)
        counts.index_put_(
            (device_tensor(rows, torch.int64, device), device_tensor(cols, torch.int64, device)),
            ones,
            accumulate=True,
        )
    bias = None
    if biased:
        rows = [i for i, p in enumerate(params) for _ in p.logit_bias]
        cols = [t for p in params for t, _ in p.logit_bias]
        bias = torch.zeros(len(requests), vocab_size, dtype=torch.float32, device=device)
        values = device_tensor([b for p in params for _, b in p.logit_bias], torch.float32, device)
        bias[device_tensor(rows, torch.int64, device), device_tensor(cols, torch.int64, device)] = values
    return SamplingBatch(
        params=SamplingTensors(
            sampling=device_tensor(sampling, torch.bool, device),
            temperature=device_tensor([p.temperature or 1.0 for p in params], torch.float32, device),
            top_k=device_tensor([p.top_k for p in params], torch.int64, device),
            top_p=device_tensor([p.top_p for p in params], torch.float32, device),
            repetition_penalty=device_tensor([p.repetition_penalty for p in params], torch.float32, device),
            seeds=device_tensor([r.seed for r in requests], torch.int64, device),
            frequency_penalty=device_tensor([p.frequency_penalty for p in params], torch.float32, device)
            if openai
            else None,
            presence_penalty=device_tensor([p.presence_penalty for p in params], torch.float32, device)
            if openai
            else None,
        ),
        steps=device_tensor([len(r.output_ids) for r in requests], torch.int64, device),
        seen=seen,
        flags=BatchFlags(
            sampling=any(sampling),
            penalty=repetition or openai or biased,
            filtering=any(s and (p.top_k > 0 or p.top_p < 1.0) for s, p in zip(sampling, params)),
            logprobs=any(r.stream or p.logprobs for r, p in zip(requests, params)),
            masked=mask is not None,
        ),
        counts=counts,
        bias=bias,
        mask=mask,
        top=max(p.top_logprobs for p in params) if any(p.logprobs for p in params) else 0,
    )


def choose(
    logits: torch.Tensor, batch: SamplingBatch, ops: Kernels | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """logits [B, V] -> (tokens [B], finite [B] bool: a poisoned row must fail alone, log-probabilities
    [B] or None, the top alternatives ([B, k] log-probabilities, [B, k] ids) or None)."""
    flags = batch.flags
    fast = not (flags.sampling or flags.penalty or flags.logprobs or flags.masked)
    if ops is not None and fast and logits.dtype in KERNEL_DTYPES:
        tokens, finite = ops.greedy(logits.contiguous())  # argmax and the finite test in one pass (CPU)
        return tokens, finite, None, None
    # One reduction instead of an elementwise test: the sum is finite exactly when every logit
    # is, unless they overflow float32 together (garbage anyway).
    finite = torch.isfinite(logits.sum(dim=-1, dtype=torch.float32))
    logits.masked_fill_(~finite[:, None], 0.0)  # in place (the pass's own output): sampling needs finite rows
    b = batch
    tokens, logprobs, top = sample_with_top(
        logits, b.params, b.steps, b.seen, b.flags, b.counts, b.bias, b.top, b.mask
    )
    return tokens, finite, logprobs, top
