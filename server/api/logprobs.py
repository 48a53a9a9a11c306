"""Log-probabilities in the shapes clients know: OpenAI completions and chat, TGI's details.

Every figure comes from the distribution the token was chosen from (`server.engine.request.TokenLogprob`):
the model's logits after `logit_bias` and the penalties, and for sampled rows after temperature and
top-k/top-p too (TGI's choice; vLLM's default is the raw model's). A greedy request without bias or
penalties therefore reports the model's own log-probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from server.engine.request import TokenLogprob

Tokenizer = Any  # a transformers tokenizer: decode(ids) -> str


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return str(tokenizer.decode([token_id]))


def _finite(value: float) -> float:
    return (
        value if math.isfinite(value) else -9999.0
    )  # JSON has no -inf (OpenAI's own floor for banned tokens)


def completion_logprobs(
    tokenizer: Tokenizer, tokens: Sequence[TokenLogprob], offset: int = 0
) -> dict[str, Any]:
    """OpenAI completions' `logprobs`: tokens, token_logprobs, top_logprobs ({token: logprob}) and
    text_offset (each token's start in the generated text, from `offset`)."""
    texts = [token_text(tokenizer, t.token_id) for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [_finite(t.logprob) for t in tokens],
        "top_logprobs": [{token_text(tokenizer, i): _finite(lp) for i, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }


def _chat_entry(tokenizer: Tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    text = token_text(tokenizer, token_id)
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokenizer: Tokenizer, tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """OpenAI chat's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    return {
        "content": [
            {
                **_chat_entry(tokenizer, t.token_id, t.logprob),
                "top_logprobs": [_chat_entry(tokenizer, i, lp) for i, lp in t.top],
            }
            for t in tokens
        ]
    }
