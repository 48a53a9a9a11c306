"""Admin routes: PUT /tasks/{name} (upload an adapter), DELETE /tasks/{name}, GET /tasks/{name}.

All need `Authorization: Bearer <admin token>` (see `server.api.auth`). An upload is written into
a hidden temp folder inside the store, validated exactly as at startup, and only then renamed into
place (`server.prompts.install`), so a crash or a killed upload never leaves a half-written task.
Replacing a task: requests already running keep the prompt they started with; new ones get the new one.
"""

from __future__ import annotations

import shutil
import threading
from datetime import UTC, datetime
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from server.api.auth import require_admin
from server.api.errors import ApiError
from server.errors import InvalidRequest, UnknownTask
from server.prompts.install import check_folder, install, remove, temp_folder
from server.prompts.registry import Registry
from server.prompts.settings import MAX_SETTINGS_BYTES, SETTINGS_FILE
from server.prompts.store import CONFIG_FILE, WEIGHTS_FILE, validate_task_name
from server.prompts.types import PromptError
from server.service import Service

router = APIRouter(dependencies=[Depends(require_admin)], tags=["admin"])

CARD_FILE = "README.md"
_PARTS = (CONFIG_FILE, WEIGHTS_FILE, SETTINGS_FILE, CARD_FILE)
MAX_CARD_BYTES = 64 << 10
_MULTIPART_OVERHEAD = 64 << 10  # part headers and boundaries on top of the files themselves


class TooLarge(ApiError):
    status_code, error_type = 413, "too_large"


def _service(request: Request) -> Service:
    return request.app.state.service


def _admin_lock(request: Request) -> threading.Lock:
    """Serialises store writes from this server (one lock per app, made by `create_app`)."""
    lock: threading.Lock = request.app.state.admin_lock
    return lock


def _name(name: str) -> str:
    try:
        validate_task_name(name)
    except PromptError as e:
        raise InvalidRequest(e.reason) from None
    return name


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + _MULTIPART_OVERHEAD:
        raise TooLarge(f"upload is {declared} bytes; at most {limit} bytes of adapter files are accepted")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit + _MULTIPART_OVERHEAD:
            raise TooLarge(
                f"upload is over {limit} bytes; at most {limit} bytes of adapter files are accepted"
            )
    return bytes(body)


