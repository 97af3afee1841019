"""An HTTP answer that comes before the request's body is all sent is heard.

A provider may answer from a request's head alone (401 for a bad key, 413 for a body too
large) and then close, or stop reading. httpcore writes the whole body before it reads
anything: it does read the answer after a write that failed (http11.py suppresses
WriteError for that), but asyncio's transport had paused reading, so a close (a reset, with
the body unread) dropped the answer with the connection (`connection`), and a server that
only stopped reading left the write waiting until its timeout (`timeout`).

RFC 9112 (9.5) asks a client sending a body to watch for an error answer and stop sending.
Here a body write of more than _WATCHED_BYTES is raced against a read: an error status
arriving first ends the write with WriteError, and httpcore reads the answer, which the
read kept. Smaller writes fit the socket's buffers and are written as they were.

    EarlyAnswers      the httpcore network backend of a worker's client (workers.base)
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore

# A write that fits the kernel's socket buffers never waits on the server: not watched.
_WATCHED_BYTES = 64 * 1024
_READ_BYTES = 64 * 1024
# What stops the body: a final error answer. Any other (a 100 Continue, an early 200 of a
# server still reading) is kept for httpcore while the body is sent on.
_ERROR_ANSWER = re.compile(rb"HTTP/1\.[01] [45]\d\d")


class EarlyAnswers(httpcore.AsyncNetworkBackend):
    """httpcore's own backend, its streams watching for an answer while a body is written."""

    def __init__(self) -> None:
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
        return _Watched(stream)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        return _Watched(await self._backend.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class _Watched(httpcore.AsyncNetworkStream):
    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream
        self._early: bytes | None = None  # what a read during a write got: the answer's start

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._early is not None:
            data, self._early = self._early, None
            return data
        return await self._stream.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if len(buffer) <= _WATCHED_BYTES or self._early is not None:
            await self._stream.write(buffer, timeout)
            return
        write = asyncio.ensure_future(self._stream.write(buffer, timeout))
        read = asyncio.ensure_future(self._stream.read(_READ_BYTES, timeout))
        try:
            await asyncio.wait((write, read), return_when=asyncio.FIRST_COMPLETED)
            if not write.done() and not _error_answer(read):  # nothing that stops the body
                await asyncio.wait((write,))
        finally:  # the write stopped by an error answer, the read given up if still waiting
            write.cancel()
            read.cancel()
            await asyncio.gather(write, read, return_exceptions=True)
        if _answered(read):
            self._early = read.result()
            if write.cancelled() or write.exception() is not None:
                raise httpcore.WriteError("the provider answered before the request was sent")
        write.result()

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _Watched(await self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


def _answered(read: asyncio.Future[bytes]) -> bool:
    """The read got bytes (an EOF or a reset is the write's to report)."""
    return read.done() and not read.cancelled() and read.exception() is None and bool(read.result())


def _error_answer(read: asyncio.Future[bytes]) -> bool:
    return _answered(read) and _ERROR_ANSWER.match(read.result()) is not None
