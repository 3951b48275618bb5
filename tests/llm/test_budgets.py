"""Tenants' token budgets (aura.llm.budgets): the script on real Redis driven by a fake
clock (a model of its sliding windows, checked by hypothesis), one round trip per call,
settlements on the next call or the timer, the client's use of it, Redis refusing, the
reader, and the fate rule (deferred, then ``budget_exceeded``)."""

from __future__ import annotations

import asyncio
import math
import random
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog
from celery import Celery
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from redis.exceptions import ReadOnlyError
from structlog.testing import capture_logs

from aura.config import get_settings, load_settings
from aura.errors import CircuitOpenError, ConfigurationError, ServiceUnavailableError
from aura.events import DeadLetterReason
from aura.llm import (
    LLMBudgetExceededError,
    LLMSimulator,
    ResilientLLMClient,
    TenantBudgets,
    TokenBudget,
)
from aura.llm.budgets import Reservation
from aura.messaging import DEFAULT_RULES, DeadLetterQueue, resilient_task
from aura.messaging.rules import BudgetExceeded
from aura.worker.celery_app import make_celery_app
from tests.helpers import FakeClock, metric

pytestmark = pytest.mark.timeout(90)
MINUTE, DAY = 60.0, 600.0  # the day shortened so a fake clock crosses it in a few steps


async def _never(_: float) -> None:
    await asyncio.Event().wait()  # the flush timer never fires: reservations carry it


def budgets_for(
    redis: aioredis.Redis, tenant: str, budget: TokenBudget, clock: FakeClock, **options: Any
) -> TenantBudgets:
    options = {"minute_s": MINUTE, "day_s": DAY, "sleep": _never, **options}
    return TenantBudgets({tenant: budget}, redis=redis, clock=clock, **options)


def tenant_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
async def fresh(redis: aioredis.Redis) -> AsyncIterator[tuple[TenantBudgets, FakeClock, str]]:
    clock, tenant = FakeClock(), tenant_id()
    budgets = budgets_for(redis, tenant, TokenBudget(per_minute=100, per_day=250), clock)
    yield budgets, clock, tenant
    await budgets.aclose()


async def test_a_window_full_refuses_until_its_oldest_tokens_age_out(
    fresh: tuple[TenantBudgets, FakeClock, str],
) -> None:
    budgets, clock, tenant = fresh
    assert await budgets.reserve(tenant, 40) is not None
    clock.advance(10)
    assert await budgets.reserve(tenant, 40) is not None
    clock.advance(10)  # 80 of 100 in the minute: 30 more do not fit
    with pytest.raises(LLMBudgetExceededError) as refused:
        await budgets.reserve(tenant, 30)
    error = refused.value
    assert isinstance(error, CircuitOpenError)  # deferred like an open breaker
    assert (error.tenant, error.window, error.window_s) == (tenant, "minute", MINUTE)
    # the first 40 leave when their 1 s bucket is a minute (+ the 1 s allowance) old
    assert error.retry_after == pytest.approx(1 + 60 + 1 - 20)
    clock.advance(error.retry_after + 0.001)
    assert await budgets.reserve(tenant, 30) is not None  # reopened, bucket by bucket


async def test_the_day_refuses_when_the_minute_has_room(
    fresh: tuple[TenantBudgets, FakeClock, str],
) -> None:
    budgets, clock, tenant = fresh
    for _ in range(3):
        assert await budgets.reserve(tenant, 80) is not None
        clock.advance(70)  # a new minute each time
    with pytest.raises(LLMBudgetExceededError) as refused:  # 240 of 250 today
        await budgets.reserve(tenant, 20)
    assert refused.value.window == "day"
    assert refused.value.retry_after > MINUTE


async def test_a_call_bigger_than_the_budget_is_refused_for_a_whole_window(
    fresh: tuple[TenantBudgets, FakeClock, str],
) -> None:
    budgets, _, tenant = fresh
    with pytest.raises(LLMBudgetExceededError) as refused:
        await budgets.reserve(tenant, 101)
    assert refused.value.retry_after == pytest.approx(MINUTE + 1)  # the bound ends it


