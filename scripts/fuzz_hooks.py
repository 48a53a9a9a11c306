"""schemathesis hooks for scripts/fuzz.py: most generated bodies name a real task, so the fuzzing
reaches tokenisation, limits and the engine instead of stopping at 404 (a quarter keep the
generated name, so unknown names stay covered)."""

from __future__ import annotations

import zlib

import schemathesis

TASKS = ("alpha", "beta", "gamma")


def _pick(value: object) -> str | None:
    h = zlib.crc32(repr(value).encode())
    return None if h % 4 == 0 else TASKS[h % len(TASKS)]


@schemathesis.hook
def map_body(ctx, body):
    if isinstance(body, dict):
        for key in ("task", "model"):
            if isinstance(body.get(key), str):
                name = _pick(body)
                if name is not None:
                    body = {**body, key: name}
    return body


@schemathesis.hook
def map_path_parameters(ctx, path_parameters):
    if isinstance(path_parameters, dict):
        for key in ("name", "model"):
            if key in path_parameters:
                name = _pick(path_parameters)
                if name is not None and not (key == "name" and ctx.operation.method.upper() == "DELETE"):
                    path_parameters = {**path_parameters, key: name}
    return path_parameters
