"""Structured outputs: what an answer must match, as requests and task contracts state it.

A constraint is a JSON schema, any JSON object, a regular expression, a choice among strings or a
context-free grammar (Lark, llguidance's dialect; GBNF is accepted and converted). This module only
checks a constraint's shape and makes its text canonical; server/engine/grammar.py compiles it.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

MAX_SPEC_CHARS = 64 << 10  # a schema, regex or grammar's text at most
MAX_CHOICES = 256


class OutputKind(str, enum.Enum):
    JSON_SCHEMA = "json"  # vLLM's key names
    JSON_OBJECT = "json_object"
    REGEX = "regex"
    CHOICE = "choice"
    GRAMMAR = "grammar"


class GrammarError(ValueError):
    """A constraint that cannot be enforced; the message says why."""


def _canonical_schema(value: Any) -> Any:
    """A schema with its keys sorted, except the members of `properties`: they keep their order,
    because the answer writes them in that order (llguidance, like vLLM, follows the schema)."""
    if isinstance(value, list):
        return [_canonical_schema(v) for v in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key in sorted(value):
        sub = value[key]
        if key == "properties" and isinstance(sub, dict):
            out[key] = {name: _canonical_schema(s) for name, s in sub.items()}  # names in the schema's order
        else:
            out[key] = _canonical_schema(sub)
    return out


@dataclass(frozen=True)
class OutputSpec:
    """One constraint, its text canonical (JSON with sorted keys, property order kept) so equal
    constraints share a compile."""

    kind: OutputKind
    text: str

    @classmethod
    def of(cls, kind: OutputKind, value: Any) -> OutputSpec:
        """Check the value's shape for its kind (GrammarError otherwise) and make it canonical."""
        if kind is OutputKind.JSON_OBJECT:
            return cls(kind, "")
        if kind is OutputKind.JSON_SCHEMA:
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise GrammarError(f"the schema is not valid JSON: {e}") from None
            if value is True:
                value = {}  # any JSON value
            if value is False:
                raise GrammarError("the schema false accepts no answer at all")
            if not isinstance(value, dict):
                raise GrammarError("a JSON schema is an object (or true)")
            text = json.dumps(_canonical_schema(value), separators=(",", ":"))
        elif kind is OutputKind.CHOICE:
            if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
                raise GrammarError("choice is a non-empty list of non-empty strings")
            if len(value) > MAX_CHOICES:
                raise GrammarError(f"choice holds at most {MAX_CHOICES} strings")
            text = json.dumps(value)
        else:
            if not isinstance(value, str) or not value.strip():
                raise GrammarError(f"{kind.value} is a non-empty string")
            text = value
        if len(text) > MAX_SPEC_CHARS:
            raise GrammarError(f"the {kind.value} is {len(text)} characters; at most {MAX_SPEC_CHARS}")
        return cls(kind, text)

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> OutputSpec | None:
        """vLLM's `structured_outputs` shape: exactly one of json, json_object, regex, choice, grammar."""
        known = {k.value for k in OutputKind}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise GrammarError(f"unknown key(s) {unknown}; allowed: {', '.join(sorted(known))}")
        if fields.get("json_object") not in (None, True, False):
            raise GrammarError("json_object is true or false")
        given = [
            k
            for k, v in fields.items()
            if v is not None and not (k == OutputKind.JSON_OBJECT.value and v is False)
        ]
        if len(given) > 1:
            raise GrammarError(f"give one constraint, not {len(given)} ({', '.join(given)})")
        if not given:
            return None
        return cls.of(OutputKind(given[0]), fields[given[0]])

    def as_fields(self) -> dict[str, Any]:
        """The inverse of from_fields (for GET /tasks and /v1/models)."""
        if self.kind is OutputKind.JSON_OBJECT:
            return {"json_object": True}
        if self.kind in (OutputKind.JSON_SCHEMA, OutputKind.CHOICE):
            return {self.kind.value: json.loads(self.text)}
        return {self.kind.value: self.text}