async def test_settling_refunds_on_the_next_reservation_in_its_one_round_trip(
    redis: aioredis.Redis, fresh: tuple[TenantBudgets, FakeClock, str]
) -> None:
    budgets, clock, tenant = fresh
    first = await budgets.reserve(tenant, 90)  # loads the script once
    assert first is not None
    sent: list[object] = []
    real = redis.execute_command

    async def counting(*args: object, **kwargs: object) -> object:
        sent.append(args[0])
        return await real(*args, **kwargs)

    redis.execute_command = counting  # type: ignore[method-assign]
    try:
        budgets.settle(first, 30)  # the provider said 30: 60 back, later
        assert sent == []
        clock.advance(1)
        assert await budgets.reserve(tenant, 70) is not None  # 30 + 70 fits only refunded
        assert sent == ["EVALSHA"]
    finally:
        redis.execute_command = real  # type: ignore[method-assign]
    used = (await budgets.usage([tenant]))[tenant]
    assert (used.minute_used, used.day_used, used.minute_limit, used.day_limit) == (
        100,
        100,
        100,
        250,
    )


async def test_settlements_go_on_a_timer_when_no_call_carries_them(redis: aioredis.Redis) -> None:
    clock, tenant, waits = FakeClock(), tenant_id(), []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    budgets = budgets_for(redis, tenant, TokenBudget(per_minute=100), clock, sleep=sleep)
    reservation = await budgets.reserve(tenant, 80)
    assert reservation is not None
    before = metric("aura_llm_budget_tokens_total")
    budgets.settle(reservation, 5)
    assert budgets._flusher is not None
    await asyncio.wait_for(budgets._flusher, 5)
    assert waits == [1.0]
    assert (await budgets.usage([tenant]))[tenant].minute_used == 5
    assert metric("aura_llm_budget_tokens_total") == before + 5
    budgets.settle(reservation, None)  # unknown (a timeout): the estimate stays, no trip
    assert budgets._pending == {}


async def test_a_call_that_used_more_than_its_estimate_is_charged_the_difference(
    fresh: tuple[TenantBudgets, FakeClock, str],
) -> None:
    budgets, _, tenant = fresh
    reservation = await budgets.reserve(tenant, 50)
    assert reservation is not None
    budgets.settle(reservation, 90)  # the provider said 90: 40 more
    await budgets.flush()
    assert (await budgets.usage([tenant]))[tenant].minute_used == 90
    with pytest.raises(LLMBudgetExceededError):  # the calls after it wait
        await budgets.reserve(tenant, 20)


# -- the property: whatever the calls, the windows never hold more than the budget ---------


def _live(records: list[tuple[float, int]], now: float, window: float, size: float) -> int:
    return sum(c for t, c in records if (math.floor(t / size) + 1) * size + window + 1.0 > now)


_calls = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=25.0),  # seconds since the last call
        st.integers(min_value=1, max_value=120),  # tokens reserved
        st.one_of(st.none(), st.integers(min_value=0, max_value=100)),  # % used (None: unknown)
        st.integers(min_value=0, max_value=3),  # calls later that it settles
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls=_calls, per_minute=st.integers(100, 400), per_day=st.integers(300, 1500))
def test_reservations_never_let_a_window_pass_its_budget(
    redis_url: str, calls: list[tuple[float, int, int | None, int]], per_minute: int, per_day: int
) -> None:
    """The script against a model of its windows: a call is refused exactly when its
    tokens do not fit beside what the live buckets hold (settled calls at their usage,
    the rest at their estimate); a refused call fits once its ``retry_after`` has passed;
    and in every window of 60 s (600 s), the tokens charged never pass the budget."""

    async def scenario() -> None:
        redis, clock, tenant = aioredis.from_url(redis_url), FakeClock(), tenant_id()
        budgets = budgets_for(redis, tenant, TokenBudget(per_minute, per_day), clock)
        charged: list[tuple[float, int]] = []  # per reservation: (at, what Redis holds)
        due: list[tuple[int, Reservation, int, int | None]] = []
        try:
            for step, (gap, tokens, percent, delay) in enumerate(calls):
                clock.advance(gap)
                for item in [d for d in due if d[0] <= step]:  # settled before this call
                    due.remove(item)
                    _, reservation, index, used = item
                    budgets.settle(reservation, used)
                    if used is not None:
                        charged[index] = (charged[index][0], used)
                fits = all(
                    _live(charged, clock.now, window, window / 60) + tokens <= limit
                    for window, limit in ((MINUTE, per_minute), (DAY, per_day))
                )
                try:
                    reservation = await budgets.reserve(tenant, tokens)
                except LLMBudgetExceededError as refused:
                    assert not fits
                    event(f"refused per {refused.window}")
                    if tokens > per_minute:
                        continue
                    clock.advance(refused.retry_after + 0.001)
                    reservation = await budgets.reserve(tenant, tokens)  # room now
                else:
                    assert fits
                assert reservation is not None
                used = None if percent is None else tokens * percent // 100
                charged.append((clock.now, tokens))
                due.append((step + delay, reservation, len(charged) - 1, used))
        finally:
            await budgets.aclose()
            await redis.aclose()
        final = [(at, c) for at, c in charged]
        for item in due:  # settled at the end (aclose sent them)
            if item[3] is not None:
                final[item[2]] = (final[item[2]][0], item[3])
        for window, limit in ((MINUTE, per_minute), (DAY, per_day)):
            for start, _ in final:
                inside = sum(c for at, c in final if start <= at < start + window)
                assert inside <= limit

    asyncio.run(scenario())


