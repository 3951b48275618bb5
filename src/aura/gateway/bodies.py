"""Request bodies at the edge: content type, size, and JSON the database can hold.

Everything PostgreSQL would refuse later is refused here, by field, with a 422 naming it
(``aura.catalog.storable``): NUL characters, NaN/Infinity/1e400, nesting deeper than 32.

    product body   application/json; at most MAX_PRODUCT_BYTES; the whole document checked
    import body    application/json: an array (``records.{i}.…``), read whole, at most
                   MAX_IMPORT_BYTES; or JSON lines (``lines.{n}.…``, n counted from 1),
                   streamed: each line is checked as it arrives and the good ones are
                   spooled (memory up to SPOOL_MEMORY_BYTES, then a temporary file), so
                   an import of IMPORT_MAX_RECORDS records (a million by default, at most
                   IMPORT_MAX_BYTES) is read in bounded memory. Each record at most
                   MAX_RECORD_BYTES.

An import line that is not JSON at all travels to the worker as it came: it is the
worker's poison pill (dead-lettered with its reason), as the design says. A line that is
JSON is held to the same rules as a product body, except that a lone surrogate escape
(which PostgreSQL's ``json`` stores) is left for the worker to dead-letter too.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

from aura.catalog.storable import (
    MAX_JSON_DEPTH,
    MAX_REPORTED_PROBLEMS,
    JSONTooDeepError,
    load_json,
    storable_problems,
)
from aura.contract import MAX_RECORD_BYTES
from aura.errors import InvalidInputError

__all__ = [
    "JSON_TYPES",
    "MAX_IMPORT_BYTES",
    "MAX_IMPORT_RECORDS",
    "MAX_PRODUCT_BYTES",
    "MAX_RECORD_BYTES",
    "MAX_STREAMED_BYTES",
    "NDJSON_TYPES",
    "SPOOL_MEMORY_BYTES",
    "BodyTooLarge",
    "SpooledRecords",
    "UnsupportedEncoding",
    "UnsupportedMediaType",
    "media_type",
    "product_document",
    "read_body",
    "split_import",
    "spool_lines",
    "unencoded",
]

MAX_PRODUCT_BYTES = MAX_RECORD_BYTES  # aura.contract: one product, one import record
MAX_IMPORT_BYTES = 16 * 1024 * 1024
MAX_IMPORT_RECORDS = 1_000_000  # the default of IMPORT_MAX_RECORDS
MAX_STREAMED_BYTES = 1024**3  # the default of IMPORT_MAX_BYTES (JSON lines)
SPOOL_MEMORY_BYTES = 1024 * 1024

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


class BodyTooLarge(InvalidInputError):
    """The body is over its limit (answered 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit


class UnsupportedMediaType(InvalidInputError):
    """The content type is not one the operation reads (answered 415)."""

    def __init__(self, got: str, accepted: frozenset[str]) -> None:
        shown = got[:80] if got else "none"
        super().__init__(
            f"content type {shown!r} is not accepted here; send {' or '.join(sorted(accepted))}"
        )
        self.accepted = accepted


class UnsupportedEncoding(UnsupportedMediaType):
    """A Content-Encoding the gateway does not decode (answered 415): read as if plain, a
    gzip body would be taken for its bytes."""

    def __init__(self, got: str) -> None:
        Exception.__init__(
            self,
            f"content encoding {got[:40]!r} is not accepted here; send the body unencoded",
        )
        self.accepted = frozenset({"identity"})


def unencoded(content_encoding: str | None) -> None:
    """Refuse (``UnsupportedEncoding``) any Content-Encoding but none or ``identity``."""
    if content_encoding is not None and content_encoding.strip().lower() not in {
        "",
        "identity",
    }:
        raise UnsupportedEncoding(content_encoding)


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


def split_import(raw: bytes, kind: str, *, max_records: int = MAX_IMPORT_RECORDS) -> list[str]:
    """An import body as its records (each a JSON text), every one checked; one 422
    counts and names every refused record (their first MAX_REPORTED_PROBLEMS problems)."""
    records, problems, refused = _array_records(raw) if kind in JSON_TYPES else _line_records(raw)
    if problems:
        _refuse("import", problems, records=refused)
    if not records:
        raise InvalidInputError("the import holds no records", field="body")
    if len(records) > max_records:
        _too_many(max_records, len(records))
    return records


def _too_many(limit: int, got: int | None = None) -> None:
    counted = f", got {got}" if got is not None else ", got more"
    raise InvalidInputError(
        f"an import holds at most {limit} records (IMPORT_MAX_RECORDS){counted}", field="body"
    )


class SpooledRecords:
    """An import's checked records, one per line in a spool (memory, then a temporary
    file); iterate it once to write them, then close it."""

    def __init__(self) -> None:
        self.count = 0
        self._file = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)  # noqa: SIM115

    def add(self, record: str) -> None:
        self._file.write(record.encode("utf-8", "surrogatepass") + b"\n")
        self.count += 1

    def __iter__(self) -> Iterator[str]:
        self._file.seek(0)
        for line in self._file:
            yield line[:-1].decode("utf-8", "surrogatepass")

    def close(self) -> None:
        self._file.close()


