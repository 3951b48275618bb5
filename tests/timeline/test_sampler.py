"""The sampler, driven without sleeping: an injected clock and wait, exact ticks."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

from aura.timeline import Recorder, Sampler, Source, queue_source
from aura.timeline.recorder import sampled_groups
from aura.timeline.sampler import Reading, read_metrics


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_failed_read_is_a_gap_and_the_next_read_goes_on() -> None:
    clock = FakeClock()
    results: list[Reading | Exception] = [
        {"fates": {"committed": 1}}, RuntimeError("broker down"), {"fates": {"committed": 4}},
    ]  # fmt: skip

    def read() -> Reading:
        result = results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    groups = sampled_groups()
    sampler = Sampler([Source("metrics", read)], groups, started=100.0, clock=clock)
    for _ in range(3):
        assert sampler.sample(sampler.sources[0])
        clock.now += 1.0
    assert groups["fates"].x == [0.0, 1.0, 2.0]
    assert groups["fates"].series == {"committed": [1, None, 4]}
    assert sampler.failures["metrics"] == 0


def test_a_source_that_keeps_failing_stops_with_a_note_and_samples_are_bounded() -> None:
    def broken() -> Reading:
        raise OSError("no rabbitmqctl")

    groups = sampled_groups()
    failing = Sampler(
        [Source("queues", broken)], groups, started=0.0, clock=FakeClock(), give_up_after=3
    )
    assert [failing.sample(failing.sources[0]) for _ in range(4)] == [True, True, True, False]
    assert failing.notes == ["queues: stopped after 3 failed reads"]
    bounded = Sampler(
        [Source("metrics", lambda: {"fates": {"committed": 1}})],
        groups, started=0.0, clock=FakeClock(), limit=2,
    )  # fmt: skip
    assert [bounded.sample(bounded.sources[0]) for _ in range(3)] == [True, True, False]
    bounded.stop()
    assert bounded.notes == ["metrics: stopped at its limit of 2 samples"]
    assert len(groups["fates"].x) == 2


def test_the_loop_keeps_its_cadence_and_does_not_burst_after_a_slow_read() -> None:
    clock = FakeClock()
    taken: list[float] = []
    waits: list[float] = []

    def read() -> Reading:
        taken.append(clock.now)
        if len(taken) == 2:
            clock.now += 3.5  # a slow read: 3.5 s
        return {"queues": {"realtime_queue": 1}}

    def wait(seconds: float) -> bool:
        waits.append(round(seconds, 6))
        clock.now += seconds
        return len(taken) >= 5  # stopped after the fifth sample

    sampler = Sampler(
        [Source("queues", read, every_s=2.0)], sampled_groups(),
        started=clock.now, clock=clock, wait=wait,
    )  # fmt: skip
    sampler.run_source(sampler.sources[0])
    assert [t - 100.0 for t in taken] == [0.0, 2.0, 5.5, 7.5, 9.5]
    assert waits == [2.0, 0.0, 2.0, 2.0, 2.0]


def test_threads_sample_until_stopped() -> None:
    seen = threading.Event()
    count = 0

    def read() -> Reading:
        nonlocal count
        count += 1
        seen.set()
        return {"fates": {"committed": count}}

    groups = sampled_groups()
    sampler = Sampler([Source("metrics", read, every_s=0.01)], groups, started=0.0)
    sampler.start()
    assert seen.wait(5.0)
    sampler.stop()
    assert not any(thread.is_alive() for thread in sampler._threads)
    assert len(groups["fates"].x) == count >= 1


def test_read_metrics_reads_the_contract_names() -> None:
    registry = CollectorRegistry()
    outcomes = Counter("aura_task_outcomes", "", ["task", "outcome", "reason"], registry=registry)
    retries = Counter("aura_task_retries", "", ["kind"], registry=registry)
    dlq = Counter("messages_sent_to_dlq", "", ["reason"], registry=registry)
    state = Gauge("llm_circuit_breaker_state", "", ["breaker"], registry=registry)
    opens = Counter("llm_circuit_breaker_opens", "", registry=registry)
    outcomes.labels("aura.ingest", "success", "").inc(3)
    outcomes.labels("aura.enrich", "success", "").inc(2)
    outcomes.labels("aura.enrich", "retry", "").inc(9)
    retries.labels("retry").inc(4)
    retries.labels("deferral").inc(5)
    dlq.labels("poison_pill").inc(2)
    dlq.labels("worker_lost")  # zero: not shown
    state.labels("a").set(1)
    state.labels("b").set(2)
    opens.inc()
    assert read_metrics(registry) == {
        "fates": {
            "committed": 5.0, "retried": 4.0, "deferred": 5.0, "dead-lettered: poison_pill": 2.0,
        },
        "breaker": {"state": 2.0, "opens": 1.0},
    }  # fmt: skip


def test_queue_source_folds_the_delayed_levels_and_leaves_out_control_queues() -> None:
    source = queue_source(
        lambda: {
            "realtime_queue": 3,
            "celery_delayed_0": 1,
            "celery_delayed_7": 2,
            "celery@host.celery.pidbox": 0,
            "dead_letter_queue": 0,
        }
    )
    assert source.every_s == 1.0
    assert source.read() == {
        "queues": {"dead_letter_queue": 0.0, "delayed (all levels)": 3.0, "realtime_queue": 3.0}
    }


def test_the_recorder_keeps_windows_and_marks_on_its_clock() -> None:
    clock = FakeClock()
    recorder = Recorder(clock=clock, wall=lambda: 1_700_000_000.0)
    recorder.begin(lambda: pytest.fail("not enabled: no source is made"))
    clock.now += 2.0

    def failing_block() -> None:
        with recorder.window("Redis down"):
            clock.now += 3.0
            raise RuntimeError("the window ends with its block, even a failing one")

    with pytest.raises(RuntimeError):
        failing_block()
    recorder.mark("SIGKILL 42")
    recorder.add_window("fault", 1.0, 6.0, "fault")
    clock.now += 1.0
    timeline = recorder.timeline("worker-kill", seed=3, passed=False)
    assert [(w.label, w.start_s, w.end_s, w.kind) for w in timeline.windows] == [
        ("fault", 1.0, 6.0, "fault"),
        ("Redis down", 2.0, 5.0, "mark"),
        ("SIGKILL 42", 5.0, 5.0, "mark"),
    ]
    assert timeline.duration_s == 6.0
    assert timeline.groups == []  # nothing sampled: no empty chart


def test_a_recorder_whose_sources_cannot_be_made_notes_it_and_goes_on() -> None:
    recorder = Recorder()
    recorder.enabled = True

    def sources() -> list[Source]:
        raise OSError("no vhost")

    recorder.begin(sources)
    assert recorder.sampler is None
    assert recorder.timeline("x").notes == ["nothing sampled: no vhost"]
