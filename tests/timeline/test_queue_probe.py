"""The report's queue depths over AMQP: what a passive declare counts, a queue that does not
exist, a broker that cannot be reached (a gap, then the probe connects again), and a read
that changes nothing."""

from __future__ import annotations

import uuid

import pytest
from kombu import Connection, Exchange, Producer, Queue

from aura.timeline import QueueProbe
from aura.timeline.queue_probe import delayed_levels


def _declare(url: str, name: str, messages: int) -> None:
    with Connection(url) as connection:
        channel = connection.channel()
        queue = Queue(name, Exchange(""), routing_key=name, auto_delete=False)
        queue(channel).declare()
        producer = Producer(channel)
        for index in range(messages):
            producer.publish({"n": index}, routing_key=name, declare=[])


def _delete(url: str, *names: str) -> None:
    with Connection(url) as connection:
        channel = connection.channel()
        for name in names:
            channel.queue_delete(name)


def test_it_counts_ready_messages_skips_missing_queues_and_changes_nothing(amqp_url: str) -> None:
    full, empty, missing = (f"probe-{uuid.uuid4().hex[:8]}-{n}" for n in ("a", "b", "c"))
    _declare(amqp_url, full, 3)
    _declare(amqp_url, empty, 0)
    now = [0.0]
    probe = QueueProbe(amqp_url, [full, missing, empty], clock=lambda: now[0])
    try:
        assert probe() == {full: 3, empty: 0}  # the 404 of the missing one closed no read
        assert probe() == {full: 3, empty: 0}  # a read takes nothing
        now[0] = 1.0  # asked again after 1 s, then 2 s later
        assert probe() == {full: 3, empty: 0}
        _declare(amqp_url, missing, 1)
        now[0] = 2.5
        assert probe() == {full: 3, empty: 0}  # not asked again before its 2 s
        now[0] = 3.0
        assert probe() == {full: 3, missing: 1, empty: 0}
    finally:
        probe.close()
        _delete(amqp_url, full, empty, missing)


def test_a_broker_out_of_reach_raises_and_the_next_read_connects_again(amqp_url: str) -> None:
    name = f"probe-{uuid.uuid4().hex[:8]}"
    _declare(amqp_url, name, 2)
    probe = QueueProbe("amqp://guest:guest@127.0.0.1:1//", [name], connect_timeout=1.0)
    with pytest.raises(OSError, match="refused"):  # the sampler's gap
        probe()
    probe.url = amqp_url
    try:
        assert probe() == {name: 2}
    finally:
        probe.close()
        _delete(amqp_url, name)


def test_the_delayed_levels_are_celerys_28() -> None:
    levels = delayed_levels()
    assert levels[0] == "celery_delayed_0"
    assert levels[-1] == "celery_delayed_27"
    assert len(levels) == 28
