"""``aura llm-sim``: the OpenAI-compatible LLM simulator, with faults."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import typer

from aura.cli import app
from aura.errors import InvalidInputError

__all__ = ["llm_sim_command"]

if TYPE_CHECKING:
    from aura.llm import LLMSimulator


def _rate(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise InvalidInputError(f"--{name} must be between 0 and 1, got {value:g}", field=name)
    return value


@app.command("llm-sim")
def llm_sim_command(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8765, min=0, max=65535, help="Port (0: any free port)."),
    latency: float = typer.Option(0.0, min=0, help="Seconds added to every answer."),
    jitter: float = typer.Option(0.0, min=0, help="Plus a random 0..JITTER seconds."),
    error_rate: float = typer.Option(0.0, help="Share answered 500/503/429."),
    hang_rate: float = typer.Option(0.0, help="Share held for --hang-seconds first."),
    hang_seconds: float = typer.Option(30.0, min=0, help="How long a hung answer waits."),
    trickle_rate: float = typer.Option(0.0, help="Share sent one byte at a time."),
    trickle_interval: float = typer.Option(0.5, min=0, help="Seconds between trickled bytes."),
    reset_rate: float = typer.Option(0.0, help="Share answered with a TCP reset."),
    malformed_rate: float = typer.Option(0.0, help="Share answered with a broken body."),
    outage: float = typer.Option(0.0, min=0, help="Start with an outage of this many seconds."),
    api_key: str | None = typer.Option(None, help="Require this bearer key (else 401)."),
    seed: int = typer.Option(0, help="Seed of the fault dice."),
) -> None:
    """Serve /v1/chat/completions with injected faults; /admin/* changes them live."""
    from aura.llm import Faults, LLMSimulator

    faults = Faults(
        latency=latency,
        jitter=jitter,
        error_rate=_rate("error-rate", error_rate),
        hang_rate=_rate("hang-rate", hang_rate),
        hang_seconds=hang_seconds,
        trickle_rate=_rate("trickle-rate", trickle_rate),
        trickle_interval=trickle_interval,
        reset_rate=_rate("reset-rate", reset_rate),
        malformed_rate=_rate("malformed-rate", malformed_rate),
        api_key=api_key,
    )
    if sum((error_rate, hang_rate, trickle_rate, reset_rate, malformed_rate)) > 1.0:
        raise InvalidInputError("the fault rates add up to more than 1", field="rates")
    simulator = LLMSimulator(faults, host=host, port=port, seed=seed)
    if outage:
        simulator.start_outage(outage)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(simulator))


async def _serve(simulator: LLMSimulator) -> None:
    await simulator.start()
    typer.echo(f"LLM simulator on {simulator.base_url} (Ctrl-C stops it)")
    await simulator.serve_forever()
