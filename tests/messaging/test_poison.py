"""The poison-pill detector: what it decides for every kind of failure, and that it never
fails, loops or runs long itself, whatever exception it is handed."""

from __future__ import annotations

import asyncio
import json
import types
from collections.abc import Callable

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi

from aura.errors import (
    AuraError,
    CircuitOpenError,
    DatabaseTransactionError,
    InvalidInputError,
    LLMConnectionError,
    LLMTimeoutError,
)
from aura.messaging._poison import DEFAULT_POISON_TYPES, PoisonPillDetector

detector = PoisonPillDetector()
MAX_REASON = 300


def raised(fn: Callable[[], object]) -> BaseException:
    try:
        fn()
    except BaseException as exc:
        return exc
    raise AssertionError("nothing raised")


def raise_in_module(module_name: str, exc: BaseException) -> BaseException:
    """``exc`` as raised by a function of a module called ``module_name``."""
    module = types.ModuleType(module_name)
    exec("def fail(exc):\n    raise exc\n", module.__dict__)
    return raised(lambda: module.fail(exc))


def assert_well_formed(reason: str) -> None:
    assert reason
    assert len(reason) <= MAX_REASON
    assert len(reason.splitlines()) == 1
    assert "\n" not in reason


class FakeDriverError(Exception):
    """A database driver's error: a message and a SQLSTATE, as asyncpg's carry them."""

    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


# -- the seed's list -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: json.loads('{"a": }'), "malformed JSON: Expecting value at line 1 column 7"),
        (
            lambda: b"ab\xff".decode("utf-8"),
            "invalid encoding: not utf-8 (byte 0xff at position 2)",
        ),
        (
            lambda: ("é".encode() + b"-\xc3(").decode("utf-8"),
            "invalid encoding: not utf-8 (byte 0xc3 at position 3)",
        ),
        (lambda: {}["sku"], "missing required key 'sku'"),
        (lambda: None.title, "missing required attribute 'title'"),  # type: ignore[attr-defined]
        (lambda: int("x"), "invalid value: invalid literal for int() with base 10: 'x'"),
        (lambda: len(5), "wrong type: object of type 'int' has no len()"),  # type: ignore[arg-type]
    ],
)
def test_the_seeds_types_are_poison_with_exact_reasons(
    make: Callable[[], object], reason: str
) -> None:
    exc = raised(make)
    assert detector.is_poison_pill(exc)
    assert detector.get_poison_reason(exc) == reason


def test_the_default_list_holds_the_seeds_types_and_recursion() -> None:
    for kind in (
        json.JSONDecodeError,
        UnicodeDecodeError,
        AttributeError,
        KeyError,
        ValueError,
        TypeError,
        RecursionError,
        InvalidInputError,
    ):
        assert kind in DEFAULT_POISON_TYPES


def test_json_nested_too_deep_is_poison() -> None:
    exc = raised(lambda: json.loads("[" * 100_000 + "]" * 100_000))
    assert isinstance(exc, RecursionError)
    assert detector.is_poison_pill(exc)
    assert detector.get_poison_reason(exc).startswith(
        "nested too deep: maximum recursion depth exceeded"
    )


# -- exception groups ------------------------------------------------------------------


def test_a_group_with_a_transient_member_is_not_poison() -> None:
    group = ExceptionGroup("two", [ValueError("bad"), ConnectionError("reset")])
    assert not detector.is_poison_pill(group)


def test_a_group_of_poison_members_is_poison_and_names_the_first() -> None:
    group = ExceptionGroup("two", [ValueError("bad price"), KeyError("sku")])
    assert detector.is_poison_pill(group)
    assert detector.get_poison_reason(group) == (
        "all 2 errors of a group are poison; first: invalid value: bad price"
    )


