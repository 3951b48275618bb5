"""A second process sharing the breaker through Redis (run by tests/llm/test_fleet.py).

    python -m tests.llm_peer fail  BASE_URL REDIS_URL BREAKER N
    python -m tests.llm_peer burst BASE_URL REDIS_URL BREAKER N GO_KEY

It prints "ready" once its client exists, then one JSON line with what its calls got.
With PEER_MODELS=a,b in its environment it makes its N calls to each of those models and
counts what they got as "model:outcome".
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable

import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from aura.config import Settings
from aura.errors import CircuitOpenError, LLMError
from aura.llm import ResilientLLMClient
from aura.logs import configure_logging

MESSAGES = [{"role": "user", "content": "peer"}]


async def one(
    client: ResilientLLMClient,
    messages: list[dict[str, str]] = MESSAGES,
    model: str | None = None,
) -> str:
    """One call; what it got, as a word (shared with test_llm_fleet.py)."""
    try:
        await client.complete(messages, model=model)
    except CircuitOpenError:
        outcome = "circuit_open"
    except LLMError as exc:
        outcome = type(exc).__name__
    else:
        outcome = "ok"
    return outcome if model is None else f"{model}:{outcome}"


async def later(delay: float, call: Awaitable[str]) -> str:
    await asyncio.sleep(delay)
    return await call


async def main(mode: str, base_url: str, redis_url: str, breaker: str, n: int, *rest: str) -> None:
    configure_logging("ERROR")  # logs to stderr; stdout carries the result
    redis = aioredis.from_url(redis_url)
    client = ResilientLLMClient.from_settings(
        settings=Settings(), base_url=base_url, redis=redis, breaker_name=breaker
    )
    listed = os.environ.get("PEER_MODELS")
    models: list[str | None] = list(listed.split(",")) if listed else [None]
    print("ready", flush=True)
    if mode == "burst":
        deadline = time.monotonic() + 20
        while not await redis.exists(rest[0]):
            if time.monotonic() > deadline:
                raise SystemExit("no go signal within 20 s")
            await asyncio.sleep(0.005)
        # PEER_SPREAD_S: the calls start evenly over that many seconds (0: all at once)
        spread = float(os.environ.get("PEER_SPREAD_S", "0")) / max(n, 1)
        outcomes = await asyncio.gather(
            *(later(i * spread, one(client, model=m)) for m in models for i in range(n))
        )
    else:
        outcomes = [await one(client, model=m) for m in models for _ in range(n)]
    opens = REGISTRY.get_sample_value("llm_circuit_breaker_opens_total") or 0.0
    print(json.dumps({"outcomes": Counter(outcomes), "opens": opens}), flush=True)
    await client.aclose()
    await redis.aclose()


if __name__ == "__main__":
    asyncio.run(
        main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), *sys.argv[6:])
    )
