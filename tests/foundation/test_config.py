"""Settings: the seed's names and defaults, and one clear line for every bad value."""

from __future__ import annotations

import os
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aura.config import Settings, load_settings, mask_url
from aura.errors import ConfigurationError

SEED_DEFAULTS = {
    "DB_POOL_SIZE": 50,
    "DB_MAX_OVERFLOW": 100,
    "DB_POOL_RECYCLE": 1800,
    "CELERY_TASK_SOFT_TIME_LIMIT": 45,
    "CELERY_TASK_HARD_TIME_LIMIT": 60,
    "CELERY_WORKER_MAX_TASKS_PER_CHILD": 1000,
    "RETRY_TRACKER_MAX_RETRIES": 3,
    "RETRY_TRACKER_TTL": 3600,
    "CIRCUIT_BREAKER_FAIL_MAX": 3,
    "CIRCUIT_BREAKER_RESET_TIMEOUT": 60,
}
INTEGER_VARIABLES = [
    "DB_POOL_SIZE",
    "DB_POOL_RECYCLE",
    "CELERY_WORKER_MAX_TASKS_PER_CHILD",
    "RETRY_TRACKER_TTL",
    "CIRCUIT_BREAKER_FAIL_MAX",
]


def settings_from(env: dict[str, str]) -> Settings:
    """Load settings from exactly ``env`` (nothing of the caller's environment leaks in)."""
    with mock.patch.dict(os.environ, env, clear=True):
        return load_settings()


def error_from(env: dict[str, str]) -> str:
    with pytest.raises(ConfigurationError) as caught:
        settings_from(env)
    message = str(caught.value)
    assert "\n" not in message, "a settings error is one line"
    return message


def test_defaults_are_the_seeds() -> None:
    settings = settings_from({})
    for variable, expected in SEED_DEFAULTS.items():
        assert getattr(settings, variable.lower()) == expected, variable
    assert (settings.llm_connect_timeout, settings.llm_read_timeout) == (5, 10)
    assert (settings.llm_write_timeout, settings.llm_pool_timeout) == (5, 5)


def test_environment_overrides_every_seed_variable() -> None:
    env = {name: str(value + 1) for name, value in SEED_DEFAULTS.items()}
    env["CELERY_TASK_HARD_TIME_LIMIT"] = "100"
    settings = settings_from(env)
    for variable in SEED_DEFAULTS:
        assert str(getattr(settings, variable.lower())) in {env[variable], env[variable] + ".0"}


@pytest.mark.parametrize(
    ("env", "named", "expected"),
    [
        ({"DB_POOL_SIZE": "abc"}, "DB_POOL_SIZE='abc'", "expected a whole number"),
        ({"RETRY_TRACKER_TTL": "-5"}, "RETRY_TRACKER_TTL='-5'", "greater than 0"),
        (
            {"CELERY_TASK_SOFT_TIME_LIMIT": "61"},
            "CELERY_TASK_SOFT_TIME_LIMIT",
            "must be below CELERY_TASK_HARD_TIME_LIMIT",
        ),
        (
            {"CELERY_TASK_SOFT_TIME_LIMIT": "10", "CELERY_TASK_HARD_TIME_LIMIT": "10"},
            "CELERY_TASK_SOFT_TIME_LIMIT",
            "(got 10 >= 10)",
        ),
        ({"CIRCUIT_BREAKER_RESET_TIMEOUT": "soon"}, "CIRCUIT_BREAKER_RESET_TIMEOUT", "a number"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL='LOUD'", "expected one of"),
        (
            {"REDIS_URL": "http://localhost"},
            "REDIS_URL",
            "scheme redis or redis+sentinel or rediss",
        ),
    ],
)
def test_bad_values_name_the_variable_and_what_is_expected(
    env: dict[str, str], named: str, expected: str
) -> None:
    message = error_from(env)
    assert named in message
    assert expected in message


def test_two_bad_values_are_both_named_on_one_line() -> None:
    message = error_from({"DB_POOL_SIZE": "x", "DB_MAX_OVERFLOW": "-1"})
    assert "DB_POOL_SIZE" in message
    assert "DB_MAX_OVERFLOW" in message


def test_service_urls_are_normalised_to_the_async_drivers() -> None:
    settings = settings_from(
        {"DATABASE_URL": "postgres://u@h/db", "CELERY_BROKER_URL": "amqp://g:g@h//"}
    )
    assert settings.database_url == "postgresql+asyncpg://u@h/db"
    assert settings_from({"DATABASE_URL": "sqlite:///x.db"}).database_url == (
        "sqlite+aiosqlite:///x.db"
    )
    assert settings_from({}).database_url is None  # unset: the embedded default


def test_display_masks_the_api_key_and_url_passwords() -> None:
    settings = settings_from(
        {"LLM_API_KEY": "sk-live-1234567", "DATABASE_URL": "postgresql://app:hunter22@db:5432/x"}
    )
    shown = settings.as_display()
    assert shown["LLM_API_KEY"] == "***"
    assert shown["DATABASE_URL"] == "postgresql+asyncpg://app:***@db:5432/x"
    assert "hunter22" not in repr(settings)
    assert "sk-live-1234567" not in repr(settings)


def test_a_bad_url_never_echoes_its_password() -> None:
    message = error_from({"DATABASE_URL": "mysql://app:hunter22@db/x"})
    assert "hunter22" not in message
    assert "DATABASE_URL='mysql://app:***@db/x'" in message


@given(st.text(min_size=1, max_size=30).filter(lambda s: not s.strip().lstrip("+").isdigit()))
def test_any_non_integer_is_refused_with_the_variables_name(value: str) -> None:
    # Only values that environment variables can hold (no NUL, valid Unicode).
    if "\x00" in value or any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
        return
    for variable in INTEGER_VARIABLES:
        try:
            settings_from({variable: value})
            error = ""
        except ConfigurationError as exc:
            error = str(exc)
        if error:
            assert variable in error
            assert "\n" not in error
        else:  # pydantic accepts a few spellings of integers ("1_0", " 7 ", "3.0")
            assert float(value.replace("_", "")).is_integer()


@given(st.integers(min_value=1, max_value=10**9))
def test_any_positive_integer_is_accepted(value: int) -> None:
    for variable in INTEGER_VARIABLES:
        assert getattr(settings_from({variable: str(value)}), variable.lower()) == value


@given(
    soft=st.floats(min_value=0.001, max_value=10_000, allow_nan=False),
    hard=st.floats(min_value=0.001, max_value=10_000, allow_nan=False),
)
def test_soft_limit_must_be_below_hard_limit(soft: float, hard: float) -> None:
    env = {"CELERY_TASK_SOFT_TIME_LIMIT": repr(soft), "CELERY_TASK_HARD_TIME_LIMIT": repr(hard)}
    if soft < hard:
        settings = settings_from(env)
        assert settings.celery_task_soft_time_limit == soft
    else:
        assert "must be below CELERY_TASK_HARD_TIME_LIMIT" in error_from(env)


@given(st.integers(max_value=0))
def test_non_positive_ttls_are_refused(value: int) -> None:
    assert "RETRY_TRACKER_TTL" in error_from({"RETRY_TRACKER_TTL": str(value)})


@given(
    user=st.from_regex(r"[a-z]{1,8}", fullmatch=True),
    password=st.from_regex(r"[A-Za-z0-9!$%^*()_-]{4,20}", fullmatch=True),
)
def test_mask_url_never_keeps_the_password(user: str, password: str) -> None:
    masked = mask_url(f"postgresql://{user}:{password}@db.internal:5432/app")
    assert masked == f"postgresql://{user}:***@db.internal:5432/app"