def test_groups_are_judged_through_nesting_and_causes() -> None:
    inner = ExceptionGroup("inner", [KeyError("a"), TypeError("b")])
    assert detector.is_poison_pill(ExceptionGroup("outer", [inner, ValueError("c")]))
    transient_inside = ExceptionGroup("inner", [KeyError("a"), LLMTimeoutError("slow")])
    assert not detector.is_poison_pill(ExceptionGroup("outer", [transient_inside]))

    def wrapped() -> None:
        try:
            raise ExceptionGroup("g", [ValueError("x"), ValueError("y")])
        except ExceptionGroup as exc:
            raise RuntimeError("the batch failed") from exc

    assert detector.is_poison_pill(raised(wrapped))


def test_a_task_groups_poison_members_are_found_though_asyncio_raised_the_group() -> None:
    # The group itself is raised from asyncio.taskgroups: its members decide, not where.
    async def fail(exc: Exception) -> None:
        raise exc

    async def main(*excs: Exception) -> None:
        async with asyncio.TaskGroup() as group:
            for exc in excs:
                group.create_task(fail(exc))

    loop = asyncio.new_event_loop()  # not asyncio.run: it would unset pytest-asyncio's loop
    try:
        poison = raised(lambda: loop.run_until_complete(main(KeyError("a"), ValueError("b"))))
        mixed = raised(lambda: loop.run_until_complete(main(KeyError("a"), TimeoutError("t"))))
    finally:
        loop.close()
    assert isinstance(poison, ExceptionGroup)
    assert detector.is_poison_pill(poison)
    assert not detector.is_poison_pill(mixed)


def test_a_group_too_deep_to_judge_is_not_poison() -> None:
    group: ExceptionGroup[Exception] = ExceptionGroup("leaf", [ValueError("x")])
    for _ in range(10):
        group = ExceptionGroup("level", [group])
    assert not detector.is_poison_pill(group)


# -- the database: SQLSTATE ------------------------------------------------------------

POISON_SQLSTATES = ["22021", "22P02", "22003", "22001", "22007", "23502", "23514", "54000"]
TRANSIENT_SQLSTATES = ["23505", "23503", "08006", "08001", "40001", "40P01", "53300", "57P01"]
TRANSIENT_SQLSTATES += ["57014", "55P03"]


@pytest.mark.parametrize("sqlstate", POISON_SQLSTATES)
def test_data_the_database_can_never_store_is_poison(sqlstate: str) -> None:
    exc = FakeDriverError("refused\nDETAIL: the row", sqlstate)
    assert detector.is_poison_pill(exc)
    assert detector.get_poison_reason(exc) == (
        f"the database refused the data (SQLSTATE {sqlstate}): refused"
    )


@pytest.mark.parametrize("sqlstate", TRANSIENT_SQLSTATES)
def test_database_failures_a_retry_may_fix_are_not_poison(sqlstate: str) -> None:
    assert not detector.is_poison_pill(FakeDriverError("try again", sqlstate))


def test_the_sqlstate_decides_before_the_type() -> None:
    class DriverValueError(ValueError):
        sqlstate = "23505"

    assert not detector.is_poison_pill(DriverValueError("duplicate key"))  # a race
    assert not detector.is_poison_pill(FakeDriverError("no such table", "42P01"))
    undecided = type("DriverValueError", (ValueError,), {"sqlstate": "42P01"})
    assert detector.is_poison_pill(undecided("x"))  # the type decides what SQLSTATE leaves


def sqlalchemy_error(driver: BaseException) -> BaseException:
    """``driver`` as SQLAlchemy's asyncpg dialect hands it over: a ``DBAPIError`` whose
    ``orig`` is the adapter's error (``pgcode``), whose ``orig`` is the driver's."""
    adapter = AsyncAdapt_asyncpg_dbapi.DataError(str(driver), driver)
    wrapped = sa_exc.DBAPIError("INSERT INTO t VALUES ($1)", ("x",), adapter)
    wrapped.__cause__ = adapter
    adapter.__cause__ = driver
    return raise_in_module("sqlalchemy.engine.base", wrapped)  # a transport module


