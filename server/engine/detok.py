"""Incremental detokenisation and stop strings, one object per request."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalText:
    """Turns a growing list of token ids into text deltas.

    Decoding a single token alone is wrong for byte-level BPE (a character can span tokens, and
    spaces depend on the neighbour), so each step decodes a short window that ends at the newest
    token and emits only what the window adds beyond what was already emitted.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the decoding window
        self._read_offset = 0  # tokens before this are already emitted
        self.text = ""
        self._stop = stop
        self._max_stop = max((len(s) for s in stop), default=0)
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the new text (possibly ""). After a stop string, returns ""."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._decode(self._ids[self._prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete multi-byte character: wait for the next token
        delta = after[len(before) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._append(delta)

    def _append(self, delta: str) -> str:
        start = len(self.text)
        self.text += delta
        if not self._stop:
            return delta
        window_start = max(0, start - self._max_stop + 1)
        cut = min(
            (i for i in (self.text.find(s, window_start) for s in self._stop) if i >= 0),
            default=-1,
        )
        if cut < 0:
            return delta
        self.stopped = True
        self.text = self.text[:cut]  # the stop string is not returned
        return self.text[start:] if cut > start else ""
