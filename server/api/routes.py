"""Native routes: POST /generate, POST /generate_stream, GET /tasks, and the operations routes
GET /health, /ready, /info, /metrics, /stats."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

import server
from server.admission import Prepared
from server.api.errors import ApiError, tgi_error
from server.api.logprobs import token_text
from server.api.outputs import from_tgi_grammar
from server.api.schemas import (
    MAX_STOP,
    Details,
    ErrorBody,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    TokenDetail,
)
from server.api.sse import EventStream, sse
from server.engine.engine import Engine
from server.engine.request import ErrorEvent, FinishEvent, SamplingParams, TokenEvent
from server.errors import ErrorKind, Unavailable
from server.generation import Generation
from server.service import Service

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        404: "unknown task",
        422: "invalid parameters or input too long",
        424: "generation failed",
        429: "queue full",
        503: "model not loaded yet or engine stopped",
    }.items()
}


def service_of(request: Request) -> Service:
    return request.app.state.service


class ClientGone(ApiError):
    """The client closed the connection before its answer was ready (nginx's 499; nobody reads it)."""

    status_code, error_type = 499, "client_closed"


async def generate_unless_gone(service: Service, prepared: Prepared, request: Request) -> FinishEvent:
    """`service.generate`, cancelled (its row freed at the engine's next step) if the client
    disconnects first: a plain JSON response never writes until the end, so it has to listen."""
    (result,) = await samples_unless_gone(service, replace(prepared, n=1), request)
    return result


async def samples_unless_gone(service: Service, prepared: Prepared, request: Request) -> list[FinishEvent]:
    """`generate_unless_gone` for `prepared.n` samples: their final events, in order."""
    result: list[FinishEvent] | None = None
    error: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def listen() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(listen)
        try:
            result = await service.generate_samples(prepared)
        except Exception as exc:  # raised after the group, not wrapped in an ExceptionGroup
            error = exc
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    if result is None:
        raise ClientGone("the client disconnected")
    return result


def samples_stream(
    service: Service, prepared: Prepared, render: Callable[[list[Generation]], AsyncIterator[bytes]]
) -> EventStream:
    """`event_stream` for `prepared.n` samples: `render` gets one generation per sample."""
    generations = service.submit_samples(prepared, stream=True)

    def cancel() -> None:
        for g in generations:
            g.cancel()

    return EventStream(render(generations), on_close=cancel)


def event_stream(
    service: Service, prepared: Prepared, render: Callable[[Generation], AsyncIterator[bytes]]
) -> EventStream:
    """Submit now, so that errors before the first byte (queue full, not ready) stay plain HTTP
    errors, and stream `render(generation)`; a client that leaves cancels the request."""
    generation = service.submit(prepared, stream=True)
    return EventStream(render(generation), on_close=generation.cancel)


def sampling_params(p: GenerateParameters) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=p.max_new_tokens,
        do_sample=p.do_sample,
        temperature=1.0 if p.temperature is None else p.temperature,
        top_k=p.top_k or 0,
        top_p=1.0 if p.top_p is None else p.top_p,
        repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
        frequency_penalty=p.frequency_penalty or 0.0,
        stop=tuple(p.stop),
        seed=p.seed,
        ignore_eos=p.ignore_eos,
        logprobs=bool(p.top_n_tokens),
        top_logprobs=p.top_n_tokens or 0,
    )


# GenerateParameters' fields that are SamplingParams' own: those a request leaves unset take its task's
# defaults.
_DEFAULTABLE = frozenset(
    {
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "frequency_penalty",
        "presence_penalty",
        "stop",
    }
)


async def prepare_native(service: Service, body: GenerateRequest) -> Prepared:
    """A native request checked, tokenised and given its deadline, priority and structured output."""
    p = body.parameters
    return await service.prepare(
        body.task,
        body.inputs,
        sampling_params(p),
        timeout=p.timeout,
        priority=p.priority,
        output=(from_tgi_grammar(p.grammar), "parameters.grammar"),
        explicit=frozenset(p.model_fields_set) & _DEFAULTABLE,
    )