def test_a_driver_error_wrapped_by_sqlalchemy_is_found_through_orig() -> None:
    driver = asyncpg.exceptions.CharacterNotInRepertoireError(
        'invalid byte sequence for encoding "UTF8": 0x00'
    )
    exc = sqlalchemy_error(driver)
    assert detector.is_poison_pill(exc)
    assert detector.get_poison_reason(exc) == (
        "the database refused the data (SQLSTATE 22021): "
        'invalid byte sequence for encoding "UTF8": 0x00'
    )


def test_a_pgcode_alone_is_read() -> None:
    class AdapterError(Exception):
        pgcode = "22P02"

    wrapped = sa_exc.DBAPIError("SELECT 1", None, AdapterError("invalid input syntax"))
    assert detector.is_poison_pill(wrapped)
    assert "SQLSTATE 22P02" in detector.get_poison_reason(wrapped)


def test_a_unique_violation_through_sqlalchemy_is_not_poison() -> None:
    driver = asyncpg.exceptions.UniqueViolationError("duplicate key value")
    assert not detector.is_poison_pill(sqlalchemy_error(driver))


# -- transport libraries ---------------------------------------------------------------


@pytest.mark.parametrize(
    "module", ["amqp.fake", "amqp", "kombu.connection", "redis.connection", "asyncio.streams"]
)
def test_a_value_error_raised_inside_a_transport_library_is_not_poison(module: str) -> None:
    exc = raise_in_module(module, ValueError("not enough values to unpack (expected 3, got 0)"))
    assert not detector.is_poison_pill(exc)


@pytest.mark.parametrize("module", ["aura_tasks.catalog", "amqplib", "redisx.client"])
def test_a_value_error_raised_elsewhere_is_poison(module: str) -> None:
    assert detector.is_poison_pill(raise_in_module(module, ValueError("bad")))


def test_a_task_wrapping_a_transport_error_is_not_poison() -> None:
    transport = raise_in_module("amqp.transport", ValueError("bad frame"))

    def task() -> None:
        raise RuntimeError("publish failed") from transport

    assert not detector.is_poison_pill(raised(task))


# -- Aura's transient errors -----------------------------------------------------------


def test_a_transient_aura_error_wrapping_a_value_error_is_not_poison() -> None:
    def wrapped() -> None:
        try:
            int("x")
        except ValueError as exc:
            raise DatabaseTransactionError("connection dropped") from exc

    assert not detector.is_poison_pill(raised(wrapped))
    assert not detector.is_poison_pill(CircuitOpenError("llm", 1.0))


# -- never raises, always bounded ------------------------------------------------------


class UnprintableError(ValueError):
    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


class HostileError(ValueError):
    """Raises from every hook the detector could touch."""

    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no eq")

    __hash__ = Exception.__hash__

    def __bool__(self) -> bool:
        raise RuntimeError("no bool")

    @property
    def sqlstate(self) -> str:
        raise RuntimeError("no sqlstate")

    @property
    def orig(self) -> BaseException:
        raise RuntimeError("no orig")


class HostileAuraError(AuraError):
    @property
    def transient(self) -> bool:  # type: ignore[override]
        raise RuntimeError("no transient")


class Unrepresentable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_unprintable_exceptions_get_a_reason() -> None:
    for exc in (
        UnprintableError("x"),
        HostileError("x"),
        HostileAuraError("x"),
        KeyError(Unrepresentable()),
        AttributeError("x", name=5),  # type: ignore[arg-type]
    ):
        assert_well_formed(detector.get_poison_reason(exc))
    assert detector.get_poison_reason(UnprintableError("x")) == (
        "invalid value: <unprintable UnprintableError>"
    )
    assert detector.is_poison_pill(HostileError("x"))


