"""The example project (``examples/shop``: a Celery app of its own using Aura as a
library) passes its own tests on this run's real services: once in this environment, and
once in a fresh virtualenv holding only the built wheel of Aura's core (no extras), which
is how a new user meets it."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from tests import services

ROOT = Path(__file__).resolve().parents[2]
SHOP = ROOT / "examples" / "shop"
EXTRAS_ONLY = ["fastapi", "uvicorn", "fakeredis", "aiosqlite"]


@pytest.fixture(scope="module")
async def shop_pg_url(pg_url: str) -> AsyncIterator[str]:
    """A database of the shop's own beside this run's (its create_all must not pre-empt
    the platform's migrations there), dropped at the end."""
    name = f"{services.PG_TEST_DATABASE}_shop"
    connection = await asyncpg.connect(services.PG_ADMIN_DSN, timeout=10)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    yield pg_url.rsplit("/", 1)[0] + f"/{name}"
    connection = await asyncpg.connect(services.PG_ADMIN_DSN, timeout=10)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


def _shop_env(pg_url: str, redis_url: str, amqp_url: str) -> dict[str, str]:
    keep = {"PATH", "HOME", "LANG", "TMPDIR", "PIP_FIND_LINKS", "PIP_CERT"}
    return {
        **{k: v for k, v in os.environ.items() if k in keep},
        "DATABASE_URL": pg_url,
        "REDIS_URL": redis_url,
        "CELERY_BROKER_URL": amqp_url,
        "PYTHONPATH": str(SHOP),
        "WORKER_POOL": "async",
    }


def _run_shop_tests(python: str, env: dict[str, str]) -> None:
    done = subprocess.run(
        [python, "-m", "pytest", "-q", "-x"],
        cwd=SHOP,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "3 passed" in done.stdout


def _install_core_wheel(tmp_path: Path) -> tuple[str, float]:
    """Aura's core wheel, built from a clean copy, alone in a fresh virtualenv (with
    pytest): the path of its python and how long that took."""
    started = time.monotonic()
    # Built from a clean copy: setuptools' build/ directory in the tree could carry stale
    # modules into the wheel, and two runs would share it.
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", source / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"),
            *("-w", str(wheels), str(source)),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = wheels.glob("aura_platform-*.whl")
    venv = tmp_path / "venv"
    uv = Path(sys.executable).with_name("uv")  # a dev dependency: seconds where pip took 60+
    if uv.exists():
        subprocess.run([str(uv), "venv", "-q", "--python", sys.executable, str(venv)], check=True)
        install = [str(uv), "pip", "install", "-q", "--python", str(venv / "bin" / "python")]
    else:  # this environment's pip installs into the new one: no pip bootstrap there
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        install = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
        install += ["install", "-q"]
    subprocess.run([*install, str(wheel), "pytest"], check=True, capture_output=True, timeout=240)
    return str(venv / "bin" / "python"), time.monotonic() - started


@pytest.fixture(scope="module", autouse=True)
def core_install(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[concurrent.futures.Future[tuple[str, float]]]:
    """``_install_core_wheel``, started with the module: the build and the install run
    while the module's other tests run. (The shop's tests run once, in the core install:
    passing there, with no extra, they pass in this fuller environment too.)"""
    with concurrent.futures.ThreadPoolExecutor(1) as background:
        yield background.submit(_install_core_wheel, tmp_path_factory.mktemp("core"))


@pytest.mark.services
@pytest.mark.timeout(420)
def test_the_core_wheel_alone_runs_the_example_project(
    shop_pg_url: str,
    redis_url: str,
    amqp_url: str,
    core_install: concurrent.futures.Future[tuple[str, float]],
) -> None:
    started = time.monotonic()
    python, installed = core_install.result(timeout=360)
    probe = f"import importlib.util as u; print([m for m in {EXTRAS_ONLY!r} if u.find_spec(m)])"
    extras = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True)
    assert extras.stdout.strip() == "[]", f"the core install pulled extras: {extras.stdout}"
    _run_shop_tests(python, _shop_env(shop_pg_url, redis_url, amqp_url))
    print(
        f"core wheel: built and installed in {installed:.0f} s (in the background), "
        f"this test {time.monotonic() - started:.0f} s"
    )
