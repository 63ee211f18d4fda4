"""Protobuf messages <-> JSON in the proto3 JSON mapping, as grpc-gateway does.

Responses use the lowerCamelCase names and print every field (as ``mediatag ... --json``
does); requests take either name form. Query parameters fill a request's fields by name,
repeated fields by repeating the parameter (``?media_ids=a&media_ids=b``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TypeVar

from google.protobuf import json_format, message

from web_gateway.errors import invalid

M = TypeVar("M", bound=message.Message)


def to_json(msg: message.Message) -> bytes:
    """``msg`` in the proto3 JSON mapping (lowerCamelCase names, every field), compact."""
    as_dict = json_format.MessageToDict(msg, always_print_fields_with_no_presence=True)
    return json.dumps(as_dict, separators=(",", ":")).encode()


def from_query(query: Mapping[str, Sequence[str]], msg: M) -> M:
    """Fill ``msg`` from query parameters (each a list of the values given)."""
    fields = msg.DESCRIPTOR.fields_by_name
    by_json_name = {f.json_name: f for f in msg.DESCRIPTOR.fields}
    values: dict[str, object] = {}
    for name, given in query.items():
        field = fields.get(name) or by_json_name.get(name)
        if field is None:
            raise invalid(name, "UNKNOWN_PARAMETER", f"unknown query parameter {name!r}")
        if field.is_repeated:
            values[name] = list(given)
        elif len(given) > 1:
            raise invalid(name, "REPEATED_PARAMETER", f"{name} may be given once")
        else:
            values[name] = given[0]
    return _parse(values, msg, "query")


def from_json(text: bytes, msg: M) -> M:
    """Fill ``msg`` from a JSON object."""
    try:
        values = json.loads(text) if text.strip() else {}
    except (ValueError, UnicodeDecodeError) as error:
        raise invalid("body", "INVALID_JSON", f"the body is not JSON: {error}") from None
    if not isinstance(values, dict):
        raise invalid("body", "INVALID_JSON", "the body must be a JSON object")
    return _parse(values, msg, "body")


def _parse(values: dict[str, object], msg: M, where: str) -> M:
    try:
        return json_format.ParseDict(values, msg)
    except json_format.ParseError as error:
        raise invalid(where, "INVALID_REQUEST", str(error)) from None
