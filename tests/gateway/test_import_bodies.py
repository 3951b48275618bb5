"""Import bodies read as they arrive (``spool_lines``): whatever the chunking, the same
records and the same refusals as reading the body whole (``split_import``), in bounded
memory."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aura.errors import InvalidInputError
from aura.gateway.bodies import (
    MAX_RECORD_BYTES,
    SPOOL_MEMORY_BYTES,
    BodyTooLarge,
    split_import,
    spool_lines,
)

NDJSON = "application/x-ndjson"

records = st.one_of(
    st.builds(
        lambda title, price: json.dumps(
            {"title": title, "variants": [{"sku": "S", "price": price}]}
        ),
        st.text(max_size=20).filter(lambda t: "\x00" not in t),
        st.integers(1, 10**6),
    ),
    st.just(""),  # blank: skipped
    st.just("   "),
    st.just('{"title": "half'),  # not JSON: the worker's poison pill, passed on as it came
    st.just('{"w": NaN}'),  # refused here: PostgreSQL would refuse it later
    st.just("[" * 100 + "]" * 100),  # nested too deep: refused
    st.just("é ünïcode ✓"),
)


def chunked(body: bytes, cuts: list[int]) -> AsyncIterator[bytes]:
    async def stream() -> AsyncIterator[bytes]:
        start = 0
        for cut in sorted({c % (len(body) + 1) for c in cuts}):
            yield body[start:cut]
            start = cut
        yield body[start:]

    return stream()


async def outcome(stream: AsyncIterator[bytes]) -> tuple[str, object]:
    try:
        spooled = await spool_lines(stream, None)
    except InvalidInputError as exc:
        return "refused", (str(exc), exc.errors)
    try:
        return "records", list(spooled)
    finally:
        spooled.close()


def whole(body: bytes) -> tuple[str, object]:
    try:
        return "records", split_import(body, NDJSON)
    except InvalidInputError as exc:
        return "refused", (str(exc), exc.errors)


@settings(max_examples=150, deadline=None)
@given(
    lines=st.lists(records, max_size=12),
    crlf=st.booleans(),
    final_newline=st.booleans(),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
async def test_streamed_lines_give_what_the_whole_body_gives_whatever_the_chunking(
    lines: list[str], crlf: bool, final_newline: bool, cuts: list[int]
) -> None:
    body = ("\r\n" if crlf else "\n").join(lines).encode()
    if final_newline:
        body += b"\n"
    assert await outcome(chunked(body, cuts)) == whole(body)


async def test_a_line_over_the_record_limit_is_counted_by_its_length_not_kept() -> None:
    long_line = b'{"title": "' + b"x" * (MAX_RECORD_BYTES + 10) + b'"}'
    body = b'{"title": "ok", "variants": [{"sku": "A", "price": 1}]}\n' + long_line + b"\n"
    with pytest.raises(InvalidInputError) as caught:
        await spool_lines(chunked(body, list(range(0, len(body), 4096))), None)
    assert caught.value.field == "lines.2"
    assert f"record is {len(long_line)} bytes" in str(caught.value)


async def test_past_the_spools_memory_the_records_go_to_a_file_and_come_back_the_same() -> None:
    one = json.dumps({"title": "Shoe ✓", "variants": [{"sku": "S-1", "price": "9.90"}]})
    count = SPOOL_MEMORY_BYTES // len(one.encode()) + 100
    body = ("\n".join([one] * count)).encode()
    spooled = await spool_lines(chunked(body, list(range(0, len(body), 65536))), None)
    try:
        assert spooled.count == count
        assert spooled._file._rolled  # on disk now, not in memory
        assert list(spooled) == [one] * count
    finally:
        spooled.close()


async def test_limits_are_checked_as_the_body_arrives() -> None:
    with pytest.raises(BodyTooLarge):
        await spool_lines(chunked(b"{}\n" * 100, []), None, max_bytes=299)
    with pytest.raises(BodyTooLarge):  # a declared length over the limit: refused unread
        await spool_lines(chunked(b"", []), "1000", max_bytes=999)
    with pytest.raises(InvalidInputError, match="at most 3 records"):
        await spool_lines(chunked(b"{}\n" * 4, []), None, max_records=3)
    with pytest.raises(InvalidInputError, match="no records"):
        await spool_lines(chunked(b"\n \n", []), None)


def test_a_json_line_that_is_no_object_is_the_workers_poison_pill_not_a_refusal() -> None:
    """As a line that is not JSON at all: the gateway stores it as it came and the worker
    dead-letters it with its reason (``aura demo``'s sample catalog has such lines)."""
    from aura.gateway.bodies import _line_problems

    assert _line_problems(b'["an", "array"]', "lines.1") == '["an", "array"]'
    assert _line_problems(b'"just a string"', "lines.2") == '"just a string"'
    assert _line_problems(b"not json {", "lines.3") == "not json {"