# -- the client ------------------------------------------------------------------------------


async def test_an_over_budget_tenant_makes_no_call_and_others_go_on(
    redis: aioredis.Redis,
) -> None:
    spender, other = tenant_id(), tenant_id()
    budgets = TenantBudgets({spender: TokenBudget(per_minute=200)}, redis=redis, sleep=_never)
    messages = [{"role": "user", "content": "x" * 400}]  # 100 + 80 estimated
    async with (
        LLMSimulator() as sim,
        ResilientLLMClient.from_settings(
            load_settings(), base_url=sim.base_url, redis=redis, budgets=budgets
        ) as client,
    ):
        await client.complete(messages, tenant=spender, max_tokens=80)
        used = (await budgets.usage([spender]))[spender].minute_used
        assert used == 180  # reserved; settled with the next call (or the timer)
        before = metric("aura_llm_budget_deferrals_total", window="minute")
        await client.complete(messages, tenant=spender, max_tokens=80)  # fits once refunded
        with pytest.raises(LLMBudgetExceededError):
            await client.complete(messages, tenant=spender, max_tokens=80)
        assert sim.requests == 2  # the refused call sent nothing
        assert metric("aura_llm_budget_deferrals_total", window="minute") == before + 1
        for _ in range(3):
            await client.complete(messages, tenant=other, max_tokens=80)  # no budget
        assert sim.requests == 5
        await budgets.flush()
        spent = await budgets.usage([spender, other])
        reported = spent[spender].minute_used
        assert 0 < reported < 180  # the simulator's counts, not the estimates
        assert (spent[other].minute_used, spent[other].minute_limit) == (0, None)


async def test_the_tenant_defaults_to_the_deliverys(redis: aioredis.Redis) -> None:
    tenant = tenant_id()
    budgets = TenantBudgets({tenant: TokenBudget(per_minute=50)}, redis=redis)
    async with (
        LLMSimulator() as sim,
        ResilientLLMClient.from_settings(
            load_settings(), base_url=sim.base_url, redis=redis, budgets=budgets
        ) as client,
    ):
        with (
            structlog.contextvars.bound_contextvars(tenant=tenant),  # as a delivery binds it
            pytest.raises(LLMBudgetExceededError),
        ):
            await client.complete([{"role": "user", "content": "hello"}], max_tokens=60)
        assert sim.requests == 0


async def test_a_redis_that_refuses_lets_calls_go_unbudgeted_logged_once(
    redis: aioredis.Redis,
) -> None:
    tenant = tenant_id()
    budgets = TenantBudgets({tenant: TokenBudget(per_minute=1)}, redis=redis)
    real = redis.execute_command

    async def read_only(*args: object, **kwargs: object) -> object:
        raise ReadOnlyError("You can't write against a read only replica.")

    redis.execute_command = read_only  # type: ignore[method-assign]
    try:
        async with (
            LLMSimulator() as sim,
            ResilientLLMClient.from_settings(
                load_settings(), base_url=sim.base_url, budgets=budgets
            ) as client,
        ):
            with capture_logs() as logs:
                for _ in range(3):
                    await client.complete([{"role": "user", "content": "hi"}], tenant=tenant)
            assert sim.requests == 3  # a budget of 1 token: every call over it, yet made
        warned = [e for e in logs if e["event"].startswith("tenant budgets cannot use Redis")]
        assert len(warned) == 1
        with pytest.raises(ServiceUnavailableError, match="ReadOnlyError"):
            await budgets.usage([tenant])  # the reader says so, never zeros
    finally:
        redis.execute_command = real  # type: ignore[method-assign]


async def test_an_unreachable_redis_lets_calls_go_unbudgeted() -> None:
    tenant = tenant_id()
    down = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    budgets = TenantBudgets({tenant: TokenBudget(per_minute=1)}, redis=down)
    assert await budgets.reserve(tenant, 100) is None
    await down.aclose()


