"""Settings: the seed's environment variables with the seed's defaults, validated once.

Names and defaults are a contract (the resilience-patterns document, "Configuration").
A service URL left unset means the embedded default: SQLite for ``DATABASE_URL``, an
in-process Redis stand-in for ``REDIS_URL``, an in-process broker for
``CELERY_BROKER_URL`` and the bundled LLM simulator for ``LLM_BASE_URL``.

A ``.env`` file in the working directory is read too (``AURA_ENV_FILE`` names another;
``AURA_ENV_FILE=`` empty reads none); variables set in the environment win over it.

``load_settings()`` turns pydantic's report into one ``ConfigurationError`` line that
names each bad variable and what it expects, with secrets never echoed.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    Field,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from aura.budget_settings import check_budget_default, check_tenant_budgets
from aura.errors import ConfigurationError
from aura.tenancy import parse_tenant_weights
from aura.tenant_labels import check_metrics_tenants

__all__ = ["Settings", "get_settings", "load_settings", "mask_url", "parse_rate_limits"]

_URL_SCHEMES: dict[str, dict[str, str]] = {
    # accepted scheme -> the scheme Aura uses
    "DATABASE_URL": {
        "postgresql+asyncpg": "postgresql+asyncpg",
        "postgresql": "postgresql+asyncpg",
        "postgres": "postgresql+asyncpg",
        "sqlite+aiosqlite": "sqlite+aiosqlite",
        "sqlite": "sqlite+aiosqlite",
    },
    "REDIS_URL": {s: s for s in ("redis", "rediss", "unix", "redis+sentinel")},
    "DLQ_DATABASE_URL": {},  # DATABASE_URL's, set below
    "CELERY_BROKER_URL": {s: s for s in ("amqp", "amqps", "pyamqp", "memory")},
    "LLM_BASE_URL": {"http": "http", "https": "https"},
}

_SECRET_VARIABLES = frozenset({"LLM_API_KEY"})
_MAX_SHOWN_VALUE = 40

_SECRET_KEYS = ("password", "passwd", "pwd", "secret", "token", "api_key", "apikey")


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` wherever it is: ``user:pw@`` and a
    query's ``password=`` (and any name ending so: ``sentinel_password=``), ``token=``, ...;
    each URL of a ``;``-separated list (a broker's nodes); the rest kept for debugging."""
    if ";" in url:
        return ";".join(mask_url(part) for part in url.split(";"))
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not parseable as a URL: mask what looks like a secret in it
        from aura.logs import redact_text

        return redact_text(url)
    if password is not None:
        host = parts.netloc.rpartition("@")[2]  # every host of a list (Sentinel's) kept
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if parts.query:
        pairs = [pair.partition("=") for pair in parts.query.split("&")]
        parts = parts._replace(
            query="&".join(
                f"{name}{sep}***" if name.lower().endswith(_SECRET_KEYS) and sep else name + sep + v
                for name, sep, v in pairs
            )
        )
    return urlunsplit(parts)


_URL_SCHEMES["DLQ_DATABASE_URL"] = _URL_SCHEMES["DATABASE_URL"]


def _normalise_url(variable: str, value: str | None) -> str | None:
    if value is None or value.strip() == "":
        return None
    value = value.strip()
    if ";" in value and variable == "CELERY_BROKER_URL":  # kombu's failover list: each node
        return ";".join(f"{_normalise_url(variable, n)}" for n in value.split(";") if n.strip())
    scheme, sep, rest = value.partition("://")
    accepted = _URL_SCHEMES[variable]
    if not sep or scheme.lower() not in accepted:
        raise ValueError(f"expected a URL with scheme {' or '.join(sorted(accepted))}")
    if not rest:
        raise ValueError("expected a URL with a host or path after '://'")
    return f"{accepted[scheme.lower()]}://{rest}"