@router.post(
    "/generate", response_model=GenerateResponse, response_model_exclude_unset=True, responses=_ERRORS
)
async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
    service = service_of(request)
    prepared = await prepare_native(service, body)
    result = await generate_unless_gone(service, prepared, request)
    details = Details(
        finish_reason=result.finish_reason.value,
        generated_tokens=result.generated_tokens,
        input_tokens=result.input_tokens,
        virtual_tokens=result.virtual_tokens,
        seed=result.seed,
    )
    if (
        body.parameters.top_n_tokens
    ):  # TGI's token details, only when asked (the answer's shape otherwise unchanged)
        tokenizer = service.require_ready()[2].tokenizer
        special = set(tokenizer.all_special_ids)
        details.tokens = [
            TokenDetail(**_detail(tokenizer, special, t.token_id, t.logprob)) for t in result.logprobs
        ]
        details.top_tokens = [
            [TokenDetail(**_detail(tokenizer, special, i, lp)) for i, lp in t.top] for t in result.logprobs
        ]
    return GenerateResponse(generated_text=result.generated_text, details=details)


def _detail(tokenizer: Any, special: set[int], token_id: int, logprob: float) -> dict[str, Any]:
    """TGI's {id, text, logprob, special} for one token."""
    return {
        "id": token_id,
        "text": token_text(tokenizer, token_id),
        "logprob": logprob,
        "special": token_id in special,
    }


def _token(event: TokenEvent) -> dict[str, Any]:
    return {"id": event.token_id, "text": event.text, "logprob": event.logprob, "special": event.special}


def _details(event: FinishEvent) -> dict[str, Any]:
    return {
        "finish_reason": event.finish_reason.value,
        "generated_tokens": event.generated_tokens,
        "input_tokens": event.input_tokens,
        "input_length": event.input_tokens,
        "virtual_tokens": event.virtual_tokens,
        "seed": event.seed,
    }


def _top_tokens(tokenizer: Any, event: TokenEvent) -> list[dict[str, Any]]:
    special = set(tokenizer.all_special_ids)
    return [_detail(tokenizer, special, i, lp) for i, lp in event.top]


def tgi_stream_for(tokenizer: Any, top_n_tokens: int) -> Callable[[Generation], AsyncIterator[bytes]]:
    """tgi_stream, each token's event with `top_tokens` when the request asked top_n_tokens."""
    if not top_n_tokens:
        return tgi_stream
    return lambda generation: tgi_stream(generation, lambda event: _top_tokens(tokenizer, event))


async def tgi_stream(
    generation: Generation, top: Callable[[TokenEvent], list[dict[str, Any]]] | None = None
) -> AsyncIterator[bytes]:
    """TGI's stream: one event per token, `{"index", "token", "generated_text": null, "details": null}`;
    the last token's event carries `generated_text` and `details`; a failure is `{"error", "error_type"}`.

    The engine marks a request's last token (`final`), whose result follows at once: only that
    token waits for it, so every other token goes out as soon as it is chosen."""
    last: TokenEvent | None = None
    index = 0
    async for event in generation:
        if isinstance(event, TokenEvent):
            if event.final:
                last = event
            else:
                extra = {} if top is None else {"top_tokens": top(event)}
                yield sse(
                    {"index": index, "token": _token(event), **extra, "generated_text": None, "details": None}
                )
                index += 1
        elif isinstance(event, FinishEvent):
            token = _token(last) if last is not None else None
            extra = {} if top is None or last is None else {"top_tokens": top(last)}
            yield sse(
                {
                    "index": index,
                    "token": token,
                    **extra,
                    "generated_text": event.generated_text,
                    "details": _details(event),
                }
            )
        elif isinstance(event, ErrorEvent):
            yield sse(tgi_error(event.kind, event.message))


