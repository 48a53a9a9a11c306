"""Structured-output fields in the shapes clients already send, read into one `OutputSpec`.

OpenAI: `response_format` ({"type": "text" | "json_object"} or {"type": "json_schema", "json_schema":
{"name", "schema", "strict"}}) on both /v1 routes. vLLM: `structured_outputs` ({"json" | "regex" |
"choice" | "grammar" | "json_object": ...}) as an extension on both. TGI: `parameters.grammar`
({"type": "json" | "regex", "value": ...}) on /generate and /generate_stream. A request gives at most
one; a malformed one is an InvalidRequest naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.errors import InvalidRequest
from server.structured import GrammarError, OutputKind, OutputSpec


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = Field(
        None, max_length=64, description="the schema's name (OpenAI asks for one; softmux does not need it)"
    )
    description: str | None = None
    schema_: dict[str, Any] | None = Field(
        None, alias="schema", description="the JSON schema every answer validates against"
    )
    strict: bool | None = Field(None, description="accepted; softmux enforces the schema whatever its value")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class TgiGrammar(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json", "regex", "json_object"] = Field(
        ..., description="json: value is a JSON schema; regex: a pattern"
    )
    value: Any = None


def _spec(kind: OutputKind, value: Any, field: str) -> OutputSpec:
    try:
        return OutputSpec.of(kind, value)
    except GrammarError as e:
        raise InvalidRequest(f"{field}: {e}", field) from None


def from_response_format(fmt: ResponseFormat | None) -> OutputSpec | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return OutputSpec(OutputKind.JSON_OBJECT, "")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise InvalidRequest("response_format: type json_schema needs json_schema.schema", "response_format")
    return _spec(OutputKind.JSON_SCHEMA, fmt.json_schema.schema_, "response_format.json_schema.schema")


def from_structured_outputs(fields: dict[str, Any] | None) -> OutputSpec | None:
    if not fields:
        return None
    try:
        return OutputSpec.from_fields(fields)
    except GrammarError as e:
        raise InvalidRequest(f"structured_outputs: {e}", "structured_outputs") from None


def from_tgi_grammar(grammar: TgiGrammar | None) -> OutputSpec | None:
    if grammar is None:
        return None
    field = "parameters.grammar.value"
    if grammar.type == "json_object":
        return OutputSpec(OutputKind.JSON_OBJECT, "")
    kind = OutputKind.JSON_SCHEMA if grammar.type == "json" else OutputKind.REGEX
    return _spec(kind, grammar.value, field)


def one_of(*asked: tuple[OutputSpec | None, str]) -> tuple[OutputSpec | None, str]:
    """The request's one constraint and the field that gave it; two fields at once are refused."""
    given = [(spec, field) for spec, field in asked if spec is not None]
    if len(given) > 1:
        names = " and ".join(field for _, field in given)
        raise InvalidRequest(f"{names} both constrain the output; send one", given[1][1])
    return given[0] if given else (None, asked[0][1] if asked else "")
