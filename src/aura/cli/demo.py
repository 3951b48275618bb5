"""``aura demo``: the main job, on embedded defaults with no configuration.

It runs what exists today and reports it; each piece of the platform adds its step here
as it lands (see the README's pattern table for what is built). Today: the transactional
catalog write (seed pattern 1) with its refusals and the inbox, LLM calls through the
bundled simulator with an outage that opens the breaker (pattern 2), and the seed's
metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import REGISTRY
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from aura.cli import app
from aura.config import Settings, get_settings, mask_url
from aura.db import (
    Database,
    Product,
    claim_message,
    create_product_with_variants,
    create_tenant,
    transactional,
    upgrade,
)
from aura.errors import AuraError, CircuitOpenError, LLMError
from aura.llm import Faults, LLMSimulator, ResilientLLMClient
from aura.messaging import PoisonPillDetector, RetryTracker
from aura.metrics import SEED_METRIC_NAMES


@dataclass
class Step:
    name: str
    expected: str
    outcome: str = ""
    ok: bool = False


def _product(sku: str, title: str = "Demo trail shoe") -> dict[str, object]:
    return {"title": title, "variants": [{"sku": sku, "price": "59.90", "currency": "EUR"}]}


@transactional
async def _ingest_once(
    session: AsyncSession, tenant_id: uuid.UUID, data: dict[str, object], message_id: str
) -> bool:
    if not await claim_message(session, message_id, task="demo", tenant_id=tenant_id):
        return False
    await create_product_with_variants(session, tenant_id, data)
    return True


async def _expect_error(action: Callable[[], Awaitable[object]]) -> str:
    try:
        await action()
    except AuraError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


async def _catalog_steps(database: Database) -> list[Step]:
    steps: list[Step] = []
    async with database.session() as session:
        tenant = await create_tenant(session, f"demo-{uuid.uuid4().hex[:8]}")
    sku = f"DEMO-{uuid.uuid4().hex[:8].upper()}"

    async def count() -> int:
        async with database.session() as session:
            found = await session.scalar(
                select(func.count()).select_from(Product).where(Product.tenant_id == tenant.id)
            )
            return int(found or 0)

    async with database.session() as session:
        await create_product_with_variants(session, tenant.id, _product(sku))
    steps.append(Step("create a product with variants", "1 product", f"{await count()} product"))
    steps[-1].ok = await count() == 1

    async def bad() -> object:
        async with database.session() as session:
            return await create_product_with_variants(
                session, tenant.id, {"title": "", "variants": [{"sku": "X", "price": "abc"}]}
            )

    said = await _expect_error(bad)
    steps.append(Step("refuse bad product data", "named error, nothing written", said))
    steps[-1].ok = said.startswith("InvalidInputError") and await count() == 1

    async def duplicate() -> object:
        async with database.session() as session:
            return await create_product_with_variants(session, tenant.id, _product(sku))

    said = await _expect_error(duplicate)
    steps.append(Step("refuse a SKU already used", "ConflictError, nothing written", said))
    steps[-1].ok = said.startswith("ConflictError") and await count() == 1

    message_id = str(uuid.uuid4())
    effects = 0
    for _ in range(3):  # one message delivered three times
        async with database.session() as session:
            effects += await _ingest_once(session, tenant.id, _product(f"{sku}-INBOX"), message_id)
    steps.append(Step("deliver one message 3 times", "1 effect", f"{effects} effect"))
    steps[-1].ok = effects == 1 and await count() == 2
    return steps


async def _llm_steps(settings: Settings) -> list[Step]:
    """Pattern 2 against the bundled simulator: an outage opens the breaker, then recovery.

    The demo shortens the reset timeout to 1 s so it finishes quickly (the default is 60).
    """
    steps: list[Step] = []
    messages = [{"role": "user", "content": '{"title": "Demo trail shoe", "brand": "Acme"}'}]
    async with (
        LLMSimulator(Faults()) as simulator,
        ResilientLLMClient(
            settings=settings, base_url=simulator.base_url, reset_timeout=1.0
        ) as client,
    ):
        answer = await client.complete(messages)
        steps.append(Step("enrich through the simulator", "a JSON answer", answer.text[:60]))
        steps[-1].ok = answer.text.startswith("{")

        simulator.start_outage(1.5)
        outcomes = Counter[str]()
        for _ in range(6):
            try:
                await client.complete(messages)
                outcomes["ok"] += 1
            except CircuitOpenError:
                outcomes["failed fast"] += 1
            except LLMError:
                outcomes["failed"] += 1
        received = simulator.outcomes().get("outage", 0)
        said = f"{dict(outcomes)}; {received} reached the provider"
        steps.append(Step("6 calls during an outage", "3 failed, 3 failed fast", said))
        steps[-1].ok = outcomes == Counter({"failed": 3, "failed fast": 3}) and received == 3

        for _attempt in range(10):  # bounded: the outage lasts 1.5 s, the reset 1 s
            try:
                await client.complete(messages)
                break
            except CircuitOpenError as exc:
                await asyncio.sleep(exc.retry_after + 0.05)
            except LLMError:
                continue  # a trial during the outage: it opens again
        state = client.circuit_breaker.state.value
        steps.append(Step("after the outage", "one trial call closes it", state))
        steps[-1].ok = state == "closed"
    return steps


async def _message_steps() -> list[Step]:
    """Patterns 3 and 4 on sample bulk records: poison verdicts, then a retry budget
    counted in the embedded Redis stand-in (the worker pipeline arrives with the platform)."""
    from fakeredis import FakeAsyncRedis

    detector = PoisonPillDetector()
    steps: list[Step] = []
    for raw in ('{"sku": "A-1", "title": "Trail shoe"}', '{"sku": "A-2"', '{"title": "no sku"}'):
        try:
            record = json.loads(raw)
            record["sku"]
            verdict = "processable"
        except Exception as exc:
            is_poison = detector.is_poison_pill(exc)
            verdict = f"poison: {detector.get_poison_reason(exc)}" if is_poison else "retry"
        expected = "processable" if raw.endswith('shoe"}') else "poison, no retry"
        steps.append(Step(f"record {raw}", expected, verdict))
        steps[-1].ok = (
            verdict == "processable" if expected == "processable" else verdict.startswith("poison")
        )
    tracker = RetryTracker(FakeAsyncRedis(), max_retries=3)
    verdicts = [await tracker.increment_and_check("demo-message") for _ in range(4)]
    said = ", ".join("DLQ" if v else "retry" for v in verdicts)
    steps.append(Step("a message failing 4 times", "retry, retry, retry, DLQ", said))
    steps[-1].ok = verdicts == [False, False, False, True]
    return steps


def _exposed_metric_names() -> set[str]:
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


async def _run(database: Database, settings: Settings) -> tuple[list[Step], list[Step], list[Step]]:
    try:
        await upgrade(database)
        catalog = await _catalog_steps(database)
    finally:
        await database.dispose()
    return catalog, await _llm_steps(settings), await _message_steps()


@app.command("demo")
def demo_command() -> None:
    """Run the main job on embedded defaults and print its report."""
    console = Console()
    settings = get_settings()
    logging.getLogger().setLevel(logging.ERROR)  # the report says what happened
    database = Database.from_settings(settings)
    console.rule("[bold]Aura demo")
    mode = "embedded" if settings.database_url is None else "real services"
    console.print(f"mode: [bold]{mode}[/bold]; database: {mask_url(database.url)}")

    catalog, llm, messages = asyncio.run(_run(database, settings))
    for title, steps in (
        ("seed pattern 1: transactional catalog writes", catalog),
        ("seed pattern 2: LLM calls under the circuit breaker", llm),
        ("seed patterns 3-4: poison pills and the retry budget", messages),
    ):
        table = Table(title=title)
        for column in ("step", "expected", "outcome", "ok"):
            table.add_column(column, overflow="fold")
        for step in steps:
            table.add_row(step.name, step.expected, step.outcome, "yes" if step.ok else "[red]NO")
        console.print(table)
    steps = catalog + llm + messages

    exposed = _exposed_metric_names()
    missing = [name for name in SEED_METRIC_NAMES if name not in exposed]
    console.print(f"seed metrics exposed: {len(SEED_METRIC_NAMES) - len(missing)}/6")
    failed = sum(not step.ok for step in steps) + len(missing)
    console.print(f"checks failed: {failed}")
    if failed:
        raise SystemExit(1)
