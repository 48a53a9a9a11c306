"""Native routes: POST /generate, GET /tasks, GET /health, GET /stats."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.api.schemas import Details, ErrorBody, GenerateParameters, GenerateRequest, GenerateResponse
from server.engine.request import SamplingParams
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


def sampling_params(p: GenerateParameters) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=p.max_new_tokens,
        do_sample=p.do_sample,
        temperature=1.0 if p.temperature is None else p.temperature,
        top_k=p.top_k or 0,
        top_p=1.0 if p.top_p is None else p.top_p,
        repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
        stop=tuple(p.stop),
        seed=p.seed,
    )


@router.post("/generate", response_model=GenerateResponse, responses=_ERRORS)
async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
    service = service_of(request)
    prepared = await service.prepare(body.task, body.inputs, sampling_params(body.parameters))
    result = await service.generate(prepared)
    return GenerateResponse(
        generated_text=result.generated_text,
        details=Details(
            finish_reason=result.finish_reason.value,  # type: ignore[arg-type]
            generated_tokens=result.generated_tokens,
            input_tokens=result.input_tokens,
            virtual_tokens=result.virtual_tokens,
            seed=result.seed,
        ),
    )


@router.get("/tasks")
async def tasks(request: Request) -> dict[str, Any]:
    """The servable tasks and the store folders that failed validation, with reasons."""
    _, registry, _ = service_of(request).require_ready()
    return registry.describe()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    service = service_of(request)
    if not service.healthy:
        reason = service.load_error or (service.engine.error if service.engine else None)
        return JSONResponse({"status": "unhealthy", "error": str(reason), "error_type": "unhealthy"}, status_code=503)
    return JSONResponse({"status": "ok", "ready": service.ready.is_set()})


@router.get("/stats")
async def stats(request: Request) -> dict[str, Any]:
    """Engine counters: forward passes by phase, rows, and how many tasks shared a pass."""
    engine, _, _ = service_of(request).require_ready()
    cache = engine.prefix_cache
    prefix = None if cache is None else {**asdict(cache.stats), "entries": len(cache), "bytes_used": cache.bytes_used,
                                         "capacity_bytes": cache.capacity_bytes}
    return {
        **engine.stats.as_dict(),
        "prefix_cache": prefix,
        "waiting": engine.scheduler.num_waiting,
        "running": len(engine.scheduler.running),
        "reserved_tokens": engine.scheduler.reserved_tokens,
    }
