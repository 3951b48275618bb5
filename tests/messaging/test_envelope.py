"""The envelope guard, without a broker: whatever the bytes, headers and properties, it
either lets a well-formed message through or names what is wrong -- it never raises
anything else, and it answers the same way twice."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kombu.message import Message

from aura.messaging.delivery import call_signature as _call_signature
from aura.messaging.envelope import MAX_BODY_DEPTH, EnvelopeError, check_envelope


class _Task:
    name = "tests.envelope.effect"

    @staticmethod
    def _function(self: Any, run: str, note: str, fail_times: int = 0) -> None: ...

    aura_signature = _call_signature(_function, bind=True)


TASKS = {_Task.name: _Task()}


def _message(
    body: bytes,
    *,
    headers: Any = None,
    content_type: str | None = "application/json",
    content_encoding: str | None = "utf-8",
) -> Message:
    headers = {"task": _Task.name, "id": str(uuid.uuid4())} if headers is None else headers
    return Message(
        body=body,
        content_type=content_type,
        content_encoding=content_encoding,
        headers=headers,
        accept=["application/json"],
    )


def _kind(message: Message) -> str | None:
    try:
        check_envelope(message, TASKS)
    except EnvelopeError as exc:
        return exc.kind if str(exc) else "<no text>"
    return None


def test_a_well_formed_message_passes_and_its_body_is_decoded_once() -> None:
    message = _message(json.dumps([["r", "n"], {"fail_times": 1}, {"callbacks": None}]).encode())
    assert _kind(message) is None
    assert message._decoded_cache == [["r", "n"], {"fail_times": 1}, {"callbacks": None}]


@pytest.mark.parametrize(
    ("body", "headers", "content_type", "kind"),
    [
        (b"not json", None, "application/json", "not_json"),
        (b'["\xff"]', None, "application/json", "not_json"),
        (b'{"a": 1}', None, "application/json", "bad_shape"),
        (b"[[], {}]", None, "application/json", "bad_shape"),
        (b'["x", {}, {}]', None, "application/json", "bad_shape"),
        (b'[[], {}, {"chain": "x"}]', None, "application/json", "bad_shape"),
        (b'[["r", "n"], {}, {}]', None, "text/plain", "content_type"),
        (b'[["r", "n"], {}, {}]', {}, "application/json", "not_protocol_2"),
        (b'[["r", "n"], {}, {}]', {"task": 1, "id": "x"}, "application/json", "not_protocol_2"),
        (
            b'[["r", "n"], {}, {}]',
            {"task": _Task.name, "id": ""},
            "application/json",
            "bad_message_id",
        ),
        (b'[["r", "n"], {}, {}]', {"task": "nope", "id": "a1"}, "application/json", "unknown_task"),
        (b'[["r"], {}, {}]', None, "application/json", "bad_arguments"),
        (b'[["r", "n"], {"x": 1}, {}]', None, "application/json", "bad_arguments"),
        (
            b'[["r", "n"], {}, {}]',
            {"task": _Task.name, "id": "a1", "timelimit": [1]},
            "application/json",
            "bad_headers",
        ),
        (
            b'[["r", "n"], {}, {}]',
            {"task": _Task.name, "id": "a1", "eta": "soon"},
            "application/json",
            "bad_headers",
        ),
        (
            b'[["r", "n"], {}, {}]',
            {"task": _Task.name, "id": "a1", "retries": True},
            "application/json",
            "bad_headers",
        ),
        (
            ("[" * (MAX_BODY_DEPTH + 5) + "]" * (MAX_BODY_DEPTH + 5)).encode(),
            None,
            "application/json",
            "too_deep",
        ),
        (("[" * 100_000 + "]" * 100_000).encode(), None, "application/json", "too_deep"),
    ],
)
def test_each_kind_of_malformed_message_is_named(
    body: bytes, headers: Any, content_type: str, kind: str
) -> None:
    assert _kind(_message(body, headers=headers, content_type=content_type)) == kind


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)
_header_values = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=30),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
)
_headers = st.one_of(
    st.none(),
    st.dictionaries(
        st.sampled_from(
            [
                "task",
                "id",
                "eta",
                "expires",
                "retries",
                "timelimit",
                "shadow",
                "root_id",
                "stamps",
                "stamped_headers",
                "x-other",
            ]
        ),
        _header_values,
        max_size=6,
    ),
    st.builds(
        lambda extra: {"task": _Task.name, "id": "m-1", **extra},
        st.dictionaries(
            st.sampled_from(["eta", "retries", "timelimit", "expires"]), _header_values, max_size=2
        ),
    ),
)
_bodies = st.one_of(
    st.binary(max_size=200),
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.tuples(_json_values, _json_values, _json_values).map(lambda t: json.dumps(list(t)).encode()),
)


@settings(max_examples=400, deadline=None)
@given(
    body=_bodies,
    headers=_headers,
    content_type=st.sampled_from(
        [None, "", "application/json", "text/plain", "application/x-python-serialize"]
    ),
    content_encoding=st.sampled_from([None, "", "utf-8", "UTF-8", "binary", "latin-1"]),
)
def test_the_guard_never_raises_anything_but_its_verdict_and_is_deterministic(
    body: bytes, headers: Any, content_type: str | None, content_encoding: str | None
) -> None:
    first = _kind(
        _message(
            body,
            headers=headers or {},
            content_type=content_type,
            content_encoding=content_encoding,
        )
    )
    second = _kind(
        _message(
            body,
            headers=headers or {},
            content_type=content_type,
            content_encoding=content_encoding,
        )
    )
    assert first == second


def test_an_eta_the_broker_has_waited_out_is_dropped_one_the_broker_has_not_is_kept() -> None:
    """A retry's eta is the sender's wall clock plus the countdown; delayed by the broker
    (the 28 delay bits of kombu's native delayed delivery), it must not be waited for
    again on the receiver's clock (a sender 600 s ahead stranded retries 600 s)."""
    from types import SimpleNamespace

    from aura.messaging.envelope import _forget_the_senders_clock

    delayed = "0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.1.1.shop.orders"
    eta = "2026-12-07T11:00:00+00:00"
    waited = SimpleNamespace(headers={"eta": eta}, delivery_info={"routing_key": delayed})
    _forget_the_senders_clock(waited)
    assert waited.headers["eta"] is None
    direct = SimpleNamespace(headers={"eta": eta}, delivery_info={"routing_key": "shop.orders"})
    _forget_the_senders_clock(direct)
    assert direct.headers["eta"] == eta


def test_the_consumer_keeps_celerys_loop_from_sleeping_through_a_shutdown() -> None:
    """kombu's hub sleeps up to 10 s in a poll when no timer is due, and a warm shutdown
    is only seen between polls: the consumer keeps a tick of at most a second on it."""
    import types

    from aura.messaging.envelope import GuardedConsumer

    ticks: list[float] = []

    class Hub:
        def call_repeatedly(self, delay: float, callback: Any, *args: Any) -> None:
            ticks.append(delay)
            callback(*args)  # it does nothing, and says nothing

    consumer = GuardedConsumer.__new__(GuardedConsumer)
    consumer.blueprint = types.SimpleNamespace(send_all=lambda *args, **kwargs: None)
    consumer.register_with_event_loop(Hub())
    assert len(ticks) == 1
    assert 0 < ticks[0] <= 1.0
