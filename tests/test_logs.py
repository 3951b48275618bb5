"""Logging: one JSON object per line, secrets masked in our records and the libraries'."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from aura import logs


@pytest.fixture(scope="module")
def log_stream() -> io.StringIO:
    stream = io.StringIO()
    logs._configured = False  # configure afresh onto our stream
    logs.configure_logging("INFO", "json", stream=stream)
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
