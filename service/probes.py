"""Liveness and readiness over HTTP for the components of one process (`--health-port`), for
compose's healthchecks and Kubernetes' probes: a tiny asyncio responder, no HTTP library.

    GET /healthz   200 while every NATS connection of the process is usable or reconnecting;
                   503 once one is closed for good (the process is about to exit anyway)
    GET /readyz    200 when every component is connected, subscribed and not overloaded, the
                   same judgement as `lifeline health` from the same figures; else 503

Both answer JSON: each component's service name and id, whether it is connected, and what
keeps it from being ready. Off unless asked for: nothing listens by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from service.discovery import problems

log = logging.getLogger("lifeline.probes")

_READ_TIMEOUT_S = 5.0
_MAX_HEAD_BYTES = 8192
# Connections served at once. A supervisor probes one at a time, a few at most; without a
# bound, a client holding thousands of half-sent requests took every file descriptor of the
# process (the port listens on every interface by default), its NATS reconnects included.
_MAX_CONNECTIONS = 64
_WARN_EVERY_S = 10.0
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def component_state(component: Any) -> dict[str, Any]:
    """One component's (service.app.Component) readiness: connected, and no problem in its
    service API figures."""
    connected = component.nc.is_connected
    responder = component.responder
    stats = responder.stats() if responder is not None else {"endpoints": []}
    found = ([] if connected else ["not connected to NATS"]) + problems(stats)
    return {
        "name": stats.get("name", component.name),
        "id": stats.get("id", ""),
        "connected": connected,
        "ready": not found,
        "problems": found,
    }


def parse_address(address: str) -> tuple[str, int]:
    """[HOST:]PORT; every interface when HOST is left out (a Kubernetes probe comes from
    outside the container)."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--health-port: expected [HOST:]PORT, got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """A request's line, once its header fields up to the blank line are read past; None when
    the client hung up first. Lines may end in a bare LF, which RFC 9112 lets a server take
    (hand-written probes send them). Each line is bounded by the reader's limit, their number
    by the read timeout."""
    request_line = await reader.readline()
    if not request_line.endswith(b"\n"):
        return None
    while True:
        field = await reader.readline()
        if not field.endswith(b"\n"):
            return None
        if not field.strip(b"\r\n"):
            return request_line


class Probes:
    """Serves /healthz and /readyz for `components` (a list that may still grow)."""

    def __init__(self, components: list[Any]) -> None:
        self.components = components
        self.port = 0
        self._server: asyncio.Server | None = None
        # Connections being served: stop() ends them (Python 3.11's wait_closed does not wait
        # for them, and each left open logged a traceback as the loop closed: 2,000 half-sent
        # requests, 2,000 tracebacks).
        self._serving: set[asyncio.Task[None]] = set()
        self._turned_away = 0  # connections hung up on for their number, not yet logged
        self._warned_at = -_WARN_EVERY_S

    async def start(self, address: str) -> None:
        host, port = parse_address(address)
        self._server = await asyncio.start_server(self._serve, host, port, limit=_MAX_HEAD_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("health probes on http://%s:%d/healthz and /readyz", host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in self._serving:
                task.cancel()
            await asyncio.gather(*self._serving, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    def live(self) -> tuple[bool, dict[str, Any]]:
        gone = [c.name for c in self.components if c.nc.is_closed]
        return not gone, {"live": not gone, "closed_for_good": gone}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        states = [component_state(c) for c in self.components]
        ready = bool(states) and all(s["ready"] for s in states)
        return ready, {"ready": ready, "components": states}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._serving) >= _MAX_CONNECTIONS:
            self._turn_away(writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                request_line = await _read_head(reader)
            if request_line is not None:
                writer.write(self._response(request_line))
            await writer.drain()
        except (
            TimeoutError,
            ConnectionError,
            ValueError,  # readline's word for a line past the reader's limit
        ):
            pass  # a client that sent no request, or too much of one: just hang up
        finally:
            self._serving.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _turn_away(self, writer: asyncio.StreamWriter) -> None:
        """Hang up at once, and say so at most once per 10 s with how many."""
        writer.transport.abort()
        self._turned_away += 1
        now = asyncio.get_running_loop().time()
        if now - self._warned_at >= _WARN_EVERY_S:
            log.warning(
                "health probes: hung up on %d connection(s): %d open, the most served at once",
                self._turned_away,
                _MAX_CONNECTIONS,
            )
            self._turned_away, self._warned_at = 0, now

    def _response(self, request_line: bytes) -> bytes:
        method, target = (request_line.split() + [b"", b""])[:2]
        # The absolute form (`GET http://host:port/readyz`), which a server must accept too.
        if target.startswith((b"http://", b"https://")):
            parts = target.split(b"/", 3)  # http:, "", the authority, the path after it
            target = b"/" + (parts[3] if len(parts) > 3 else b"")
        path = target.split(b"?", 1)[0]
        checks = {b"/healthz": self.live, b"/readyz": self.ready}
        if path not in checks:
            status, body = 404, {"error": "not found: try /healthz or /readyz"}
        elif method not in (b"GET", b"HEAD"):
            status, body = 405, {"error": "use GET"}
        else:
            ok, body = checks[path]()
            status = 200 if ok else 503
        payload = json.dumps(body).encode()
        lines = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        )
        return lines.encode() + (b"" if method == b"HEAD" else payload)


@contextlib.asynccontextmanager
async def health_probes(address: str | None) -> AsyncIterator[Probes]:
    """Probes bound on `address` ([HOST:]PORT) for a process's components, which join
    `components` as they start: entered before anything connects, so a port in use stops the
    process at once (ValueError: exit 2) and one waiting for NATS is live but not ready. They
    stop on the way out, whatever the way. `address` None: nothing listens (probes that answer
    nothing, so the caller has no case of its own)."""
    probes = Probes([])
    if address is not None:
        try:
            await probes.start(address)
        except OSError as exc:
            raise ValueError(f"--health-port {address}: cannot listen there ({exc})") from None
    try:
        yield probes
    finally:
        await probes.stop()