@router.post(
    "/generate_stream",
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "server-sent events, TGI's shape"},
        **_ERRORS,
    },
)
async def generate_stream(body: GenerateRequest, request: Request) -> EventStream:
    """Tokens as server-sent events as they are generated. Errors found before the first token
    (unknown task, invalid input, queue full) are ordinary HTTP errors; a client that disconnects
    cancels its request."""
    service = service_of(request)
    prepared = await prepare_native(service, body)
    render = tgi_stream_for(service.require_ready()[2].tokenizer, body.parameters.top_n_tokens or 0)
    return event_stream(service, prepared, render)


@router.get("/tasks")
async def tasks(request: Request) -> dict[str, Any]:
    """The servable tasks and the store folders that failed validation, with reasons."""
    _, registry, _ = service_of(request).require_ready()
    return registry.describe()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness: 200 while the process and its engine loop are alive (also while loading); 503
    once the model failed to load or the engine loop died."""
    service = service_of(request)
    if not service.healthy:
        reason = service.load_error or (service.engine.error if service.engine else None)
        return JSONResponse(
            {"status": "unhealthy", **tgi_error(ErrorKind.UNAVAILABLE, str(reason))}, status_code=503
        )
    return JSONResponse({"status": "ok", "ready": service.ready.is_set()})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 once the model is loaded and warmed up and the engine runs; 503 before
    (with Retry-After) and after a failure."""
    service = service_of(request)
    try:
        service.require_ready()
    except Unavailable as exc:
        return JSONResponse(
            {"status": "unavailable", **tgi_error(exc.kind, exc.message)},
            status_code=503,
            headers={"Retry-After": "1"},
        )
    return JSONResponse({"status": "ready"})


@router.get("/info")
async def info(request: Request) -> dict[str, Any]:
    """The model, where it runs, the limits a request must respect and the server version."""
    service = service_of(request)
    s, lm, registry = service.settings, service.lm, service.registry
    return {
        "version": server.__version__,
        "model": lm.name if lm is not None else s.model,
        "dtype": str(lm.dtype).removeprefix("torch.") if lm is not None else s.dtype,
        "device": str(lm.device) if lm is not None else s.device,
        "quantize": s.quantize,  # "none" or how the decoder's linear weights are held
        "ready": service.ready.is_set(),
        "tasks": None if registry is None else len(registry),
        "limits": {
            "max_batch_size": s.max_batch_size,
            "max_batch_tokens": s.max_batch_tokens,
            "max_input_tokens": s.max_input_tokens,
            "max_new_tokens": s.max_new_tokens,
            "max_virtual_tokens": s.max_virtual_tokens,
            "max_queue": s.max_queue,
            "max_stop_sequences": MAX_STOP,
            "context_length": None
            if lm is None
            else getattr(lm.model.config, "max_position_embeddings", None),
        },
        "prefix_cache": s.prefix_cache,
        "load_seconds": service.load_seconds,
        "memory": None if service.engine is None else memory(service.engine),
    }


def memory(engine: Engine) -> dict[str, int | None]:
    """What the process holds: the model's weights (each layout counted), the key/value pool's committed
    and limit bytes, and the resident set now and at its peak."""
    pool = engine.pool_stats()
    return {
        "weights_bytes": engine.weight_bytes(),
        "kv_pool_bytes_committed": pool["bytes_committed"],
        "kv_pool_bytes_limit": pool["bytes_limit"],
        **resident_bytes(),
    }


def resident_bytes() -> dict[str, int | None]:
    """The process's resident set (VmRSS) and its peak (VmHWM), from /proc (None elsewhere)."""
    out: dict[str, int | None] = {"resident_bytes": None, "peak_resident_bytes": None}
    try:
        for line in open("/proc/self/status"):
            key, _, value = line.partition(":")
            name = {"VmRSS": "resident_bytes", "VmHWM": "peak_resident_bytes"}.get(key)
            if name:
                out[name] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    content, content_type = service_of(request).metrics.render()
    return Response(content, media_type=content_type)


@router.get("/stats")
async def stats(request: Request) -> dict[str, Any]:
    """Engine counters: forward passes by phase, rows, and how many tasks shared a pass."""
    engine, _, _ = service_of(request).require_ready()
    return engine.snapshot()
