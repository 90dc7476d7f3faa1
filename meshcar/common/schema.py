"""The one declarative description of the config keys: each section's keys with their type,
default and one line of doc.

The checkers (common/config.py, sidecar/config.py, edge/config.py) take the allowed keys of
every section from here (`Checker.unknown(data, prefix, SECTION)`), and `meshcar config
schema` renders the same description as a JSON Schema (draft 2020-12) for editors; so the
keys a checker accepts and the keys the schema names cannot drift apart
(tests/unit/test_config_schema.py checks it). The value rules of the schema (types, ranges,
enums, required keys) are the unconditional ones; the checker adds the rules that depend on
other keys (e.g. `ca_url` unless `vault`), so a config valid for the checker is valid for
the schema, not always the reverse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DRAFT = "https://json-schema.org/draft/2020-12/schema"
_UNSET: Any = object()


@dataclass(frozen=True)
class Section:
    """A mapping with a fixed set of keys (unknown keys are errors)."""

    doc: str
    keys: Mapping[str, Key]

    def names(self) -> set[str]:
        return set(self.keys)

    def required(self) -> list[str]:
        return [k for k, v in self.keys.items() if v.required]


@dataclass(frozen=True)
class ListOf:
    item: Value
    min_items: int = 0


@dataclass(frozen=True)
class MapOf:
    """A mapping whose keys are names chosen by the user (e.g. service names)."""

    value: Value
    key_pattern: str | None = None


# A value: a JSON Schema fragment for a scalar, or a nested structure.
Value = dict[str, Any] | Section | ListOf | MapOf


@dataclass(frozen=True)
class Key:
    value: Value
    doc: str
    default: Any = _UNSET
    required: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # more JSON Schema (e.g. anyOf)


def key(value: Value, doc: str, default: Any = _UNSET, *, required: bool = False) -> Key:
    return Key(value, doc, default, required)


# Scalars used by several sections.
STRING: dict[str, Any] = {"type": "string", "minLength": 1}
BOOL: dict[str, Any] = {"type": "boolean"}
HOSTPORT: dict[str, Any] = {"type": "string", "pattern": r"^.*[^:]:[0-9]+$"}
SPIFFE_ID: dict[str, Any] = {"type": "string", "pattern": "^spiffe://"}
PORT: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": 65535}
LOG_LEVEL: dict[str, Any] = {"enum": ["debug", "info", "warning", "error"]}
# `workers`: a count of processes (net/workers.py's MAX_WORKERS) or "auto" (one per CPU).
WORKERS: dict[str, Any] = {
    "anyOf": [{"type": "integer", "minimum": 1, "maximum": 64}, {"const": "auto"}]
}


def number(
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    integer: bool = False,
    exclusive_minimum: float | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "integer" if integer else "number"}
    if minimum is not None:
        out["minimum"] = minimum
    if exclusive_minimum is not None:
        out["exclusiveMinimum"] = exclusive_minimum
    if maximum is not None:
        out["maximum"] = maximum
    return out


def one_of(*values: str) -> dict[str, Any]:
    return {"enum": list(values)}


def to_json_schema(value: Value) -> dict[str, Any]:
    """The JSON Schema fragment of one value."""
    if isinstance(value, Section):
        props: dict[str, Any] = {}
        for name, k in value.keys.items():
            prop = {"description": k.doc, **to_json_schema(k.value), **k.extra}
            if k.default is not _UNSET:
                prop["default"] = k.default
            props[name] = prop
        out: dict[str, Any] = {
            "type": "object",
            "description": value.doc,
            "properties": props,
            "additionalProperties": False,
        }
        if value.required():
            out["required"] = value.required()
        return out
    if isinstance(value, ListOf):
        out = {"type": "array", "items": to_json_schema(value.item)}
        if value.min_items:
            out["minItems"] = value.min_items
        return out
    if isinstance(value, MapOf):
        out = {"type": "object", "additionalProperties": to_json_schema(value.value)}
        if value.key_pattern:
            out["propertyNames"] = {"pattern": value.key_pattern}
        return out
    return dict(value)


def document(top: Section, title: str, schema_id: str) -> dict[str, Any]:
    """A whole schema document for a top-level section."""
    return {"$schema": DRAFT, "$id": schema_id, "title": title, **to_json_schema(top)}