async def _files(request: Request, body: bytes, limit: int) -> dict[str, bytes]:
    """The uploaded parts by field name (or file name), checked against the size limit."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest(f"send multipart/form-data with the files {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        form = await Request(request.scope, replay).form(max_files=8, max_fields=8)
    except Exception as e:  # malformed multipart
        raise InvalidRequest(f"cannot parse the multipart upload: {e}") from None
    files: dict[str, bytes] = {}
    try:
        for field, value in form.multi_items():
            if not isinstance(value, UploadFile):
                raise InvalidRequest(f"form field {field!r} must be a file")
            key = field if field in _PARTS else (value.filename or field)
            if key not in _PARTS:
                raise InvalidRequest(
                    f"unexpected file {key!r}; send {CONFIG_FILE} and {WEIGHTS_FILE} "
                    f"(and optionally {SETTINGS_FILE}, {CARD_FILE})"
                )
            if key in files:
                raise InvalidRequest(f"{key} sent twice")
            files[key] = await value.read()
    finally:
        await form.close()
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if f not in files]
    if missing:
        raise InvalidRequest(
            f"missing file(s) {missing}: an adapter upload needs {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    total = len(files[CONFIG_FILE]) + len(files[WEIGHTS_FILE])
    if total > limit:
        raise TooLarge(f"adapter files are {total} bytes; at most {limit} bytes are accepted")
    if len(files.get(CARD_FILE, b"")) > MAX_CARD_BYTES:
        raise TooLarge(f"{CARD_FILE} is over {MAX_CARD_BYTES} bytes")
    if len(files.get(SETTINGS_FILE, b"")) > MAX_SETTINGS_BYTES:
        raise TooLarge(f"{SETTINGS_FILE} is over {MAX_SETTINGS_BYTES} bytes")
    return files


def _write_and_install(registry: Registry, name: str, files: dict[str, bytes], lock: threading.Lock) -> bool:
    """Blocking part of an upload (run in a worker thread). Returns whether a task was replaced."""
    tmp = temp_folder(registry.store, name)
    try:
        for fname, data in files.items():
            with open(tmp / fname, "wb") as f:
                f.write(data)
                f.flush()
        try:
            check_folder(tmp, name, registry.read)  # the same validation as at startup
        except PromptError as e:
            raise InvalidRequest(f"invalid adapter: {e.reason}") from None
        with lock:
            replaced = (registry.store / name).exists()
            install(registry.store, name, tmp)
            try:
                registry.load_folder(name)
            except PromptError as e:  # e.g. a multitask sub-task name now clashes with another task
                raise InvalidRequest(f"adapter stored but not servable: {e.reason}") from None
        return replaced
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when installed


def _describe(registry: Registry, name: str) -> dict[str, Any]:
    info = registry.info(name)
    if info is None:
        failure = registry.failures().get(name)
        raise UnknownTask(name, reason=f"its folder failed validation: {failure}" if failure else None)
    card_path = info.folder / CARD_FILE
    try:
        card = (
            card_path.read_bytes()[:MAX_CARD_BYTES].decode("utf-8", errors="replace")
            if card_path.is_file()
            else None
        )
    except OSError:
        card = None
    return {
        "name": info.name,
        "peft_type": info.kind.value,
        "num_virtual_tokens": info.num_virtual_tokens,
        "folder": info.folder.name,
        "content_hash": info.content_hash,
        "created": datetime.fromtimestamp(info.created, UTC).isoformat(),
        "resident": name in registry.resident(),
        "settings": info.settings.shown(),
        "card": card,
    }


def _file_part(description: str) -> dict[str, Any]:
    return {"type": "string", "format": "binary", "description": description}


# The body is read by hand (size limits before parsing), so FastAPI cannot infer it: describe it.
_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [CONFIG_FILE, WEIGHTS_FILE],
                    "properties": {
                        CONFIG_FILE: _file_part("PEFT adapter config (peft_type, num_virtual_tokens, ...)"),
                        WEIGHTS_FILE: _file_part(
                            "safetensors file with the tensor prompt_embeddings (and, for multitask "
                            "prompt tuning, prefix_task_cols and prefix_task_rows)"
                        ),
                        SETTINGS_FILE: _file_part(
                            "optional task settings "
                            "(JSON: weight, max_queue, max_running, priority, min_priority)"
                        ),
                        CARD_FILE: _file_part("optional task card (markdown), shown by GET /tasks/{name}"),
                    },
                }
            }
        },
    },
}


@router.put(
    "/tasks/{name:path}",
    openapi_extra=_UPLOAD_BODY,
    status_code=201,
    responses={
        200: {"description": "an existing task was replaced"},
        413: {"description": "the upload is over --max-upload-bytes"},
        422: {"description": "an invalid task name, multipart body or adapter (the reason says which)"},
    },
)
async def put_task(name: str, request: Request) -> JSONResponse:
    """Upload (create or replace) a task: multipart files adapter_config.json and
    adapter_model.safetensors."""
    _name(name)
    service = _service(request)
    _, registry, _ = service.require_ready()
    limit = service.settings.max_upload_bytes
    files = await _files(request, await _read_body(request, limit), limit)
    replaced = await anyio.to_thread.run_sync(_write_and_install, registry, name, files, _admin_lock(request))
    body = {"status": "replaced" if replaced else "created", **_describe(registry, name)}
    return JSONResponse(body, status_code=200 if replaced else 201)


@router.delete("/tasks/{name:path}")
async def delete_task(name: str, request: Request) -> dict[str, Any]:
    _name(name)
    _, registry, _ = _service(request).require_ready()

    def work() -> list[str]:
        with _admin_lock(request):
            if not remove(registry.store, name):
                raise UnknownTask(name, message=f"no task folder {name!r} in the store")
            return registry.remove_folder(name)

    removed = await anyio.to_thread.run_sync(work)
    return {"status": "deleted", "name": name, "tasks": removed}


@router.get("/tasks/{name:path}")
async def get_task(name: str, request: Request) -> dict[str, Any]:
    _name(name)
    _, registry, _ = _service(request).require_ready()
    return _describe(registry, name)
