"""The worker's delayed delivery set-up with a broker node list: declared once, on the node
the consumer is connected to, never retried on a dead node of the list (Celery 5.7's own
step retried every URL three times before the consumer consumed: ~18 s after a cluster
node was lost). Runs the step on a consumer stand-in holding a real connection to the
run's vhost; the exchanges it declares are looked for there."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from kombu import Exchange
from kombu.connection import Connection

from aura.messaging import configure
from aura.messaging._delayed_delivery import FailoverDelayedDelivery
from aura.messaging.envelope import GuardedConsumer

REFUSES = "amqp://guest:guest@127.0.0.1:1//"


def consumer_on(app: Celery, connection: Connection) -> Any:
    return SimpleNamespace(app=app, connection=connection)


def test_the_guarded_consumer_runs_the_failover_step() -> None:
    steps = GuardedConsumer.Blueprint.default_steps
    assert "aura.messaging._delayed_delivery:FailoverDelayedDelivery" in steps
    assert not any(step.endswith(":DelayedDelivery") for step in steps)


@pytest.fixture
def tried(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URLs the step sets delayed delivery up on, in order (it still does)."""
    urls: list[str] = []
    real = FailoverDelayedDelivery._setup_delayed_delivery

    def recording(self: Any, c: Any, url: str) -> None:
        urls.append(url)
        real(self, c, url)

    monkeypatch.setattr(FailoverDelayedDelivery, "_setup_delayed_delivery", recording)
    return urls


def test_the_set_up_goes_to_the_consumers_own_node_once(amqp_url: str, tried: list[str]) -> None:
    app = Celery("failover-own", broker=f"{REFUSES};{amqp_url}")
    configure(app, queues=["failover_own_q"], make_default=False)
    with Connection(amqp_url) as connection:
        connection.ensure_connection(max_retries=1)
        for queue in app.amqp.queues.values():  # as the worker's Tasks step does first
            queue(connection.default_channel).declare()
        FailoverDelayedDelivery(consumer_on(app, connection)).start(consumer_on(app, connection))
        assert tried == [amqp_url]  # the live node, once; the dead one never
        channel = connection.channel()
        # Declared there (a passive declare raises if it is not).
        Exchange("celery_delayed_delivery", type="topic", passive=True)(channel).declare()
        channel.close()


def test_a_dead_consumer_node_falls_back_to_the_list_each_once(
    amqp_url: str, tried: list[str]
) -> None:
    app = Celery("failover-list", broker=f"{REFUSES};{amqp_url}")
    configure(app, queues=["failover_list_q"], make_default=False)
    stale = Connection(REFUSES)  # the node it was on went away
    step = FailoverDelayedDelivery(consumer_on(app, stale))
    step.start(consumer_on(app, stale))  # never raises: the worker consumes on
    assert tried == [REFUSES, amqp_url]
