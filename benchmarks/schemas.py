"""Structured-output constraints of the shapes clients send (JSON schemas, regexes, choice lists), each with
one valid answer, for the grammar benchmarks and tests.

Every schema keeps to what JSON-schema grammar libraries commonly support (draft 2020-12: nested objects,
arrays of objects, enums, optional and nullable fields, integer and number ranges, maxLength, the formats
date, date-time, email and uuid, anyOf/oneOf, $defs/$ref, additionalProperties: false) and is small enough
that a 135M model finishes an answer in <= 96 tokens when its free strings are short: free strings carry
maxLength and arrays maxItems <= 3. Patterns are anchored (^...$): JSON Schema's `pattern` is a search, the
grammar libraries match it whole. EXAMPLES' key order is the schemas' property order, which the libraries'
JSON grammars impose.

    python -m benchmarks.schemas    # checks every schema (jsonschema) and every example against its
                                    # constraint
"""

from __future__ import annotations

import json
import re
from typing import Any

Schema = dict[str, Any]


def _obj(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> Schema:
    """A closed object (additionalProperties: false),
    every property required unless `required` says otherwise."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
        **extra,
    }


def _str(max_length: int, **extra: Any) -> Schema:
    return {"type": "string", "maxLength": max_length, **extra}


def _int(minimum: int, maximum: int) -> Schema:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


def _num(minimum: float, maximum: float) -> Schema:
    return {"type": "number", "minimum": minimum, "maximum": maximum}


EMAIL: Schema = {"type": "string", "format": "email", "maxLength": 40}
DATE: Schema = {"type": "string", "format": "date"}
UUID: Schema = {"type": "string", "format": "uuid"}
HHMM: Schema = {"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$"}

SCHEMAS: list[tuple[str, Schema]] = [
    (
        "person",
        _obj(
            {"name": _str(40), "age": _int(0, 130), "email": EMAIL, "is_member": {"type": "boolean"}},
            ["name", "age"],
        ),
    ),
    (
        "address",
        _obj(
            {
                "street": _str(40),
                "unit": _str(8),
                "city": _str(24),
                "postal_code": {"type": "string", "pattern": "^[0-9A-Z -]{3,10}$"},
                "country": {"enum": ["US", "CA", "GB", "DE", "FR", "JP"]},
            },
            ["street", "city", "postal_code", "country"],
        ),
    ),
    (
        "invoice",
        _obj(
            {
                "number": {"type": "string", "pattern": "^INV-[0-9]{1,6}$"},
                "date": DATE,
                "customer": _obj({"name": _str(30), "email": EMAIL}, ["name"]),
                "currency": {"enum": ["USD", "EUR", "GBP"]},
                "items": {
                    "type": "array",
                    "items": _obj({"sku": _str(8), "qty": _int(1, 99), "price": _num(0, 10000)}),
                    "minItems": 1,
                    "maxItems": 3,
                },
                "total": {"type": "number", "minimum": 0},
            },
            ["number", "date", "customer", "items", "total"],
        ),
    ),
    (
        "calendar_event",
        _obj(
            {
                "title": _str(30),
                "date": DATE,
                "start": HHMM,
                "duration_minutes": _int(5, 480),
                "attendees": {"type": "array", "items": EMAIL, "maxItems": 3},
                "location": {"type": ["string", "null"], "maxLength": 30},
            },
            ["title", "date", "start", "duration_minutes"],
        ),
    ),
    (
        "product",
        _obj(
            {
                "id": UUID,
                "name": _str(30),
                "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 100000},
                "in_stock": {"type": "boolean"},
                "category": {"enum": ["books", "electronics", "garden", "toys", "grocery"]},
                "tags": {"type": "array", "items": _str(12), "maxItems": 3},
            },
            ["id", "name", "price", "in_stock", "category"],
        ),
    ),
    ("sentiment", _obj({"label": {"enum": ["positive", "negative", "neutral"]}, "confidence": _num(0, 1)})),
    (
        "log_record",
        _obj(
            {
                "timestamp": {"type": "string", "format": "date-time"},
                "level": {"enum": ["DEBUG", "INFO", "WARNING", "ERROR"]},
                "service": _str(20),
                "message": _str(60),
                "status_code": {"type": ["integer", "null"], "minimum": 100, "maximum": 599},
            },
            ["timestamp", "level", "message"],
        ),
    ),
    (
        "tool_call",
        {
            "$defs": {
                "weather": _obj({"city": _str(24), "unit": {"enum": ["celsius", "fahrenheit"]}}, ["city"]),
                "search": _obj({"query": _str(40), "max_results": _int(1, 10)}, ["query"]),
                "email": _obj({"to": EMAIL, "subject": _str(40)}),
            },
            **_obj(
                {
                    "name": {"enum": ["get_weather", "search_web", "send_email"]},
                    "arguments": {
                        "anyOf": [
                            {"$ref": "#/$defs/weather"},
                            {"$ref": "#/$defs/search"},
                            {"$ref": "#/$defs/email"},
                        ]
                    },
                }
            ),
        },
    ),
    ("geo_point", _obj({"lat": _num(-90, 90), "lon": _num(-180, 180), "label": _str(24)}, ["lat", "lon"])),
    (
        "contact_card",
        _obj(
            {
                "full_name": _str(40),
                "phone": {"type": ["string", "null"], "pattern": "^\\+?[0-9 ()-]{7,16}$"},
                "email": {"anyOf": [EMAIL, {"type": "null"}]},
                "company": {"type": ["string", "null"], "maxLength": 30},
            }
        ),
    ),
    (
        "weather_report",
        _obj(
            {
                "city": _str(24),
                "temperature_c": _num(-90, 60),
                "condition": {"enum": ["sunny", "cloudy", "rain", "snow", "storm", "fog"]},
                "humidity": _int(0, 100),
            }
        ),
    ),
    (
        "multi_label",
        _obj(
            {
                "labels": {
                    "type": "array",
                    "items": {"enum": ["billing", "bug", "feature_request", "account", "other"]},
                    "minItems": 1,
                    "maxItems": 3,
                }
            }
        ),
    ),
    (
        "named_entities",
        _obj(
            {
                "entities": {
                    "type": "array",
                    "items": _obj({"text": _str(30), "type": {"enum": ["PERSON", "ORG", "LOC", "DATE"]}}),
                    "maxItems": 3,
                }
            }
        ),
    ),
    (
        "order_status",
        _obj(
            {
                "order_id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{6}$"},
                "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
                "shipped_on": {"anyOf": [DATE, {"type": "null"}]},
            }
        ),
    ),
    (
        "payment",
        {
            "$defs": {
                "card": _obj(
                    {"method": {"const": "card"}, "last4": {"type": "string", "pattern": "^[0-9]{4}$"}}
                ),
                "bank": _obj({"method": {"const": "bank"}, "iban": _str(34)}),
            },
            **_obj(
                {
                    "amount": _num(0, 1000000),
                    "source": {"oneOf": [{"$ref": "#/$defs/card"}, {"$ref": "#/$defs/bank"}]},
                }
            ),
        },
    ),
    (
        "user_profile",
        {
            "$defs": {
                "address": _obj(
                    {"city": _str(24), "country": {"enum": ["US", "CA", "GB", "DE", "FR", "JP"]}}
                ),
            },
            **_obj(
                {
                    "username": {"type": "string", "pattern": "^[a-z][a-z0-9_]{2,15}$"},
                    "email": EMAIL,
                    "home": {"$ref": "#/$defs/address"},
                    "work": {"anyOf": [{"$ref": "#/$defs/address"}, {"type": "null"}]},
                    "verified": {"type": "boolean"},
                },
                ["username", "email", "home"],
            ),
        },
    ),
    (
        "movie_review",
        _obj(
            {
                "title": _str(40),
                "year": _int(1888, 2030),
                "rating": _int(1, 5),
                "summary": _str(80),
                "spoilers": {"type": "boolean"},
            }
        ),
    ),
    (
        "recipe",
        _obj(
            {
                "name": _str(30),
                "servings": _int(1, 12),
                "ingredients": {
                    "type": "array",
                    "items": _obj({"item": _str(20), "amount": _str(12)}),
                    "maxItems": 3,
                },
                "vegetarian": {"type": "boolean"},
            }
        ),
    ),
    (
        "flight_booking",
        _obj(
            {
                "origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "date": DATE,
                "passengers": _int(1, 9),
                "cabin": {"enum": ["economy", "premium", "business", "first"]},
            },
            ["origin", "destination", "date", "passengers"],
        ),
    ),
    (
        "support_ticket",
        _obj(
            {
                "ticket_id": UUID,
                "priority": {"enum": ["low", "medium", "high", "urgent"]},
                "subject": _str(50),
                "assignee": {"anyOf": [EMAIL, {"type": "null"}]},
            }
        ),
    ),
    (
        "qa_answer",
        _obj(
            {
                "answer": _str(60),
                "citations": {"type": "array", "items": _int(1, 20), "maxItems": 3},
                "confident": {"type": "boolean"},
            }
        ),
    ),
    (
        "math_result",
        _obj(
            {
                "expression": _str(30),
                "result": {"type": "number"},
                "steps": {"type": "array", "items": _str(30), "maxItems": 3},
            }
        ),
    ),
    (
        "word_counts",
        {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}, "maxProperties": 3},
    ),
    (
        "category_tree",
        {
            "$defs": {
                "node": _obj(
                    {
                        "name": _str(20),
                        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
                    },
                    ["name"],
                ),
            },
            "$ref": "#/$defs/node",
        },
    ),
    (
        "rgb_color",
        _obj(
            {
                "r": _int(0, 255),
                "g": _int(0, 255),
                "b": _int(0, 255),
                "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"},
            }
        ),
    ),
    (
        "meeting_slots",
        {
            "type": "array",
            "items": _obj({"day": {"enum": ["mon", "tue", "wed", "thu", "fri"]}, "time": HHMM}),
            "minItems": 1,
            "maxItems": 3,
        },
    ),
    ("yes_no_reason", _obj({"answer": {"enum": ["yes", "no", "unsure"]}, "reason": _str(60)})),
    (
        "dependency",
        _obj(
            {
                "package": {"type": "string", "pattern": "^[a-z][a-z0-9-]{0,30}$"},
                "version": {"type": "string", "pattern": "^[0-9]+\\.[0-9]+\\.[0-9]+$"},
                "optional": {"type": "boolean"},
            },
            ["package", "version"],
        ),
    ),
]

# One valid answer per schema, keys in the schema's property order (what the JSON grammars allow), short
# fields.
EXAMPLES: dict[str, Any] = {
    "person": {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "is_member": True},
    "address": {"street": "221B Baker St", "city": "London", "postal_code": "NW1 6XE", "country": "GB"},
    "invoice": {
        "number": "INV-42",
        "date": "2024-03-15",
        "customer": {"name": "Acme"},
        "items": [{"sku": "A1", "qty": 2, "price": 9.5}, {"sku": "B7", "qty": 1, "price": 120}],
        "total": 139,
    },
    "calendar_event": {
        "title": "Team sync",
        "date": "2024-06-03",
        "start": "09:30",
        "duration_minutes": 30,
        "attendees": ["bo@corp.com"],
        "location": None,
    },
    "product": {
        "id": "3f2b8c1e-9a4d-4e5f-8b6a-1c2d3e4f5a6b",
        "name": "USB-C cable",
        "price": 12.99,
        "in_stock": True,
        "category": "electronics",
    },
    "sentiment": {"label": "positive", "confidence": 0.92},
    "log_record": {
        "timestamp": "2024-05-01T12:00:00Z",
        "level": "ERROR",
        "message": "disk full",
        "status_code": 507,
    },
    "tool_call": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
    "geo_point": {"lat": 48.8566, "lon": 2.3522, "label": "Paris"},
    "contact_card": {"full_name": "Li Wei", "phone": "+1 555 0100", "email": None, "company": "Initech"},
    "weather_report": {"city": "Oslo", "temperature_c": -3.5, "condition": "snow", "humidity": 80},
    "multi_label": {"labels": ["billing", "bug"]},
    "named_entities": {
        "entities": [{"text": "Marie Curie", "type": "PERSON"}, {"text": "Warsaw", "type": "LOC"}]
    },
    "order_status": {"order_id": "AB123456", "status": "shipped", "shipped_on": "2024-02-29"},
    "payment": {"amount": 49.99, "source": {"method": "card", "last4": "4242"}},
    "user_profile": {
        "username": "jdoe_42",
        "email": "jdoe@mail.org",
        "home": {"city": "Austin", "country": "US"},
        "work": None,
    },
    "movie_review": {
        "title": "Alien",
        "year": 1979,
        "rating": 5,
        "summary": "Tense and scary.",
        "spoilers": False,
    },
    "recipe": {
        "name": "Pancakes",
        "servings": 4,
        "ingredients": [{"item": "flour", "amount": "200 g"}, {"item": "milk", "amount": "300 ml"}],
        "vegetarian": True,
    },
    "flight_booking": {
        "origin": "SFO",
        "destination": "JFK",
        "date": "2024-12-20",
        "passengers": 2,
        "cabin": "economy",
    },
    "support_ticket": {
        "ticket_id": "0b7e9c2a-4f1d-4c8e-9a3b-5d6e7f8a9b0c",
        "priority": "high",
        "subject": "Cannot log in",
        "assignee": "help@desk.com",
    },
    "qa_answer": {"answer": "Canberra", "citations": [2, 7], "confident": True},
    "math_result": {"expression": "12 * (3 + 4)", "result": 84, "steps": ["3 + 4 = 7", "12 * 7 = 84"]},
    "word_counts": {"apple": 3, "pear": 1},
    "category_tree": {"name": "Home", "children": [{"name": "Kitchen", "children": []}, {"name": "Garden"}]},
    "rgb_color": {"r": 255, "g": 128, "b": 0, "hex": "#ff8000"},
    "meeting_slots": [{"day": "tue", "time": "14:00"}, {"day": "thu", "time": "10:30"}],
    "yes_no_reason": {"answer": "no", "reason": "The deadline already passed."},
    "dependency": {"package": "numpy", "version": "2.1.0", "optional": False},
}

# Regexes as the grammar libraries take them: matched whole, no anchors, explicit classes ([0-9] over \d).
REGEXES: list[tuple[str, str]] = [
    ("iso_date", "[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"),
    ("time_hhmm", "([01][0-9]|2[0-3]):[0-5][0-9]"),
    ("us_phone", "\\([0-9]{3}\\) [0-9]{3}-[0-9]{4}"),
    ("hex_color", "#[0-9a-fA-F]{6}"),
    ("semver", "(0|[1-9][0-9]*)\\.(0|[1-9][0-9]*)\\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]{1,20})?"),
    ("email_ish", "[a-z0-9._%+-]{1,20}@[a-z0-9-]{1,20}(\\.[a-z0-9-]{1,20}){0,2}\\.[a-z]{2,6}"),
    ("yes_no_digit", "(yes|no) [0-9]"),
    ("zip_code", "[0-9]{5}(-[0-9]{4})?"),
]

REGEX_EXAMPLES: dict[str, str] = {
    "iso_date": "2024-02-29",
    "time_hhmm": "23:59",
    "us_phone": "(555) 010-1234",
    "hex_color": "#1A2b3C",
    "semver": "1.12.0-rc.1",
    "email_ish": "first.last@mail.example.com",
    "yes_no_digit": "yes 7",
    "zip_code": "94103-1234",
}

# Choice lists: the answer is exactly one of the strings (the first is each list's example).
CHOICES: list[tuple[str, list[str]]] = [
    ("sentiment_label", ["positive", "negative", "neutral"]),
    ("yes_no", ["yes", "no"]),
    ("priority", ["low", "medium", "high", "urgent"]),
    ("language", ["English", "French", "German", "Spanish", "Chinese", "Japanese"]),
    ("intent", ["book_flight", "cancel_booking", "check_status", "talk_to_agent"]),
]


def example_text(name: str) -> str:
    """A schema's example as the JSON grammars with ", " and ": " separators emit it, on one line."""
    return json.dumps(EXAMPLES[name], separators=(", ", ": "))


def choice_regex(choices: list[str]) -> str:
    """One regex for a choice list, for libraries that take regexes (metacharacters escaped, nothing else)."""
    return "(" + "|".join(re.sub(r"([\\.^$|?*+()\[\]{}])", r"\\\1", c) for c in choices) + ")"


def check() -> list[str]:
    """Every schema valid per its metaschema, every example valid (formats checked), names matched up:
    the problems."""
    from jsonschema import FormatChecker
    from jsonschema.validators import validator_for

    problems = []
    names = [name for name, _ in SCHEMAS]
    if len(set(names)) != len(names) or set(names) != set(EXAMPLES):
        problems.append(f"SCHEMAS and EXAMPLES name different sets: {sorted(set(names) ^ set(EXAMPLES))}")
    for name, schema in SCHEMAS:
        cls = validator_for(schema)
        try:
            cls.check_schema(schema)
        except Exception as e:
            problems.append(f"{name}: invalid schema: {e}")
            continue
        if name in EXAMPLES:
            problems += [
                f"{name}: example: {e.message}"
                for e in cls(schema, format_checker=FormatChecker()).iter_errors(EXAMPLES[name])
            ]
    for name, rx in REGEXES:
        if name not in REGEX_EXAMPLES or not re.fullmatch(rx, REGEX_EXAMPLES[name]):
            problems.append(f"{name}: the example does not match the regex")
    for name, choices in CHOICES:
        if not re.fullmatch(choice_regex(choices), choices[0]):
            problems.append(f"{name}: choice regex does not match its first choice")
    return problems


if __name__ == "__main__":
    found = check()
    print(
        "\n".join(found) or f"ok: {len(SCHEMAS)} schemas, {len(REGEXES)} regexes, {len(CHOICES)} choice lists"
    )
    raise SystemExit(1 if found else 0)
