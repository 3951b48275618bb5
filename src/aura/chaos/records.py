"""What scenarios send: well-formed records from the bundled catalog, malformed records
(the gateway accepts them; the worker's parser refuses them), and raw broker messages of
every kind the envelope guard refuses."""

from __future__ import annotations

import json
import uuid
from typing import Any

from aura.catalog import parse_product
from aura.contract import INGEST_TASK
from aura.demo.options import catalog_records
from aura.errors import InvalidInputError

__all__ = ["MALFORMED_RECORDS", "malformed_messages", "valid_records"]


def valid_records(count: int) -> list[str]:
    """``count`` well-formed records from the bundled catalog."""
    good: list[str] = []
    for record in catalog_records(int(count * 1.1) + 40):
        try:
            parse_product(json.loads(record))
        except (ValueError, InvalidInputError):
            continue
        good.append(record)
        if len(good) == count:
            return good
    raise AssertionError("the bundled catalog ran out of valid records")  # pragma: no cover


MALFORMED_RECORDS = [
    '{"title": "Broken JSON", "variants": [',  # bad JSON
    '{"title": "Lone surrogate \\udcff", "variants": [{"sku": "BAD-ENC", "price": "1"}]}',
    '{"brand": "No title", "variants": [{"sku": "BAD-MISSING", "price": "1"}]}',  # missing key
    '{"title": "Wrong types", "variants": [{"sku": 7, "price": "free"}]}',
    '{"title": "Not a list", "variants": "SKU-1"}',
    '["an", "array", "not", "an", "object"]',
    '"just a string"',
]


def malformed_messages(
    marker: str,
) -> list[tuple[str, bytes, str | None, str | None, dict[str, Any] | None]]:
    """(kind, body, content type, encoding, headers): one of every kind the envelope guard
    refuses (``aura.messaging.envelope``); each body carries ``marker``."""

    def headers(task: str = INGEST_TASK, **extra: Any) -> dict[str, Any]:
        return {"task": task, "id": str(uuid.uuid4()), "lang": "py", **extra}

    ok = json.dumps([[marker, str(uuid.uuid4())], {}, {}]).encode()
    js, utf8 = "application/json", "utf-8"
    deep = ("[" * 1000 + f'"{marker}"' + "]" * 1000).encode()
    pickled = b"\x80\x04K\x01." + marker.encode()
    no_headers = json.dumps({"task": INGEST_TASK, "args": [marker]}).encode()
    too_many = json.dumps([[marker, 1, 2, 3, 4, 5], {}, {}]).encode()
    gzip = headers(compression="application/x-gzip")
    return [
        ("not_json", f"not json {marker} {{".encode(), js, utf8, headers()),
        ("not_json", b'["\xff\xfe' + marker.encode() + b'"]', js, utf8, headers()),
        ("bad_shape", json.dumps({"run": marker}).encode(), js, utf8, headers()),
        ("bad_shape", json.dumps([[marker], {}]).encode(), js, utf8, headers()),
        ("content_type", ok, "text/plain", utf8, headers()),
        ("content_type", pickled, "application/x-python-serialize", "binary", headers()),
        ("not_protocol_2", ok, js, utf8, {"id": str(uuid.uuid4())}),
        ("not_protocol_2", no_headers, js, utf8, None),
        ("unknown_task", ok, js, utf8, headers(task="aura.no_such_task")),
        ("bad_arguments", too_many, js, utf8, headers()),
        ("bad_headers", ok, js, utf8, headers(timelimit="soon")),
        ("bad_headers", ok, js, utf8, headers(eta="the day after tomorrow")),
        ("too_deep", b"[" + deep + b", {}, {}]", js, utf8, headers()),
        ("bad_message_id", ok, js, utf8, {**headers(), "id": "../../etc/passwd"}),
        ("not_json", b"not zlib " + marker.encode(), js, utf8, gzip),
    ]
