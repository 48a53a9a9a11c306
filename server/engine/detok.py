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
        self._emitted = 0  # characters of `text` already handed out

    def _decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def add(self, token_id: int) -> str:
        """Append one token; return the text safe to show now (possibly ""). After a stop string, ""."""
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
        if self._stop:
            window_start = max(0, start - self._max_stop + 1)
            cut = min(
                (i for i in (self.text.find(s, window_start) for s in self._stop) if i >= 0), default=-1
            )
            if cut >= 0:
                self.stopped = True
                self.text = self.text[:cut]  # the stop string is not returned
                return self._release(cut)
        return self._release(len(self.text) - self._held_back())

    def _held_back(self) -> int:
        """Length of the text's tail that could still grow into a stop string: not streamed yet."""
        for n in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def _release(self, end: int) -> str:
        out = self.text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return out

    def flush(self) -> str:
        """The text held back for a possible stop string, once the request ends without one."""
        return self._release(len(self.text))