class Settings(BaseSettings):
    """Aura's configuration, read from the environment (case-insensitive names)."""

    model_config = SettingsConfigDict(
        case_sensitive=False,
        extra="ignore",
        frozen=True,
        env_file=os.environ.get("AURA_ENV_FILE", ".env") or None,
        env_file_encoding="utf-8",
    )

    # Database resilience
    db_pool_size: PositiveInt = 50
    db_max_overflow: int = Field(default=100, ge=0)
    db_pool_recycle: PositiveInt = 1800
    db_connect_timeout: PositiveFloat = 10.0  # not in the seed: asyncpg's default is 60 s
    # Celery resilience
    celery_task_soft_time_limit: PositiveFloat = 45
    celery_task_hard_time_limit: PositiveFloat = 60
    celery_worker_max_tasks_per_child: PositiveInt = 1000
    # Retry tracking
    retry_tracker_max_retries: int = Field(default=3, ge=0)
    retry_tracker_ttl: PositiveInt = 3600
    # Not in the seed: a task's retry backoff (aura.backoff.Backoff), base doubling to max
    retry_backoff_base: PositiveFloat = 1.0
    retry_backoff_max: PositiveFloat = 60.0
    # Circuit breaker
    circuit_breaker_fail_max: PositiveInt = 3
    circuit_breaker_reset_timeout: PositiveFloat = 60
    # Not in the seed: failures further apart than this never add up to an open breaker
    circuit_breaker_failure_window: PositiveFloat = 60
    # What one breaker covers: each (provider, model), each model, or each provider
    circuit_breaker_key: Literal["provider_model", "model", "provider"] = "provider_model"
    # Services (unset: the embedded default)
    database_url: str | None = None
    redis_url: str | None = None
    celery_broker_url: str | None = None
    # The dead-letter store (aura.messaging.dlq): its database (unset: DATABASE_URL) and
    # how much it keeps (0 = no bound); what retention drops is counted in
    # aura_dlq_letters_dropped_total
    dlq_database_url: str | None = None
    dlq_retention_letters: int = Field(default=1_000_000, ge=0)
    dlq_retention_days: float = Field(default=0.0, ge=0)
    # LLM provider (unset base URL: the bundled simulator)
    llm_base_url: str | None = None
    # Which API it speaks (not in the seed): openai or anthropic (aura.llm._providers)
    llm_provider: str = Field(default="openai", min_length=1)
    llm_api_key: SecretStr = SecretStr("")
    llm_model: str = Field(default="gpt-4o-mini", min_length=1)
    llm_connect_timeout: PositiveFloat = 5.0
    llm_read_timeout: PositiveFloat = 10.0
    llm_write_timeout: PositiveFloat = 5.0
    llm_pool_timeout: PositiveFloat = 5.0
    llm_call_deadline: PositiveFloat = 30.0  # whole call; the read timeout is per read
    llm_first_token_timeout: PositiveFloat = 10.0  # streaming: until the first chunk
    # A call refused while the breaker's trial runs waits this long for its outcome
    llm_trial_wait: float = Field(default=5.0, ge=0)
    # aiohttp under httpx.AsyncClient (bench/llm_transport.py), or httpx's own pool
    llm_http_transport: Literal["aiohttp", "httpx"] = "aiohttp"
    llm_max_connections: PositiveInt = 500  # sized for the calls a process keeps in flight
    # Fleet-wide rate limits per provider and model (0: none), through Redis
    llm_rate_limit_rpm: float = Field(default=0.0, ge=0)
    llm_rate_limit_tpm: float = Field(default=0.0, ge=0)
    llm_rate_limit_burst: PositiveFloat = 1.0  # seconds' worth of budget spent at once
    llm_rate_limit_max_wait: float = Field(default=10.0, ge=0)  # longer: deferred
    llm_completion_tokens_estimate: PositiveInt = 512  # charged when max_tokens is unset
    # Per provider and model, over the three above: "MODEL rpm=N tpm=N burst=S; ..." where
    # MODEL is a model name or host[:port]/model (aura.llm.ratelimit)
    llm_rate_limits: str = ""
    # The adaptive share of those limits (AIMD on 429s and latency; aura.llm.ratelimit)
    llm_rate_limit_adaptive: bool = True
    llm_rate_limit_decrease: float = Field(default=0.7, gt=0, lt=1)  # x on a 429
    llm_rate_limit_recovery: PositiveFloat = 60.0  # seconds from 0 back to the whole limit
    llm_rate_limit_latency: float = Field(default=0.0, ge=0)  # slower answers: 0 = ignored
    # Tenants' LLM token budgets, fleet-wide (aura.budget_settings, aura.llm.budgets):
    # "TENANT=PER_MIN/PER_DAY,..." and every other tenant's ("PER_MIN/PER_DAY" or "none");
    # a task over budget is deferred, past LLM_BUDGET_MAX_DEFERRALS dead-lettered
    llm_tenant_budgets: Annotated[str, AfterValidator(check_tenant_budgets)] = ""
    llm_tenant_budget_default: Annotated[str, AfterValidator(check_budget_default)] = "none"
    llm_budget_max_deferrals: int = Field(default=60, ge=0)
    # Worker observability (not in the seed)
    worker_metrics_port: int = Field(default=9100, ge=0, le=65535)  # 0: no endpoint
    # Tenant ids a metric label may name, comma-separated (aura.tenant_labels); others: "other"
    metrics_tenants: Annotated[str, AfterValidator(check_metrics_tenants)] = ""
    # How a worker process runs tasks (not in the seed): "async" holds up to
    # WORKER_CONCURRENCY async tasks at once on one event loop (aura.messaging.pool);
    # "prefork" runs one task per child process (Celery's default; for def tasks).
    worker_pool: Literal["async", "prefork"] = "async"
    worker_concurrency: int = Field(default=100, ge=1, le=2000)
    worker_queue_poll_interval: PositiveFloat = 5.0
    # The gateway's outbox relay (not in the seed): how often it looks for messages a
    # failed publish left behind, and how old one must be before the relay takes it.
    outbox_relay_interval: PositiveFloat = 5.0
    outbox_relay_min_age: PositiveFloat = 30.0
    # Tenants' fair share (not in the seed; aura.gateway.dispatch, aura.messaging.pool):
    # "fair" holds an import's records in the outbox and releases them a fair share per
    # tenant at a time, keeping each work queue at least OUTBOX_DISPATCH_DEPTH deep (looked at
    # every OUTBOX_DISPATCH_INTERVAL seconds); "fifo" publishes every record at once, in
    # arrival order. TENANT_WEIGHTS: "<tenant uuid>=<weight>,..." (default weight 1).
    # The depth is a floor: the dispatcher keeps about 0.5 s of its measured rate.
    tenant_scheduling: Literal["fair", "fifo"] = "fair"
    tenant_weights: str = ""
    outbox_dispatch_depth: int = Field(default=50, ge=1, le=100_000)
    outbox_dispatch_interval: PositiveFloat = 0.25
    # The gateway's admission (not in the seed): tenant requests served at once, and how
    # long one more may wait for a slot before it is answered 503 with Retry-After.
    gateway_max_in_flight: int = Field(default=64, ge=1, le=10_000)
    gateway_max_wait: float = Field(default=1.0, ge=0.0, le=60.0)
    # ... the share of those slots one tenant may hold (so no tenant can take them all)
    gateway_tenant_share: float = Field(default=0.5, gt=0.0, le=1.0)
    # The gateway's reads (aura.gateway.server): a request's headers must arrive within
    # GATEWAY_HEADER_TIMEOUT seconds of its first byte and fit GATEWAY_MAX_HEADER_BYTES; a
    # body must keep arriving at GATEWAY_BODY_MIN_RATE bytes/s (after a grace of
    # GATEWAY_BODY_GRACE s) and never pause GATEWAY_BODY_IDLE_TIMEOUT s; an idle
    # keep-alive connection is closed after GATEWAY_KEEP_ALIVE_TIMEOUT s; at most
    # GATEWAY_MAX_CONNECTIONS connections are served at once (beyond: 503).
    gateway_header_timeout: PositiveFloat = 10.0
    gateway_max_header_bytes: int = Field(default=64 * 1024, ge=1024, le=1024 * 1024)
    gateway_body_min_rate: float = Field(default=1024.0, ge=0.0)
    gateway_body_grace: float = Field(default=10.0, ge=0.0)
    gateway_body_idle_timeout: PositiveFloat = 30.0
    gateway_keep_alive_timeout: PositiveFloat = 5.0
    gateway_max_connections: int = Field(default=10_000, ge=1, le=1_000_000)
    # Authentication before admission: a client address may fail (or look up an unknown
    # key) this many times a second, in bursts of twice that; past it, 429 + Retry-After.
    gateway_auth_failures_per_second: float = Field(default=20.0, gt=0.0)
    # Imports (not in the seed): records per import and bytes per body. A JSON array is
    # read whole (at most IMPORT_MAX_JSON_BYTES); JSON lines are streamed.
    import_max_records: int = Field(default=1_000_000, ge=1, le=100_000_000)
    import_max_bytes: int = Field(default=1024**3, ge=1024, le=64 * 1024**3)
    # Logging
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    # auto: human lines when stderr is a terminal, JSON otherwise (pipes, files, services)
    log_format: Literal["auto", "json", "console"] = "auto"

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _case(cls, value: Any, info: Any) -> Any:  # LOG_LEVEL upper case, LOG_FORMAT lower
        if not isinstance(value, str):
            return value
        return value.strip().upper() if info.field_name == "log_level" else value.strip().lower()

    @field_validator("llm_rate_limits")
    @classmethod
    def _check_rate_limits(cls, value: str) -> str:
        parse_rate_limits(value)
        return value

    @field_validator("tenant_weights")
    @classmethod
    def _check_tenant_weights(cls, value: str) -> str:
        parse_tenant_weights(value)
        return value

    @property
    def weights_by_tenant(self) -> dict[str, float]:
        """``TENANT_WEIGHTS`` parsed: tenant id (canonical UUID text) -> weight."""
        return parse_tenant_weights(self.tenant_weights)

    @property
    def rate_limits_by_model(self) -> dict[str, dict[str, float]]:
        """``LLM_RATE_LIMITS`` parsed: model (or host[:port]/model) -> {rpm, tpm, burst}."""
        return parse_rate_limits(self.llm_rate_limits)

    @field_validator(
        "database_url", "dlq_database_url", "redis_url", "celery_broker_url", "llm_base_url"
    )
    @classmethod
    def _check_url(cls, value: str | None, info: Any) -> str | None:
        url = _normalise_url(info.field_name.upper(), value)
        if url and info.field_name == "redis_url":
            from aura.redis_connect import redis_url_problem  # loads redis: only when set

            if problem := redis_url_problem(url):
                raise ValueError(problem)
        return url

    @model_validator(mode="after")
    def _soft_below_hard(self) -> Settings:
        if self.celery_task_soft_time_limit >= self.celery_task_hard_time_limit:
            raise ValueError(
                "CELERY_TASK_SOFT_TIME_LIMIT must be below CELERY_TASK_HARD_TIME_LIMIT "
                f"(got {self.celery_task_soft_time_limit:g} >= "
                f"{self.celery_task_hard_time_limit:g})"
            )
        return self

    def __repr_args__(self) -> Any:
        # repr() ends up in logs and tracebacks: never with a URL password in it.
        for name, value in super().__repr_args__():
            if isinstance(name, str) and name.upper() in _URL_SCHEMES and value is not None:
                yield name, mask_url(str(value))
            else:
                yield name, value

    def sources(self) -> dict[str, str]:
        """Where each setting came from, by environment name: ``environment``, the env file
        (``.env``, or the file ``AURA_ENV_FILE`` names) or ``default``. A value set and not in
        the environment came from the file: ``load_settings`` passes no arguments, and the
        environment wins over the file."""
        environment = {name.upper() for name in os.environ}
        given = {name.upper() for name in self.model_fields_set}
        env_file = self.model_config.get("env_file")
        from_file = str(env_file) if isinstance(env_file, str | os.PathLike) else "env file"

        def source(variable: str) -> str:
            if variable not in given:
                return "default"
            return "environment" if variable in environment else from_file

        return {name.upper(): source(name.upper()) for name in type(self).model_fields}

    def as_display(self) -> dict[str, str]:
        """Effective settings by environment name, secrets and URL passwords masked."""
        shown: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            variable = name.upper()
            if isinstance(value, SecretStr):
                shown[variable] = "***" if value.get_secret_value() else "(unset)"
            elif value is None:
                shown[variable] = "(embedded default)"
            elif variable in _URL_SCHEMES:
                shown[variable] = mask_url(str(value))
            else:
                shown[variable] = f"{value:g}" if isinstance(value, float) else str(value)
        return shown


