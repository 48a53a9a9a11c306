"""A generation request as the engine sees it: token ids, sampling parameters, output channel."""

from __future__ import annotations

import enum
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.engine.pool import SeqBlocks
from server.errors import ErrorKind
from server.prompts.types import SoftPrompt

if TYPE_CHECKING:
    from llguidance import LLMatcher

    from server.engine.detok import IncrementalText


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    # EOS also: a structured output's grammar is complete (nothing but end-of-sequence may follow)
    EOS = "eos_token"
    STOP = "stop_sequence"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"  # the request's deadline passed; the text so far is returned


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    frequency_penalty: float = 0.0  # OpenAI: logit -= count of the token among the generated ones x this
    presence_penalty: float = 0.0  # OpenAI: logit -= this when the token was generated at all
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI: (token id, bias) added to its logit
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = (
        False  # eos tokens do not end this request (it runs to max_new_tokens or a stop string)
    )
    logprobs: bool = (
        False  # record each generated token's log-probability (and its alternatives) in the answer
    )
    top_logprobs: int = 0  # alternatives per token, the most likely first (0: none)

    @property
    def sampling(self) -> bool:
        """TGI's rule: any warper set turns sampling on; temperature 0 means greedy (OpenAI's habit)."""
        if self.temperature == 0.0:
            return False
        return self.do_sample or self.temperature != 1.0 or self.top_k > 0 or self.top_p < 1.0


Alternatives = tuple[tuple[int, float], ...]  # (token id, log-probability), the most likely first


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and its top alternatives, from the distribution it was
    chosen from (after logit_bias and penalties; for sampled rows, temperature and top-k/top-p too)."""

    token_id: int
    logprob: float
    top: Alternatives = ()


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str  # the text this token adds (may be "" while a multi-byte character is incomplete)
    logprob: float
    special: bool
    final: bool = False  # the request's last token: its FinishEvent follows at once
    top: Alternatives = ()  # with params.top_logprobs


@dataclass(frozen=True)
class FinishEvent:
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    input_tokens: int
    virtual_tokens: int
    seed: int | None
    queue_time: float  # seconds from arrival to admission
    total_time: float  # seconds from arrival to finish
    first_token_time: float | None = None  # seconds from arrival to the first generated token
    logprobs: tuple[TokenLogprob, ...] = ()  # one per generated token, with params.logprobs


@dataclass(frozen=True)
class ErrorEvent:
    message: str
    kind: ErrorKind = ErrorKind.GENERATION_FAILED


Event = TokenEvent | FinishEvent | ErrorEvent
Sink = Callable[[Event], None]  # called on the engine thread; must not block

_ids = itertools.count()


@dataclass(eq=False)
class Request:
    task: str
    prompt: SoftPrompt  # resolved at submission: a task replaced later does not change this request
    input_ids: list[int]
    params: SamplingParams
    seed: int  # always set: the caller's seed or one drawn for it
    sink: Sink
    stream: bool = False
    priority: int = 0  # lower is served first (vLLM's convention); within what the task's settings allow
    id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    deadline: float | None = None  # time.monotonic() after which the request ends with TIMEOUT
    first_token_at: float | None = None
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    # Engine-thread state while running: where its keys and values live, the shared prefix blocks it
    # holds a reference to, its text so far (streams and stop strings only), times preempted.
    kv: SeqBlocks | None = None
    prefix_blocks: list[int] = field(default_factory=list)
    text: IncrementalText | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with params.logprobs
    # Structured output: the grammar's state after output_ids (kept through preemption: its tokens are
    # kept too).
    matcher: LLMatcher | None = None
    # Other samples of the same prompt (OpenAI's n): forked from this row right after its prefill.
    forks: list[Request] = field(default_factory=list)
    preemptions: int = 0
    # Scheduler state: its input tokens charged to its task's fairness counter; when it was last admitted.
    charged: bool = False
    admit_order: int = 0
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def virtual_tokens(self) -> int:
        return self.prompt.num_virtual_tokens

    @property
    def reserved_tokens(self) -> int:
        """Tokens this row may hold at most (its prefix included): it must fit in the pool."""
        return self.virtual_tokens + len(self.input_ids) + self.params.max_new_tokens

    def cancel(self) -> None:
        """Thread-safe: the engine drops the row at its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def ended_reason(self, now: float) -> FinishReason | None:
        """Why the engine should drop this request now, if it should."""
        if self.cancelled:
            return FinishReason.CANCELLED
        if self.expired(now):
            return FinishReason.TIMEOUT
        return None
