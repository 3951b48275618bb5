"""The shop's tests run a real worker (``celery -A shop.celery_app worker``) on the real
services named by the environment: DATABASE_URL (PostgreSQL), REDIS_URL and
CELERY_BROKER_URL (RabbitMQ); the LLM is a small fake served here."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

NEEDED = ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")
HERE = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], Any], timeout: float = 60.0, what: str = "") -> Any:
    """Poll ``condition`` until it returns something truthy, for at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


class _FakeLLM(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat completion: one short sentence per request."""

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        request = json.loads(self.rfile.read(length))
        prompt = request["messages"][-1]["content"]
        body = json.dumps(
            {
                "id": "chatcmpl-shop",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": request.get("model", "fake"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"A fine pick: {prompt}"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def llm_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeLLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture(scope="session")
def services(llm_url: str) -> dict[str, str]:
    missing = [name for name in NEEDED if not os.environ.get(name)]
    if missing:
        pytest.fail(f"set {', '.join(missing)} to run the shop's tests on real services")
    os.environ["LLM_BASE_URL"] = llm_url
    return {name: os.environ[name] for name in (*NEEDED, "LLM_BASE_URL")}


@pytest.fixture(scope="session")
def tables(services: dict[str, str]) -> None:
    from aura.db import Database
    from shop.models import Base

    async def create() -> None:
        database = Database(services["DATABASE_URL"])
        try:
            async with database.engine.begin() as connection:
                await connection.run_sync(Base.metadata.create_all)
        finally:
            await database.dispose()

    asyncio.run(create())


@pytest.fixture(scope="session")
def worker(services: dict[str, str], tables: None) -> Iterator[subprocess.Popen[bytes]]:
    """``celery -A shop.celery_app worker`` in a process of its own, until the session ends."""
    from shop.celery_app import app

    env = {**os.environ, **services, "PYTHONPATH": str(HERE), "WORKER_METRICS_PORT": "0"}
    command = [sys.executable, "-m", "celery", "-A", "shop.celery_app", "worker"]
    command += ["-Q", "shop_orders", "-c", "1", "--without-gossip", "--without-mingle"]
    process = subprocess.Popen([*command, "-l", "WARNING"], env=env, cwd=HERE)
    try:
        wait_for(
            lambda: process.poll() is not None or app.control.ping(timeout=0.5),
            what="the worker to answer a ping",
        )
        assert process.poll() is None, "the worker exited"
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
