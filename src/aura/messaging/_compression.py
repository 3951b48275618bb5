"""Compressed message bodies, inflated only within a bound.

kombu inflates a body whose ``compression`` header names a codec while it builds the
message, before any consumer code runs (``kombu.message.Message.__init__``): a 594-byte
brotli body inflating to 300 MiB took a worker from 122 to 723 MiB, again on every
redelivery. ``bound_compression()`` replaces kombu's decoders (gzip/zlib, bz2, brotli,
lzma/xz, zstd where installed) with incremental ones that stop once the output would pass
``MAX_INFLATED_BYTES`` (the envelope's message size limit), or ``MAX_RATIO`` (500) times
the compressed size past ``RATIO_FLOOR`` (256 KiB), and raise ``InflateLimitError``.
kombu then keeps the body as it arrived (still compressed) and records the error; the
envelope guard finds a body that is not JSON and dead-letters it as ``malformed_message``
holding the original compressed bytes. Peak memory for any body is the bound plus one
chunk, whatever the ratio.
"""

from __future__ import annotations

import bz2
import lzma
import threading
import zlib
from collections.abc import Callable
from typing import Any

from kombu import compression as kombu_compression

from aura.errors import InvalidInputError

__all__ = [
    "MAX_INFLATED_BYTES",
    "MAX_RATIO",
    "RATIO_FLOOR",
    "InflateLimitError",
    "bound_compression",
    "bound_for",
    "inflate",
]

MAX_INFLATED_BYTES = 32 * 1024 * 1024
"""The most bytes a compressed body may inflate to (``MAX_MESSAGE_BYTES``)."""
MAX_RATIO = 500
"""... and at most this many times its compressed size, past ``RATIO_FLOOR``: a 600-byte
zlib body can inflate to 600 KB (zlib's most, about 1,000x), legal by size, a bomb by
ratio; JSON task messages compress 5-20x, repetitive ones a few hundred times."""
RATIO_FLOOR = 256 * 1024
_CHUNK = 256 * 1024
_lock = threading.Lock()
_installed = False


class InflateLimitError(InvalidInputError, ValueError):
    """A compressed body would inflate past the bound."""

    def __init__(self, codec: str, limit: int) -> None:
        super().__init__(f"{codec} body inflates past {limit} bytes; not inflated")


def _zlib(data: bytes, limit: int) -> bytes:
    # wbits 47: zlib or gzip framing, whichever the body has (kombu's "gzip" is zlib's)
    decompressor = zlib.decompressobj(47)
    out = bytearray(decompressor.decompress(data, min(_CHUNK, limit + 1)))
    while len(out) <= limit and not decompressor.eof:
        chunk = decompressor.decompress(
            decompressor.unconsumed_tail, min(_CHUNK, limit + 1 - len(out))
        )
        if not chunk and not decompressor.unconsumed_tail:
            break
        out += chunk
    return _checked(out, limit, "zlib", decompressor.eof)


def _checked(out: bytearray, limit: int, codec: str, finished: bool) -> bytes:
    if len(out) > limit:
        # kombu keeps the exception (message.errors), and with it these frames: free the
        # output first, or each refused bomb would hold the bound in memory
        out.clear()
        raise InflateLimitError(codec, limit)
    if not finished:
        out.clear()
        raise ValueError(f"{codec} body is truncated")
    return bytes(out)


def _stream(decompressor: Any, data: bytes, limit: int, codec: str) -> bytes:
    """A decompressor with the ``max_length`` API that keeps its input (bz2, lzma, zstd)."""
    out = bytearray(decompressor.decompress(data, max_length=min(_CHUNK, limit + 1)))
    while len(out) <= limit and not decompressor.eof and not decompressor.needs_input:
        out += decompressor.decompress(b"", max_length=min(_CHUNK, limit + 1 - len(out)))
    return _checked(out, limit, codec, decompressor.eof)


def _bz2(data: bytes, limit: int) -> bytes:
    return _stream(bz2.BZ2Decompressor(), data, limit, "bz2")


def _lzma(data: bytes, limit: int) -> bytes:
    return _stream(lzma.LZMADecompressor(), data, limit, "lzma")


def _brotli(data: bytes, limit: int) -> bytes:
    import brotli  # type: ignore[import-untyped]

    decompressor = brotli.Decompressor()
    out = bytearray(decompressor.process(data, output_buffer_limit=min(_CHUNK, limit + 1)))
    while len(out) <= limit and not decompressor.is_finished():
        if decompressor.can_accept_more_data():
            break  # all input consumed, stream not finished: truncated
        out += decompressor.process(b"", output_buffer_limit=min(_CHUNK, limit + 1 - len(out)))
    return _checked(out, limit, "brotli", decompressor.is_finished())


def _zstd(data: bytes, limit: int) -> bytes:
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        from backports import zstd  # type: ignore[import-not-found]
    return _stream(zstd.ZstdDecompressor(), data, limit, "zstd")


_CODECS: dict[str, Callable[[bytes, int], bytes]] = {
    "application/x-gzip": _zlib,
    "application/x-bz2": _bz2,
    "application/x-brotli": _brotli,
    "application/x-lzma": _lzma,
    "application/zstd": _zstd,
}


def bound_for(size: int, limit: int = MAX_INFLATED_BYTES) -> int:
    """How far a ``size``-byte compressed body may inflate: ``limit``, and at most
    ``MAX_RATIO`` times its size past ``RATIO_FLOOR``."""
    return min(limit, max(RATIO_FLOOR, MAX_RATIO * size))


def inflate(body: bytes, compression: str, limit: int = MAX_INFLATED_BYTES) -> bytes:
    """``body`` inflated with the codec ``compression`` names (a kombu name or alias);
    ``InflateLimitError`` past its bound (``bound_for``), ``ValueError`` for anything
    unreadable."""
    content_type = kombu_compression._aliases.get(compression, compression)
    codec = _CODECS.get(content_type)
    if codec is None:
        raise ValueError(f"unknown compression {compression[:40]!r}")
    return codec(bytes(body), bound_for(len(body), limit))


def bound_compression(limit: int = MAX_INFLATED_BYTES) -> None:
    """Replace kombu's decoders by bounded ones (idempotent; encoders are kombu's own)."""
    global _installed
    with _lock:
        if _installed:
            return
        for content_type, codec in _CODECS.items():
            if content_type in kombu_compression._decoders:

                def bounded(body: bytes, codec: Callable[[bytes, int], bytes] = codec) -> bytes:
                    return codec(bytes(body), bound_for(len(body), limit))

                kombu_compression._decoders[content_type] = bounded
        _installed = True
