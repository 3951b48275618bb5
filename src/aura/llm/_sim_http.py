"""The simulator's HTTP/1.1, on h11 over raw asyncio streams: read a request, send a
reply whole, trickled or as a server-sent-event stream (reset midway if asked)."""

from __future__ import annotations

import asyncio
from typing import Literal

import h11

from aura.llm._sim_faults import Reply, reset_connection

__all__ = ["read_request", "send", "send_stream"]

_MAX_BODY = 1_000_000


async def read_request(
    connection: h11.Connection, reader: asyncio.StreamReader
) -> tuple[h11.Request | None, bytes]:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            connection.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > _MAX_BODY:
                raise h11.ProtocolError("request body too large")
        elif isinstance(event, h11.EndOfMessage):
            return request, bytes(body)
        else:  # ConnectionClosed (or PAUSED, which start_next_cycle prevents)
            return None, b""


async def send(connection: h11.Connection, writer: asyncio.StreamWriter, reply: Reply) -> None:
    if reply.delay:
        await asyncio.sleep(reply.delay)
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(reply.body))),
        *reply.headers,
    ]
    writer.write(connection.send(h11.Response(status_code=reply.status, headers=headers)))
    if reply.trickle:
        for index in range(len(reply.body)):
            writer.write(connection.send(h11.Data(data=reply.body[index : index + 1])))
            await writer.drain()
            await asyncio.sleep(reply.trickle)
    else:
        writer.write(connection.send(h11.Data(data=reply.body)))
    writer.write(connection.send(h11.EndOfMessage()))
    await writer.drain()


async def send_stream(
    connection: h11.Connection, writer: asyncio.StreamWriter, reply: Reply, *, reset_after: int
) -> Literal["sent", "reset", "abandoned"]:
    """Send an SSE stream (reset after ``reset_after`` events for a mid-stream reset);
    "abandoned" when the client hung up."""
    assert reply.events is not None
    if reply.delay:
        await asyncio.sleep(reply.delay)  # the time to the first token
    headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
    try:
        writer.write(connection.send(h11.Response(status_code=200, headers=headers)))
        for index, event in enumerate(reply.events):
            if reply.midstream == "reset" and index == reset_after:
                reset_connection(writer)
                return "reset"
            writer.write(connection.send(h11.Data(data=event)))
            await writer.drain()
            if writer.is_closing():
                raise ConnectionResetError("the client closed the stream")
            if reply.trickle:
                await asyncio.sleep(reply.trickle)
        writer.write(connection.send(h11.EndOfMessage()))
        await writer.drain()
    except ConnectionError:
        return "abandoned"
    return "sent"
