"""Tokens out: what one chosen token does to its request (its text so far, stop strings, the grammar,
the token limit, the stream event), and the request's final event. No engine state: the engine calls
these for each row after a pass and owns what follows (finishing the row, counting)."""

from __future__ import annotations

import time
from typing import Any

from server.engine.request import Alternatives, FinishEvent, FinishReason, Request, TokenEvent, TokenLogprob


def alternatives_of(values: list[list[float]], ids: list[list[float]], row: int, k: int) -> Alternatives:
    """Row `row`'s first k alternatives from the host copy of the top tensors (k lists of B values each);
    tokens a filter removed (-inf) are left out."""
    return tuple(
        (int(ids[j][row]), values[j][row])
        for j in range(min(k, len(values)))
        if values[j][row] != float("-inf")
    )


def append_token(
    req: Request, tok: int, logprob: float, alternatives: Alternatives, eos_ids: set[int]
) -> FinishReason | None:
    """Append the chosen token to `req` (and stream it); the reason the answer is now done, or None."""
    if not req.output_ids:
        req.first_token_at = time.monotonic()
    req.output_ids.append(tok)
    if req.params.logprobs:
        req.logprobs.append(TokenLogprob(tok, logprob, alternatives))
    text = req.text
    is_eos = tok in eos_ids
    ends = is_eos and not req.params.ignore_eos  # an ignored eos is an ordinary token (no text when special)
    complete = False  # the grammar is satisfied and allows nothing more: the answer is whole
    if req.matcher is not None and not ends:
        complete = req.matcher.consume_token(tok) and req.matcher.is_stopped()
    delta = text.add(tok) if text is not None and not ends else ""
    if ends or complete:
        reason: FinishReason | None = FinishReason.EOS
    elif text is not None and text.stopped:
        reason = FinishReason.STOP
    elif len(req.output_ids) >= req.params.max_new_tokens:
        reason = FinishReason.LENGTH
    else:
        reason = None
    if req.stream:
        if reason is not None and text is not None:
            delta += text.flush()  # text held back for a stop string that never came
        final = reason is not None
        req.sink(
            TokenEvent(
                token_id=tok, text=delta, logprob=logprob, special=is_eos, final=final, top=alternatives
            )
        )
    return reason


def finish_event(req: Request, reason: FinishReason, eos_ids: set[int], tokenizer: Any) -> FinishEvent:
    """The event that ends `req`: its whole answer's text, why it ended, and its timings."""
    if req.text is not None:
        generated = req.text.text
    else:
        # an eos that ended the answer is not text; a completed grammar's last token is
        ended_by_eos = reason is FinishReason.EOS and req.output_ids and req.output_ids[-1] in eos_ids
        ids = req.output_ids[:-1] if ended_by_eos else req.output_ids
        generated = str(tokenizer.decode(ids, skip_special_tokens=True))
    now = time.monotonic()
    return FinishEvent(
        generated_text=generated,
        finish_reason=reason,
        generated_tokens=len(req.output_ids),
        input_tokens=len(req.input_ids),
        virtual_tokens=req.virtual_tokens,
        seed=req.seed if req.params.sampling else None,
        queue_time=(req.admitted or now) - req.arrival,
        total_time=now - req.arrival,
        first_token_time=None if req.first_token_at is None else req.first_token_at - req.arrival,
        logprobs=tuple(req.logprobs),
    )
