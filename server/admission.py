"""What a request must satisfy before it is queued, as pure functions of the request, its task and the
server's limits: the task's defaults and contract, its priority, and the token budget (input, new
tokens, the model's context, the key/value pool). `Service.prepare` applies them in order; no asyncio,
no engine thread here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from server.config import Settings
from server.engine.grammar import Compiled
from server.engine.request import SamplingParams
from server.errors import InvalidRequest
from server.models import LoadedModel
from server.prompts.settings import TaskSettings
from server.prompts.types import SoftPrompt
from server.structured import OutputSpec


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    task: str
    input_ids: list[int]
    params: SamplingParams
    seed: int
    deadline: float | None = None  # time.monotonic() after which the engine ends it with TIMEOUT
    priority: int = 0  # lower is served first; the task's default unless the request asked
    grammar: Compiled | None = (
        None  # the structured output every answer must match (each row gets its own matcher)
    )
    n: int = 1  # samples of this prompt (OpenAI's n): one prefill, forked into n rows


def sample_seed(seed: int, i: int) -> int:
    """Sample i's own seed stream: sample 0 keeps the request's seed (n=1 answers do not change)."""
    return (seed + i * 0x9E3779B97F4A7C15) % (1 << 63)


def with_defaults(
    params: SamplingParams, settings: TaskSettings, explicit: frozenset[str] | None
) -> SamplingParams:
    """The task's default parameters for those the request left unset."""
    if explicit is None:
        return params
    given = {k: v for k, v in settings.defaults.given().items() if k not in explicit}
    return replace(params, **given) if given else params  # type: ignore[arg-type]


def contract_for(prompt: SoftPrompt, asked: OutputSpec | None, field: str) -> tuple[OutputSpec | None, str]:
    """The structured output a request runs under: its task's contract binds; a request may repeat it,
    not replace it."""
    bound = prompt.settings.output_spec
    if bound is None:
        return asked, field
    if asked is not None and asked != bound:
        raise InvalidRequest(
            f"task {prompt.name!r} fixes its output ({bound.kind.value}, in its task.json); "
            f"{field} asks another: leave it out",
            field,
        )
    return bound, f"task {prompt.name!r} output"


def context_window(lm: LoadedModel) -> int | None:
    """The longest sequence the model's positions cover (None: the config does not say)."""
    config = lm.model.config.get_text_config()
    window = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(window) if window else None


def priority_for(prompt: SoftPrompt, asked: int | None, field: str) -> int:
    """The request's priority: the task's default, or what it asked within what its task.json allows."""
    if asked is None:
        return prompt.settings.priority
    low, high = prompt.settings.allowed_priorities()
    if not low <= asked <= high:
        raise InvalidRequest(
            f"{field} must be between {low} and {high} for task {prompt.name!r} (lower is served first; "
            f"got {asked})",
            field,
        )
    return asked


def fit_lengths(
    s: Settings,
    virtual: int,
    n_input: int,
    params: SamplingParams,
    lm: LoadedModel,
    pool_tokens: int,
    fit_new_tokens: bool,
    names: tuple[str, str],
) -> SamplingParams:
    """The request's parameters once its token budget is checked: `virtual` + `n_input` tokens plus
    max_new_tokens within the server's limits, the model's positions and the pool; with
    `fit_new_tokens`, max_new_tokens lowered to what is left. Raises InvalidRequest naming the field."""
    inputs_name, limit_name = names
    if n_input > s.max_input_tokens:
        raise InvalidRequest(
            f"{inputs_name} is {n_input} tokens; at most {s.max_input_tokens} are allowed", inputs_name
        )
    if not n_input:
        raise InvalidRequest(f"{inputs_name} must not be empty", inputs_name)
    max_pos = getattr(lm.model.config, "max_position_embeddings", None)
    if fit_new_tokens:
        room = min(s.max_new_tokens, s.max_batch_tokens - virtual - n_input)
        if max_pos is not None:
            room = min(room, max_pos - virtual - n_input)
        params = replace(params, max_new_tokens=max(1, min(params.max_new_tokens, room)))
    total = virtual + n_input + params.max_new_tokens
    if total > s.max_batch_tokens:
        raise InvalidRequest(
            f"virtual tokens ({virtual}) + input tokens ({n_input}) + {limit_name} "
            f"({params.max_new_tokens}) = {total} exceeds max_batch_tokens ({s.max_batch_tokens})",
            limit_name,
        )
    if max_pos is not None and total > max_pos:
        raise InvalidRequest(
            f"virtual + input + {limit_name} = {total} exceeds the model's context ({max_pos})", limit_name
        )
    if total > pool_tokens:
        raise InvalidRequest(
            f"virtual + input + {limit_name} = {total} exceeds the key/value pool ({pool_tokens} tokens, "
            "--kv-cache-bytes)",
            limit_name,
        )
    return params
