"""Request bodies at the edge: content type, size, and JSON the database can hold.

Everything PostgreSQL would refuse later is refused here, by field, with a 422 naming it
(``aura.catalog.storable``): NUL characters, NaN/Infinity/1e400, nesting deeper than 32.

    product body   application/json; at most MAX_PRODUCT_BYTES; the whole document checked
    import body    application/json (an array: ``records.{i}.…``) or JSON lines
                   (``lines.{n}.…``, n counted from 1); each record at most
                   MAX_RECORD_BYTES and at most MAX_IMPORT_RECORDS records

An import line that is not JSON at all travels to the worker as it came: it is the
worker's poison pill (dead-lettered with its reason), as the design says. A line that is
JSON is held to the same rules as a product body, except that a lone surrogate escape
(which PostgreSQL's ``json`` stores) is left for the worker to dead-letter too.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from aura.catalog.storable import (
    MAX_JSON_DEPTH,
    MAX_REPORTED_PROBLEMS,
    JSONTooDeepError,
    load_json,
    storable_problems,
)
from aura.errors import InvalidInputError

__all__ = [
    "JSON_TYPES",
    "MAX_IMPORT_BYTES",
    "MAX_IMPORT_RECORDS",
    "MAX_PRODUCT_BYTES",
    "MAX_RECORD_BYTES",
    "NDJSON_TYPES",
    "BodyTooLarge",
    "UnsupportedMediaType",
    "media_type",
    "product_document",
    "read_body",
    "split_import",
]

MAX_PRODUCT_BYTES = 256 * 1024
MAX_RECORD_BYTES = MAX_PRODUCT_BYTES  # one import record is one product
MAX_IMPORT_BYTES = 16 * 1024 * 1024
MAX_IMPORT_RECORDS = 20_000

JSON_TYPES = frozenset({"application/json"})
NDJSON_TYPES = frozenset(
    {
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonl",
        "application/x-jsonlines",
        "application/jsonlines",
    }
)


class BodyTooLarge(Exception):
    """The body is over its limit (answered 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit


class UnsupportedMediaType(Exception):
    """The content type is not one the operation reads (answered 415)."""

    def __init__(self, got: str, accepted: frozenset[str]) -> None:
        shown = got[:80] if got else "none"
        super().__init__(
            f"content type {shown!r} is not accepted here; send {' or '.join(sorted(accepted))}"
        )
        self.accepted = accepted


def media_type(content_type: str, accepted: frozenset[str]) -> str:
    """The media type of a Content-Type header if ``accepted`` has it (a charset other
    than UTF-8 is refused too); ``UnsupportedMediaType`` otherwise."""
    kind, *params = (part.strip() for part in content_type.split(";"))
    kind = kind.lower()
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in {
            "utf-8",
            "utf8",
        }:
            raise UnsupportedMediaType(content_type, accepted)
    if kind not in accepted:
        raise UnsupportedMediaType(content_type, accepted)
    return kind


async def read_body(stream: AsyncIterator[bytes], declared: str | None, limit: int) -> bytes:
    """The whole body, refusing (``BodyTooLarge``) as soon as it passes ``limit``."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks = bytearray()
    async for chunk in stream:
        chunks += chunk
        if len(chunks) > limit:
            raise BodyTooLarge(limit)
    return bytes(chunks)


def _refuse(what: str, problems: list[tuple[str, str]], *, records: int | None = None) -> None:
    shown = problems[:MAX_REPORTED_PROBLEMS]
    summary = "; ".join(f"{field}: {problem}" for field, problem in shown)
    counted = f"{records} of the records refused, nothing written: " if records else ""
    raise InvalidInputError(
        f"invalid {what}: {counted}{summary}"[:2000], field=shown[0][0], errors=tuple(shown)
    )


def product_document(raw: bytes) -> Any:
    """A product body parsed and checked field by field (its shape is the model's job)."""
    value = load_json(raw, field="body")
    problems = storable_problems(value)
    if problems:
        _refuse("product", problems)
    return value


def split_import(raw: bytes, kind: str) -> list[str]:
    """An import body as its records (each a JSON text), every one checked; one 422
    counts and names every refused record (their first MAX_REPORTED_PROBLEMS problems)."""
    records, problems, refused = _array_records(raw) if kind in JSON_TYPES else _line_records(raw)
    if problems:
        _refuse("import", problems, records=refused)
    if not records:
        raise InvalidInputError("the import holds no records", field="body")
    if len(records) > MAX_IMPORT_RECORDS:
        raise InvalidInputError(
            f"an import holds at most {MAX_IMPORT_RECORDS} records, got {len(records)}",
            field="body",
        )
    return records


def _array_records(raw: bytes) -> tuple[list[str], list[tuple[str, str]], int]:
    value = load_json(raw, field="body")
    if not isinstance(value, list):
        raise InvalidInputError("the import must be a JSON array of records", field="body")
    problems: list[tuple[str, str]] = []
    refused = 0
    for index, item in enumerate(value):
        found = storable_problems(item, prefix=f"records.{index}", allow_surrogates=True)
        if found:
            refused += 1
            problems += found[: MAX_REPORTED_PROBLEMS - len(problems)]
    return [json.dumps(item) for item in value] if not refused else [], problems, refused


def _line_records(raw: bytes) -> tuple[list[str], list[tuple[str, str]], int]:
    records: list[str] = []
    problems: list[tuple[str, str]] = []
    refused = 0
    for number, line in enumerate(raw.split(b"\n"), start=1):
        found = _line_problems(line, f"lines.{number}")
        if found is None:
            continue  # blank
        if isinstance(found, list):
            refused += 1
            problems += found[: MAX_REPORTED_PROBLEMS - len(problems)]
        elif not refused:
            records.append(found)
        if len(records) > MAX_IMPORT_RECORDS:
            break  # enough to say it is too many
    return records, problems, refused


def _line_problems(line: bytes, field: str) -> str | list[tuple[str, str]] | None:
    """The record on ``line`` (as it came), its problems, or None for a blank line."""
    if len(line) > MAX_RECORD_BYTES:
        return [(field, f"record is {len(line)} bytes, over the {MAX_RECORD_BYTES} limit")]
    line = line.removesuffix(b"\r")
    if not line.strip():
        return None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return [(field, "record is not UTF-8")]
    try:
        value = load_json(text, field=field)
    except JSONTooDeepError:
        return [(field, f"nested deeper than {MAX_JSON_DEPTH} levels")]
    except InvalidInputError:
        return text  # not JSON: the worker's poison pill, dead-lettered with its reason
    return storable_problems(value, prefix=field, allow_surrogates=True) or text