_RATE_FIELDS = ("rpm", "tpm", "burst")


def parse_rate_limits(text: str) -> dict[str, dict[str, float]]:
    """``"gpt-4o rpm=500 tpm=30000; api.example.com/gpt-4o-mini rpm=5000 burst=0.5"`` as
    {"gpt-4o": {"rpm": 500.0, "tpm": 30000.0}, ...}; ``ValueError`` naming what is wrong."""
    limits: dict[str, dict[str, float]] = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        model, *fields = entry.split()
        if not fields:
            raise ValueError(f"{model!r} has no limits: expected MODEL rpm=N tpm=N burst=S")
        values: dict[str, float] = {}
        for field in fields:
            name, _, number = field.partition("=")
            if name not in _RATE_FIELDS:
                raise ValueError(f"{model}: unknown limit {name!r} (expected rpm, tpm, burst)")
            try:
                values[name] = float(number)
            except ValueError:
                raise ValueError(f"{model}: {name} expects a number, got {number!r}") from None
            number_ok = math.isfinite(values[name]) and values[name] >= 0
            if not number_ok or (name == "burst" and not values[name] > 0):
                raise ValueError(f"{model}: {name} must be {'> 0' if name == 'burst' else '>= 0'}")
        if model in limits:
            raise ValueError(f"{model!r} appears twice")
        limits[model] = values
    return limits