async def spool_lines(
    stream: AsyncIterator[bytes],
    declared: str | None,
    *,
    max_bytes: int = MAX_STREAMED_BYTES,
    max_records: int = MAX_IMPORT_RECORDS,
) -> SpooledRecords:
    """A JSON-lines body read as it arrives, each line checked as ``split_import`` checks
    it; the good records are spooled. Holds at most one line (MAX_RECORD_BYTES) and the
    spool's memory part at a time. One 422 counts and names every refused line; more than
    ``max_records`` records is a 422 at once, more than ``max_bytes`` a 413 at once."""
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLarge(max_bytes)
    lines = _LineReader(max_records)
    received = 0
    try:
        async for chunk in stream:
            received += len(chunk)
            if received > max_bytes:
                raise BodyTooLarge(max_bytes)
            lines.feed(chunk)
        lines.end()
    except BaseException:
        lines.spool.close()
        raise
    return lines.result()


class _LineReader:
    """The state of ``spool_lines``: the line being read, the records kept, the problems."""

    def __init__(self, max_records: int) -> None:
        self.max_records = max_records
        self.spool = SpooledRecords()
        self.problems: list[tuple[str, str]] = []
        self.refused = 0
        self.number = 0
        self.line = bytearray()
        self.line_length = 0  # bytes of the current line, kept or not

    def feed(self, chunk: bytes) -> None:
        start = 0
        while start <= len(chunk):
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            self.line_length += len(piece)
            if self.line_length <= MAX_RECORD_BYTES + 1:
                self.line += piece
            else:
                self.line.clear()  # too long: only its length is kept, to report it
            if end < 0:
                return
            self._take()
            start = end + 1

    def end(self) -> None:
        if self.line_length:
            self._take()

    def _take(self) -> None:
        self.number += 1
        field = f"lines.{self.number}"
        found: str | list[tuple[str, str]] | None
        if self.line_length > MAX_RECORD_BYTES:
            too_long = f"record is {self.line_length} bytes, over the {MAX_RECORD_BYTES} limit"
            found = [(field, too_long)]
        else:
            found = _line_problems(bytes(self.line), field)
        self.line.clear()
        self.line_length = 0
        if found is None:
            return  # blank
        if isinstance(found, list):
            self.refused += 1
            self.problems.extend(found[: MAX_REPORTED_PROBLEMS - len(self.problems)])
        elif not self.refused:
            self.spool.add(found)
            if self.spool.count > self.max_records:
                _too_many(self.max_records)

    def result(self) -> SpooledRecords:
        if self.problems:
            self.spool.close()
            _refuse("import", self.problems, records=self.refused)
        if not self.spool.count:
            self.spool.close()
            raise InvalidInputError("the import holds no records", field="body")
        return self.spool


def _array_records(raw: bytes) -> tuple[list[str], list[tuple[str, str]], int]:
    value = load_json(raw, field="body")
    if not isinstance(value, list):
        raise InvalidInputError("the import must be a JSON array of records", field="body")
    problems: list[tuple[str, str]] = []
    refused = 0
    records: list[str] = []
    for index, item in enumerate(value):
        field = f"records.{index}"
        found = _record_problems(item, field)
        text = json.dumps(item) if not found else ""
        if not found and len(text.encode("utf-8", "surrogatepass")) > MAX_RECORD_BYTES:
            # the same limit as a JSON line's and a product's (one record is one product)
            size = len(text.encode("utf-8", "surrogatepass"))
            found = [(field, f"record is {size} bytes, over the {MAX_RECORD_BYTES} limit")]
        if found:
            refused += 1
            problems += found[: MAX_REPORTED_PROBLEMS - len(problems)]
        elif not refused:
            records.append(text)
    return records if not refused else [], problems, refused


def _record_problems(value: Any, field: str) -> list[tuple[str, str]]:
    """A record must be a JSON object, storable field by field."""
    if not isinstance(value, dict):
        return [(field, f"a record must be a JSON object, got {type(value).__name__}")]
    return storable_problems(value, prefix=field, allow_surrogates=True)


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
    if not isinstance(value, dict):  # JSON, but no record: the worker's poison pill too
        return text  # (``aura demo``'s catalog has such lines; refusing them failed it)
    return _record_problems(value, field) or text