@pytest.mark.timeout(20)
@pytest.mark.parametrize("size", [1_000_000, 10_000_000])
def test_huge_messages_are_cut_fast(size: int) -> None:
    body = ("postgresql://app:hunter2@db/x bearer abc " * (size // 40 + 1))[:size]
    for exc in (
        ValueError(body),
        KeyError(body),
        FakeDriverError(body, "22021"),
        ExceptionGroup("g", [TypeError(body), ValueError("\n" * size)]),
        json.JSONDecodeError(body, body, size // 2),
    ):
        assert detector.is_poison_pill(exc)
        reason = detector.get_poison_reason(exc)
        assert_well_formed(reason)
        assert "hunter2" not in reason


def test_a_password_cut_by_the_length_limits_is_masked() -> None:
    for padding in [*range(260, 300), *range(1160, 1200)]:  # the reason, the first window
        reason = detector.get_poison_reason(ValueError("x" * padding + " redis://:Zq7xW2k@h"))
        assert "Zq" not in reason
        assert len(reason) <= MAX_REASON


def test_reasons_are_one_line_and_never_carry_secrets() -> None:
    exc = ValueError("bad dsn postgresql://app:hunter2@db/x\nsecond line\u2028third")
    reason = detector.get_poison_reason(exc)
    assert_well_formed(reason)
    assert "hunter2" not in reason


# -- the property: any exception, any chain ---------------------------------------------

MODULES = ["aura_tasks.sync", "amqp.transport", "sqlalchemy.engine.base", "asyncio.futures"]
SQLSTATES = POISON_SQLSTATES + TRANSIENT_SQLSTATES + ["42P01", "XX000", "bad", ""]
PLAIN_TYPES: list[type[Exception]] = [
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    RecursionError,
    LookupError,
    IndexError,
    RuntimeError,
    OSError,
    ConnectionError,
    TimeoutError,
    ZeroDivisionError,
    Exception,
    InvalidInputError,
    DatabaseTransactionError,
    LLMTimeoutError,
    LLMConnectionError,
    UnprintableError,
    HostileError,
    HostileAuraError,
]

messages = st.one_of(
    st.text(max_size=50),
    st.sampled_from(["postgresql://app:hunter2@db/x\nline two", "Bearer abc.def", "\x00\n\r"]),
    st.integers(min_value=1_000, max_value=200_000).map(lambda n: "m" * n),
)


@st.composite
def leaf_errors(draw: st.DrawFn) -> Exception:
    message = draw(messages)
    if draw(st.booleans()):
        exc: Exception = FakeDriverError(message, draw(st.sampled_from(SQLSTATES)))
    else:
        exc = draw(st.sampled_from(PLAIN_TYPES))(message)
    if draw(st.booleans()):
        exc = raise_in_module(draw(st.sampled_from(MODULES)), exc)  # type: ignore[assignment]
    return exc


errors = st.recursive(
    leaf_errors(),
    lambda children: st.lists(children, min_size=1, max_size=4).map(
        lambda members: ExceptionGroup("group", members)
    ),
    max_leaves=12,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(excs=st.lists(errors, min_size=1, max_size=6), data=st.data())
def test_any_exception_gets_a_bounded_deterministic_answer(
    excs: list[Exception], data: st.DataObject
) -> None:
    for exc in excs:  # causes and contexts between them, loops included
        if data.draw(st.booleans()):
            exc.__cause__ = data.draw(st.sampled_from(excs))
        if data.draw(st.booleans()):
            exc.__context__ = data.draw(st.sampled_from(excs))
    custom = PoisonPillDetector()
    if data.draw(st.booleans()):
        custom.remove(ValueError)
    for exc in excs:
        verdict = custom.is_poison_pill(exc)
        assert isinstance(verdict, bool)
        assert custom.is_poison_pill(exc) == verdict
        reason = custom.get_poison_reason(exc)
        assert_well_formed(reason)
        assert custom.get_poison_reason(exc) == reason
        assert "hunter2" not in reason