def _describe(error: Any) -> str:
    """One clause for one pydantic error: 'VARIABLE=value: what is expected'."""
    location = error.get("loc") or ()
    if not location:  # a model-level rule; its message names the variables itself
        return str(error["msg"]).removeprefix("Value error, ")
    variable = str(location[0]).upper()
    kind = error["type"]
    expected = {
        "int_parsing": "expected a whole number",
        "int_from_float": "expected a whole number",
        "float_parsing": "expected a number",
        "greater_than": f"expected a number greater than {error.get('ctx', {}).get('gt')}",
        "greater_than_equal": f"expected a number >= {error.get('ctx', {}).get('ge')}",
        "literal_error": f"expected one of {error.get('ctx', {}).get('expected')}",
        "string_too_short": "expected a non-empty value",
        "finite_number": "expected a finite number",
    }.get(kind, str(error["msg"]).removeprefix("Value error, "))
    if variable in _SECRET_VARIABLES:
        return f"{variable}: {expected}"
    raw = error.get("input")
    shown = str(raw)
    if variable in _URL_SCHEMES:
        shown = mask_url(shown)
    if len(shown) > _MAX_SHOWN_VALUE:
        shown = shown[: _MAX_SHOWN_VALUE - 3] + "..."
    return f"{variable}={shown!r}: {expected}"


def load_settings() -> Settings:
    """Read and validate the environment; raise ``ConfigurationError`` (one line) if bad."""
    try:
        return Settings()
    except ValidationError as exc:
        clauses = [_describe(error) for error in exc.errors()]
        message = "invalid setting: " + "; ".join(clauses)
        # Not chained: pydantic's report echoes raw values, URL passwords included; the
        # clauses above keep everything it said, masked.
        raise ConfigurationError(" ".join(message.split())) from None


@functools.cache
def get_settings() -> Settings:
    """The process's settings, validated once on first use."""
    return load_settings()
