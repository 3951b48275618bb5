"""``aura.backoff.Backoff``: the one retry policy, tested by building attempts, never by
sleeping."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aura.backoff import Backoff
from aura.config import Settings
from aura.errors import ConfigurationError

seconds = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)


@given(
    base=seconds,
    cap=seconds,
    attempt=st.integers(min_value=-5, max_value=10_000),
    seed=st.integers(),
    retry_after=st.none() | seconds,
)
def test_a_delay_is_half_jittered_under_its_cap_and_heeds_retry_after(
    base: float, cap: float, attempt: int, seed: int, retry_after: float | None
) -> None:
    policy = Backoff(base=base, cap=cap, floor=1.0)
    ceiling = policy.ceiling(attempt)
    assert ceiling <= cap
    delay = policy.delay(attempt, random.Random(seed), retry_after=retry_after)
    assert delay >= 1.0  # the floor
    assert delay >= (retry_after or 0.0)  # the server's word is a floor, never shortened
    assert delay <= max(ceiling, retry_after or 0.0, 1.0)
    assert delay >= min(ceiling / 2, ceiling)


def test_without_jitter_the_pauses_double_to_the_cap() -> None:
    policy = Backoff(base=0.1, cap=1.0, jitter=False)
    assert [policy.delay(n) for n in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_built_from_settings_and_never_negative() -> None:
    settings = Settings(retry_backoff_base=2.0, retry_backoff_max=30.0)
    assert Backoff.from_settings(settings) == Backoff(base=2.0, cap=30.0)
    with pytest.raises(ConfigurationError, match="not negative"):
        Backoff(base=-1.0)
