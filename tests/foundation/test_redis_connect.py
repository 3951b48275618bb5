"""``aura.redis_connect``: every REDIS_URL form is read, validated and made into a client
the one way; a malformed one is one line naming what is wrong, never its password.
(The failover itself, on real servers: tests/messaging/test_redis_sentinel.py.)"""

from __future__ import annotations

import string
from urllib.parse import quote

import pytest
import redis
import redis.asyncio
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.sentinel import SentinelConnectionPool

from aura.config import load_settings, mask_url
from aura.errors import ConfigurationError
from aura.redis_connect import (
    SENTINEL_TIMEOUT,
    SentinelTarget,
    async_redis,
    parse_sentinel_url,
    redis_url_problem,
    sync_redis,
    validate_redis_url,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://10.0.0.1:26379,10.0.0.2:26380,s3.internal/aura",
            SentinelTarget(
                (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("s3.internal", 26379)), "aura"
            ),
        ),
        (
            "redis+sentinel://:s%40cret@h1:1/cache/3/",
            SentinelTarget((("h1", 1),), "cache", 3, None, "s@cret"),
        ),
        (
            "REDIS+SENTINEL://app:pw@[::1]:26379,[fd00::2]/my%2Dsvc/0?sentinel_password=sp",
            SentinelTarget((("::1", 26379), ("fd00::2", 26379)), "my-svc", 0, "app", "pw", "sp"),
        ),
        ("redis+sentinel://h/aura/", SentinelTarget((("h", 26379),), "aura")),
    ],
)
def test_a_sentinel_url_is_read_in_full(url: str, expected: SentinelTarget) -> None:
    assert parse_sentinel_url(url) == expected
    assert validate_redis_url(url) == url


SECRET = "Pw9secretZ"  # in every malformed URL below: never in the error


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (f"redis+sentinel://:{SECRET}@h1:26379", "service"),
        (f"redis+sentinel://:{SECRET}@h1:26379/", "service"),
        (f"redis+sentinel://:{SECRET}@/aura", "expected redis+sentinel://"),
        (f"redis+sentinel://:{SECRET}@h1:x{SECRET}/aura", "sentinel 1: the port"),
        (f"redis+sentinel://:{SECRET}@h1:1,h2:70000/aura", "sentinel 2: the port"),
        (f"redis+sentinel://:{SECRET}@h1:1,,h2/aura", "sentinel 2: expected host[:port]"),
        (f"redis+sentinel://:{SECRET}@[::1/aura", "IPv6"),
        (f"redis+sentinel://:{SECRET}@h1/aura/x{SECRET}", "database"),
        (f"redis+sentinel://:{SECRET}@h1/aura/0/1", "service name and an optional database"),
        (f"redis+sentinel://h1/aura?password={SECRET}", "'password' is not a Sentinel URL option"),
        (f"redis+sentinel://h1/aura?{SECRET}x=1", "is not a Sentinel URL option"),
        (f"redis://:{SECRET}/0", "the port a number"),
        (f"redis://:{SECRET}@h:99999/0", "the port a number"),
        (f"redis://:{SECRET}@h/x{SECRET}", "the database"),
        (f"redis://:{SECRET}@h/0?db=x{SECRET}", "Invalid value for 'db'"),
        (f"http://:{SECRET}@h/0", "scheme redis, rediss, unix or redis+sentinel"),
    ],
)
def test_a_malformed_url_is_one_line_naming_the_part_and_no_password(url: str, says: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        validate_redis_url(url)
    message = str(refused.value)
    assert says in message
    assert SECRET.lower() not in message.lower()
    assert "\n" not in message
    assert message.startswith("REDIS_URL: ")
    assert redis_url_problem(url) == message.removeprefix("REDIS_URL: ")


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost",
        "redis://localhost:6379/",
        "redis://user:pw@localhost:6379/2?socket_timeout=1",
        "rediss://cache.internal:6380/0",
        "unix:///run/redis/redis.sock?db=1",
    ],
)
def test_redis_pys_own_forms_are_taken_as_it_takes_them(url: str) -> None:
    assert validate_redis_url(url) == url
    assert redis_url_problem(url) is None


# -- properties ---------------------------------------------------------------------------

hosts = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,15}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True),
    st.ip_addresses().map(str),
)
ports = st.integers(min_value=1, max_value=65535)
words = st.text(st.characters(codec="utf-8"), min_size=1)
services = words.filter(lambda s: s.isprintable() and s.strip() != "" and " " not in s)
targets = st.builds(
    SentinelTarget,
    sentinels=st.lists(st.tuples(hosts, ports), min_size=1, max_size=5).map(tuple),
    service=services,
    db=st.integers(min_value=0, max_value=10_000),
    username=st.none() | words,
    password=st.none() | words,
    sentinel_password=st.none() | words,
)


@given(targets)
def test_any_target_round_trips_through_its_url(target: SentinelTarget) -> None:
    assert parse_sentinel_url(target.to_url()) == target


@given(st.text(string.printable, max_size=60).map(lambda rest: "redis+sentinel://" + rest))
def test_whatever_is_accepted_reads_the_same_again(url: str) -> None:
    problem = redis_url_problem(url)
    if problem is not None:  # refused: in one line
        assert "\n" not in problem
        return
    target = parse_sentinel_url(url)
    assert parse_sentinel_url(target.to_url()) == target