def test_the_settings_say_what_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    tenant = tenant_id()
    monkeypatch.setenv("LLM_TENANT_BUDGETS", f"{tenant.upper()}=1000/none, acme=none/5000")
    monkeypatch.setenv("LLM_TENANT_BUDGET_DEFAULT", "none/200000")
    budgets = TenantBudgets.from_settings(load_settings(), redis=None)
    assert budgets.budget_for(tenant) == TokenBudget(1000, None)  # a UUID in any case
    assert budgets.budget_for("acme") == TokenBudget(None, 5000)
    assert budgets.budget_for("anyone") == TokenBudget(None, 200000)
    assert not budgets.enabled  # nothing keeps them without a Redis
    for variable, value, said in (
        ("LLM_TENANT_BUDGETS", "acme=1000", "expected <per_minute>/<per_day>"),
        ("LLM_TENANT_BUDGETS", "acme=0/10", "acme per minute: expected a whole number"),
        ("LLM_TENANT_BUDGETS", "a=1/1,a=2/2", "appears twice"),
        ("LLM_TENANT_BUDGETS", "a b=1/1", "expected <tenant>="),
        ("LLM_TENANT_BUDGET_DEFAULT", "lots", "the default: expected"),
        ("LLM_BUDGET_MAX_DEFERRALS", "-1", "expected a number >= 0"),
    ):
        monkeypatch.setenv(variable, value)
        with pytest.raises(ConfigurationError, match=f"{variable}=.*{said}"):
            load_settings()
        monkeypatch.delenv(variable)


# -- the fate: deferred without a retry spent, then budget_exceeded --------------------------


@pytest.fixture(scope="module")
def app() -> Celery:
    app = make_celery_app(load_settings())  # in-memory broker; eager: deferrals run inline
    app.conf.task_always_eager = True
    return app


@pytest.mark.filterwarnings("ignore::celery.exceptions.CDeprecationWarning")
def test_an_over_budget_task_is_deferred_then_dead_lettered_as_budget_exceeded(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_BUDGET_MAX_DEFERRALS", "3")
    get_settings.cache_clear()
    name, runs = f"tests.budgets.over.{uuid.uuid4().hex[:8]}", []

    @resilient_task(app=app, name=name)
    def spend(self: object, tenant_id: str, recover_after: int) -> str:
        runs.append(1)
        if len(runs) <= recover_after:
            raise LLMBudgetExceededError(tenant_id, 12.0, "minute", 60.0)
        return "done"

    before = metric("messages_sent_to_dlq_total", reason="budget_exceeded")
    assert spend.apply(args=("t-1", 2), task_id="m-budget-ok").get() == "done"
    assert len(runs) == 3  # put off twice, then done: no retry budget spent on the way
    runs.clear()
    spend.apply(args=("t-1", 99), task_id="m-budget-out").get(propagate=False)
    assert len(runs) == 4  # three deferrals, then the DLQ
    with app.connection_for_write() as connection:
        (letter,) = DeadLetterQueue(connection).list(task=name, limit=10)
    assert letter.reason is DeadLetterReason.BUDGET_EXCEEDED
    assert "spent its LLM token budget per minute" in letter.error
    assert metric("messages_sent_to_dlq_total", reason="budget_exceeded") == before + 1


def test_the_rule_defers_within_its_window_and_comes_before_the_breakers() -> None:
    names = [type(rule).__name__ for rule in DEFAULT_RULES]
    assert names.index("BudgetExceeded") < names.index("BreakerOpen")
    error = LLMBudgetExceededError("t", 5.0, "day", 86_400.0)
    assert (error.retry_after, error.window) == (5.0, "day")
    revived = type(error).__new__(type(error))
    revived.__init__(*error.__reduce__()[1])  # as pickle would
    assert (revived.tenant, revived.window_s) == ("t", 86_400.0)
    rule, countdowns = BudgetExceeded(max_deferrals=2), []
    for retries in range(3):
        fate = rule.on_failure(_delivery(retries), error)
        countdowns.append(getattr(fate, "countdown", None) if retries < 2 else fate)
    assert all(5.0 <= c <= 1800.0 for c in countdowns[:2])  # capped: its counter outlives it
    assert getattr(countdowns[2], "reason", None) is DeadLetterReason.BUDGET_EXCEEDED
    assert rule.on_failure(_delivery(0), CircuitOpenError("llm:x", 1.0)) is None


def _delivery(retries: int) -> Any:
    """Just what the rule reads of a delivery: its retries, a deferral counter that
    counts them, the process's random numbers."""

    class Tracker:
        async def increment_and_check(self, message_id: str, fallback_count: int) -> bool:
            return retries >= 2

    runtime = SimpleNamespace(rng=random.Random(retries), tracker=lambda prefix, limit: Tracker())
    return SimpleNamespace(
        retries=retries, message_id="m-1", runtime=runtime, policy=None, run=asyncio.run
    )
