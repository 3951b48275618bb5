"""Logging: one JSON object per line, secrets masked in our records and the libraries'."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aura import logs


@pytest.fixture(scope="module")
def log_stream() -> io.StringIO:
    stream = io.StringIO()
    logs._configured = False  # configure afresh onto our stream
    logs.configure_logging("INFO", "json", stream=stream, cache=False)
    return stream


def last_record(stream: io.StringIO) -> dict[str, object]:
    lines = [line for line in stream.getvalue().splitlines() if line.strip()]
    record = json.loads(lines[-1])
    assert isinstance(record, dict)
    return record


def test_structlog_records_are_json_with_secret_keys_masked(log_stream: io.StringIO) -> None:
    structlog.get_logger("aura.test").info(
        "connecting", api_key="sk-abc123", password="hunter22", dsn="postgresql://u:pw99@h/db"
    )
    record = last_record(log_stream)
    assert record["event"] == "connecting"
    assert record["level"] == "info"
    assert record["api_key"] == "***"
    assert record["password"] == "***"
    assert record["dsn"] == "postgresql://u:***@h/db"


def test_library_logs_and_registered_secrets_are_masked(log_stream: io.StringIO) -> None:
    logs.register_secret("sk-registered-999")
    logging.getLogger("celery.worker").warning(
        "broker amqp://guest:topsecret@rabbit// said no to key sk-registered-999"
    )
    text = json.dumps(last_record(log_stream))
    assert "topsecret" not in text
    assert "sk-registered-999" not in text
    assert "amqp://guest:***@rabbit//" in text


def test_exception_text_is_redacted(log_stream: io.StringIO) -> None:
    try:
        raise ConnectionError("cannot reach redis://:s3cr3tpass@cache:6379/0")
    except ConnectionError:
        structlog.get_logger("aura.test").exception("redis down")
    record = last_record(log_stream)
    assert "s3cr3tpass" not in json.dumps(record)
    assert "ConnectionError" in str(record["exception"])


def test_bearer_tokens_are_masked() -> None:
    assert logs.redact_text("Authorization: Bearer abc.def.ghi") == "Authorization: Bearer ***"


@given(password=st.from_regex(r"[A-Za-z0-9_.~!$&'()*+,;=-]{1,24}", fullmatch=True))
def test_url_passwords_never_survive(password: str) -> None:
    text = logs.redact_text(f"dsn=postgresql://app:{password}@db:5432/x tail")
    assert text == "dsn=postgresql://app:***@db:5432/x tail"


def test_more_url_forms_are_masked() -> None:
    text = logs.redact_text(
        "a POSTGRESQL+asyncpg://app:pw1@db/x, 1postgresql://u:pw2@h and "
        "jdbc:postgresql://u:pw3@h; git+ssh://me:pw4@host/repo Bearer\ttok5"
    )
    for secret in ("pw1", "pw2", "pw3", "pw4", "tok5"):
        assert secret not in text
    assert "POSTGRESQL+asyncpg://app:***@db/x" in text
    assert logs.redact_text("http://localhost:8080/x and mail me:x@y") == (
        "http://localhost:8080/x and mail me:x@y"
    )


ADVERSARIAL = [
    "d",
    "a://",
    "x:y@",
    "bearer ",
    "Bearer tok ",
    "bearer",
    "a://u:",
    "a://u:p",
    "1",
    "+.-",
    "a:",
    ":/",
    "://",
    "a://b:c@",
    "@",
    " ",
    "\t",
    "é",
    "a1",
    "x://u:p@h ",
]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("unit", ADVERSARIAL)
def test_redaction_of_4_mb_of_adversarial_text_finishes(unit: str) -> None:
    # The quadratic pattern took 11 s for 30,000 letters; linear, 4 MB takes milliseconds.
    text = unit * (4_000_000 // len(unit))
    assert len(logs.redact_text(text)) >= len(text) // 2
    assert "secret" not in logs.redact_text(text + " a://u:secret@h")


@pytest.mark.timeout(30)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(unit=st.text(alphabet="ab1:/@+.- \tBbEeRr,", min_size=1, max_size=12))
def test_redaction_of_1_mb_of_any_repeated_pattern_finishes(unit: str) -> None:
    text = unit * (1_000_000 // len(unit))
    assert logs.redact_text(text).count(logs.MASK) >= text.count(logs.MASK)


# -- bounded texts -----------------------------------------------------------------------


def test_bounded_text_cuts_then_redacts() -> None:
    assert logs.bounded_text("abcdef", 3) == "abc"
    assert logs.bounded_text("abc", 10) == "abc"
    assert logs.bounded_text("dsn=redis://u:pw@h", 100) == "dsn=redis://u:***@h"
    assert logs.bounded_text("anything", 0) == ""


def test_a_url_password_cut_in_half_is_masked_at_every_cut() -> None:
    text = "connect to postgresql://app:Zq7xW2kPq@db:5432/x now"
    start = text.index("Zq")
    for limit in range(len(text) + 1):
        cut = logs.bounded_text(text, limit)
        assert len(cut) <= limit
        assert "Zq" not in cut, cut
        if limit > start:
            assert cut.startswith("connect to postgresql://app:*")


def test_a_registered_secret_cut_in_half_is_masked() -> None:
    logs.register_secret("tok-ABCDEFGH")
    for limit in range(len("key tok-"), len("key tok-ABCDEFGH")):
        assert "tok-" not in logs.bounded_text("key tok-ABCDEFGH end", limit)


def test_a_log_field_of_1_mb_is_cut_with_a_marker(log_stream: io.StringIO) -> None:
    blob = "x" * 1_000_000
    structlog.get_logger("aura.test").info(blob, blob=blob, nested={"inner": [blob]})
    record = last_record(log_stream)
    cut = 1_000_000 - logs.MAX_LOG_FIELD
    expected = "x" * logs.MAX_LOG_FIELD + f"…[cut {cut} chars]"
    assert record["blob"] == expected
    assert record["event"] == expected
    assert record["nested"] == {"inner": [expected]}


def test_library_records_and_tracebacks_are_cut(log_stream: io.StringIO) -> None:
    logging.getLogger("celery.worker").warning("y" * 1_000_000)
    assert len(str(last_record(log_stream)["event"])) < logs.MAX_LOG_FIELD + 100
    try:
        raise ValueError("z" * 1_000_000)
    except ValueError:
        structlog.get_logger("aura.test").exception("huge")
    exception = str(last_record(log_stream)["exception"])
    assert exception.startswith("Traceback")
    assert len(exception) < logs.MAX_LOG_FIELD + 100
    assert exception.endswith("chars]")


def test_a_password_cut_off_by_the_field_limit_is_masked(log_stream: io.StringIO) -> None:
    field = "a" * (logs.MAX_LOG_FIELD - len("redis://:Zq7")) + "redis://:Zq7xW2kPq@h/0"
    structlog.get_logger("aura.test").info("cut", dsn=field)
    dsn = str(last_record(log_stream)["dsn"])
    assert "Zq" not in dsn
    assert dsn.endswith("redis://:***…[cut 10 chars]")


def test_a_list_of_10000_items_is_bounded(log_stream: io.StringIO) -> None:
    structlog.get_logger("aura.test").info(
        "many", items=list(range(10_000)), mapping={str(i): i for i in range(10_000)}
    )
    record = last_record(log_stream)
    items = record["items"]
    assert isinstance(items, list)
    assert items[: logs.MAX_LOG_ITEMS] == list(range(logs.MAX_LOG_ITEMS))
    assert items[logs.MAX_LOG_ITEMS :] == [f"…[cut {10_000 - logs.MAX_LOG_ITEMS} items]"]
    mapping = record["mapping"]
    assert isinstance(mapping, dict)
    assert len(mapping) == logs.MAX_LOG_ITEMS + 1
    assert mapping["…"] == f"[cut {10_000 - logs.MAX_LOG_ITEMS} items]"


def test_wide_and_deep_structures_are_bounded_in_all(log_stream: io.StringIO) -> None:
    wide: list[object] = [0] * 100
    for _ in range(8):
        wide = [wide] * 100  # 100 ** 9 leaves, built from nine small lists
    deep: list[object] = []
    for _ in range(50):
        deep = [deep]
    structlog.get_logger("aura.test").info("shapes", wide=wide)
    record = last_record(log_stream)
    assert len(json.dumps(record)) < 100_000  # at most _MAX_LOG_NODES values in all
    assert "…[cut 99 items]" in json.dumps(record["wide"], ensure_ascii=False)
    structlog.get_logger("aura.test").info("shapes", deep=deep)
    assert "<nested too deep>" in json.dumps(last_record(log_stream)["deep"])


def test_exceptions_as_fields_are_redacted(log_stream: io.StringIO) -> None:
    structlog.get_logger("aura.test").warning(
        "lost", error=ConnectionError("redis://:s3cr3tpass@cache:6379/0")
    )
    assert "s3cr3tpass" not in json.dumps(last_record(log_stream))