secrets = st.from_regex(r"Zq[A-Za-z0-9]{8,16}", fullmatch=True)
corruptions = st.sampled_from(
    [
        lambda h, s: f"{h}:{s}",  # the password where the port goes
        lambda h, s: f"{h}:1,:{s}",
        lambda h, s: f"{h}/aura/{s}",  # ... where the database goes
        lambda h, s: f"{h}/aura/0/{s}",
        lambda h, s: f"{h}",  # no service at all
        lambda h, s: f"{h}/aura?{s}=1",  # ... as an option's name
        lambda h, s: f"{h}/aura?{s}",
        lambda h, s: f"[{h}/aura",
    ]
)


@given(hosts.filter(lambda h: ":" not in h), secrets, corruptions, st.booleans())
def test_passwords_are_never_in_an_error(host: str, secret: str, corrupt, in_auth: bool) -> None:  # type: ignore[no-untyped-def]
    rest = corrupt(host, secret)
    url = f"redis+sentinel://user:{quote(secret)}@{rest}" if in_auth else f"redis+sentinel://{rest}"
    with pytest.raises(ConfigurationError) as refused:
        parse_sentinel_url(url)
    assert secret not in str(refused.value)
    assert secret not in repr(refused.value)


@given(targets)
def test_a_targets_repr_and_the_masked_url_show_no_password(target: SentinelTarget) -> None:
    shown = repr(target)
    for secret in (target.password, target.sentinel_password):
        if secret is not None and len(secret) >= 4 and secret.isalnum():
            assert secret not in shown


def test_mask_url_keeps_every_sentinel_and_hides_the_password() -> None:
    url = "redis+sentinel://app:Pw9secretZ@h1:26379,h2:26380,[::1]:26381/aura/0"
    assert mask_url(url) == "redis+sentinel://app:***@h1:26379,h2:26380,[::1]:26381/aura/0"
    masked = mask_url(url + "?sentinel_password=Sp9secretZ")
    assert "secretZ" not in masked
    assert masked.endswith("?sentinel_password=***")


# -- settings -----------------------------------------------------------------------------


def test_settings_take_a_sentinel_url(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "redis+sentinel://s1:26379,s2:26379,s3:26379/aura/0"
    monkeypatch.setenv("REDIS_URL", url)
    assert load_settings().redis_url == url


def test_settings_refuse_a_malformed_one_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis+sentinel://:{SECRET}@s1:26379,s2:x/aura")
    with pytest.raises(ConfigurationError) as refused:
        load_settings()
    message = str(refused.value)
    assert "REDIS_URL=" in message
    assert "sentinel 2: the port" in message
    assert SECRET not in message
    assert "\n" not in message


# -- the clients ------------------------------------------------------------------------------


async def test_a_sentinel_client_with_a_bound_waits_for_a_connection_and_asks_briefly() -> None:
    client = async_redis(
        "redis+sentinel://:pw@s1:1,s2:2/aura/4?sentinel_password=sp",
        max_connections=7,
        pool_timeout=0.25,
        socket_timeout=3.0,
        socket_connect_timeout=2.0,
    )
    try:
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert isinstance(pool, redis.asyncio.BlockingConnectionPool)
        assert (pool.max_connections, pool.timeout, pool.service_name) == (7, 0.25, "aura")
        kwargs = pool.connection_kwargs
        assert (kwargs["db"], kwargs["password"], kwargs["socket_timeout"]) == (4, "pw", 3.0)
        sentinels = pool.sentinel_manager.sentinels
        assert len(sentinels) == 2
        for sentinel in sentinels:
            options = sentinel.connection_pool.connection_kwargs
            assert options["socket_timeout"] <= SENTINEL_TIMEOUT
            assert options["socket_connect_timeout"] <= SENTINEL_TIMEOUT
            assert options["password"] == "sp"
    finally:
        await client.aclose()


async def test_a_sentinel_client_without_a_bound_is_sentinels_own_pool() -> None:
    client = async_redis("redis+sentinel://s1/aura")
    try:
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert not isinstance(pool, redis.asyncio.BlockingConnectionPool)
    finally:
        await client.aclose()


async def test_a_server_url_gets_redis_pys_pools() -> None:
    bounded = async_redis("redis://127.0.0.1:1/2", max_connections=3, pool_timeout=0.5)
    plain = async_redis("redis://127.0.0.1:1/2", socket_timeout=0.5)
    try:
        assert isinstance(bounded.connection_pool, redis.asyncio.BlockingConnectionPool)
        assert (bounded.connection_pool.max_connections, bounded.connection_pool.timeout) == (
            3,
            0.5,
        )
        assert not isinstance(plain.connection_pool, redis.asyncio.BlockingConnectionPool)
        assert plain.connection_pool.connection_kwargs["socket_timeout"] == 0.5
        with pytest.raises(redis.ConnectionError):  # nothing listens on port 1
            await plain.ping()
    finally:
        await bounded.aclose()
        await plain.aclose()


def test_the_sync_client_follows_the_master_too() -> None:
    client = sync_redis("redis+sentinel://s1:1/aura/1", socket_timeout=4.0)
    try:
        pool = client.connection_pool
        assert pool.service_name == "aura"  # type: ignore[attr-defined]
        assert pool.connection_kwargs["db"] == 1
        sentinel = pool.sentinel_manager.sentinels[0]  # type: ignore[attr-defined]
        assert sentinel.connection_pool.connection_kwargs["socket_timeout"] <= SENTINEL_TIMEOUT
    finally:
        client.close()
    assert isinstance(sync_redis("redis://127.0.0.1:1/0"), redis.Redis)


def test_a_malformed_url_makes_no_client() -> None:
    with pytest.raises(ConfigurationError):
        async_redis("redis+sentinel://h1")
    with pytest.raises(ConfigurationError):
        sync_redis("redis://h/x")
