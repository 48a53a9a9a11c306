"""Structured outputs: constraints (server/structured.py) compiled into a matcher per row.

A constraint compiles with llguidance (docs/architecture.md says why that library) into a template matcher;
each request gets a copy (cheap: no compiling) that follows its own tokens. Compiling runs on a small thread
pool, never on the engine thread, bounded by the parser's limits and a timeout; results are cached by the
constraint's text, failures included, so a bad schema sent again is refused at once.

A constraint that does not compile, or uses what the library cannot enforce, is an error
(`GrammarError`) before the request is queued: a row never runs unconstrained by accident.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import OrderedDict
from typing import Any

import llguidance
import llguidance.hf

from server.models import LoadedModel
from server.structured import GrammarError, OutputKind, OutputSpec

__all__ = ["Compiled", "GrammarCompiler", "GrammarError", "OutputKind", "OutputSpec", "grammar_text"]

# JSON is written compactly and predictably (json.dumps' separators): flexible whitespace lets a
# small model wander into endless newlines. A schema can override this with llguidance's "x-guidance".
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
COMPILE_TIMEOUT = 10.0  # seconds a compile may take before the request is refused


# llguidance's own bounds keep one compile and one mask step from running away (its defaults, made
# explicit; a grammar beyond them is refused, not run slowly).
def parser_limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(
        max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000, max_grammar_size=500_000
    )


def grammar_text(spec: OutputSpec) -> str:
    """llguidance's grammar for a constraint (GrammarError when its text cannot be read)."""
    try:
        if spec.kind is OutputKind.JSON_OBJECT:
            return llguidance.LLMatcher.grammar_from_json_schema(
                {"type": "object"},
                defaults=JSON_OPTIONS,  # type: ignore[arg-type]
            )
        if spec.kind is OutputKind.JSON_SCHEMA:
            return llguidance.LLMatcher.grammar_from_json_schema(
                spec.text,
                defaults=JSON_OPTIONS,  # type: ignore[arg-type]
            )
        if spec.kind is OutputKind.REGEX:
            return llguidance.LLMatcher.grammar_from_regex(spec.text)
        if spec.kind is OutputKind.CHOICE:
            return llguidance.grammar_from("choice", spec.text)
        return llguidance.grammar_from("grammar", spec.text)
    except ValueError as e:
        raise GrammarError(str(e)) from None


class Compiled:
    """A compiled constraint: `matcher()` gives a fresh matcher for one row (a copy of the template)."""

    def __init__(self, spec: OutputSpec, template: llguidance.LLMatcher) -> None:
        self.spec = spec
        self._template = template
        self._lock = threading.Lock()

    def matcher(self) -> llguidance.LLMatcher:
        with self._lock:
            return self._template.deep_copy()


class GrammarCompiler:
    """Compiles constraints for one tokenizer, off the calling thread, with a cache (failures too)."""

    def __init__(
        self, tokenizer: Any, eos_ids: list[int], vocab_size: int, cache_size: int = 512, workers: int = 2
    ) -> None:
        # ~0.3 s for a 49k vocabulary: once, at start.
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos_ids))
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._limits = parser_limits()
        self._cache: OrderedDict[OutputSpec, concurrent.futures.Future[Compiled]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="softmux-grammar")
        self.compiles = 0  # constraints compiled (cache misses)

    @classmethod
    def for_model(cls, lm: LoadedModel, workers: int = 2) -> GrammarCompiler:
        """The compiler for a loaded model's tokenizer and logits width (its output head's rows: call this
        before an engine releases the model's weights). End-of-sequence ids a config names outside the
        vocabulary are left out (llguidance refuses them)."""
        vocab = int(lm.model.get_output_embeddings().weight.shape[0])
        return cls(lm.tokenizer, sorted(i for i in lm.eos_token_ids if i < vocab), vocab, workers=workers)

    def submit(self, spec: OutputSpec) -> concurrent.futures.Future[Compiled]:
        """The compile of `spec`, cached or started now (never blocks the caller)."""
        with self._lock:
            future = self._cache.get(spec)
            if future is not None:
                self._cache.move_to_end(spec)
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[spec] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future

    def compile(self, spec: OutputSpec, timeout: float = COMPILE_TIMEOUT) -> Compiled:
        """Blocking: the compiled constraint, or GrammarError (also when it takes over `timeout` s)."""
        try:
            return self.submit(spec).result(timeout)
        except concurrent.futures.TimeoutError:
            raise GrammarError(
                f"the {spec.kind.value} took over {timeout:.0f} s to compile; simplify it"
            ) from None

    def _compile(self, spec: OutputSpec) -> Compiled:
        self.compiles += 1
        matcher = llguidance.LLMatcher(self.tokenizer, grammar_text(spec), log_level=0, limits=self._limits)
        if not matcher.is_error():
            # The first mask, computed once here: a grammar that admits no finite answer or that breaks a
            # lexer limit shows it now (a 422 before queueing), and its lazily built lexer is warm.
            matcher.compute_bitmask()
        if matcher.is_error():
            raise GrammarError(_first_line(matcher.get_error()))
        return Compiled(spec, matcher)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _first_line(message: str) -> str:
    """llguidance's messages can carry a grammar dump after the reason; clients need the reason."""
    lines = [line for line in message.splitlines() if line.strip()]
    return " ".join(lines[:4])[:500] or "the constraint could not be compiled"
