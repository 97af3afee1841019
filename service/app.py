"""Wiring: connect to NATS and start a dispatcher, a worker, or all of them.

Each component gets its own NATS connection, exactly as if it ran in its own process:
`lifeline run` is the same thing as one `lifeline dispatcher` plus one `lifeline worker`
per provider, just in one process for convenience.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client
from opentelemetry.sdk.metrics import MeterProvider

from service.config import Config
from service.dispatcher import Dispatcher
from service.embedded import redact_url
from service.telemetry import Tracing, observe_health
from workers import testmode
from workers.registry import build_provider
from workers.runtime import WorkerRuntime

log = logging.getLogger("lifeline")


class NatsUnreachable(RuntimeError):
    pass


class ConnectionWatch:
    """Tells a component whose NATS connection nats-py gave up on (closed, not reconnecting).

    nats-py closes a connection for good on some server errors (a publish over max_payload,
    an authorization violation) and never reconnects it; a process left like that looks
    alive to its supervisor while it serves nothing. So the component stops and the process
    exits non-zero, and compose, systemd or Kubernetes start a fresh one.

    A credential the server stopped accepting can also show up while reconnecting (the
    connection dropped first, then every CONNECT is refused); nats-py would retry that
    forever. As the Go client does, the same refusal twice in a row closes the connection.
    """

    AUTH_REFUSALS_TO_GIVE_UP = 2

    def __init__(self, name: str) -> None:
        self.name = name
        self.lost = asyncio.Event()
        self.closing = False  # set by Component.stop: our own close is not a loss
        self.nc: Client | None = None
        self._auth_refusals = 0
        self._giving_up: asyncio.Future[None] | None = None

    def on_error(self, exc: Exception) -> None:
        if not _is_auth_refusal(exc):
            return
        self._auth_refusals += 1
        if self._auth_refusals >= self.AUTH_REFUSALS_TO_GIVE_UP and self.nc is not None:
            # Not awaited: nats-py calls this from its reconnect task, which close() cancels.
            self._giving_up = asyncio.ensure_future(self._give_up(self.nc))

    async def wait_lost(self) -> str:
        """Until the connection is gone for good; returns the component's name. nats-py's
        closed callback says so, but its close can stop at a dead socket before calling it;
        so the state is checked every second too."""
        while not self.lost.is_set():
            try:
                await asyncio.wait_for(self.lost.wait(), 1.0)
            except TimeoutError:
                if self.nc is not None and self.nc.is_closed:
                    await self.on_closed()
        return self.name

    async def _give_up(self, nc: Client) -> None:
        try:
            await nc.close()
        except Exception as exc:  # noqa: BLE001 - closing a dead socket raises what it likes
            # nats-py then skips its closed callback (its close stops at the socket).
            log.debug("%s: closing the refused connection: %r", self.name, exc)
        await self.on_closed()

    async def on_reconnected(self) -> None:
        self._auth_refusals = 0

    async def on_closed(self) -> None:
        if self.closing or self.lost.is_set():
            return
        error = self.nc.last_error if self.nc is not None else None
        why = f"{type(error).__name__}: {error}" if error is not None else "closed"
        log.error(
            "%s: the NATS connection is gone for good (%s); "
            "stopping so a supervisor can restart it",
            self.name,
            why,
        )
        self.lost.set()


async def connect(
    url: str, name: str, *, wait_for_server: bool = True, watch: ConnectionWatch | None = None
) -> Client:
    """Connect to NATS. Services wait for the server (logging each retry), clients give up fast."""

    async def on_error(exc: Exception) -> None:
        # A service logs each retry; a client (ask, status, ...) says once why it gave up.
        log.log(
            logging.WARNING if wait_for_server else logging.DEBUG,
            "%s: NATS at %s: %s: %s",
            name,
            redact_url(url),
            type(exc).__name__,
            exc or "retrying",
        )
        if watch is not None:
            watch.on_error(exc)

    try:
        nc = await nats.connect(
            servers(url),
            name=name,
            connect_timeout=5,
            # nats-py retries the first connect too; -1 waits for a server that starts later.
            max_reconnect_attempts=-1 if wait_for_server else 1,
            reconnect_time_wait=2 if wait_for_server else 0.2,
            error_cb=on_error,
            closed_cb=watch.on_closed if watch is not None else None,
            reconnected_cb=watch.on_reconnected if watch is not None else None,
        )
    except Exception as exc:  # noqa: BLE001 - nats-py raises several unrelated types here
        raise NatsUnreachable(
            f"cannot reach NATS at {redact_url(url)} ({type(exc).__name__}: {exc}). "
            "Start one, set NATS_URL or --nats-url, "
            "or use `lifeline run`, which starts an embedded server"
        ) from None
    if watch is not None:
        watch.nc = nc
    return nc


def servers(url: str) -> list[str]:
    """A NATS URL, or a comma-separated list of a cluster's URLs as the `nats` CLI takes them
    (nats-py wants a list). Any one reachable server is enough to start: the client learns
    the cluster's other servers from it and fails over to them."""
    return [part.strip() for part in url.split(",") if part.strip()]


def _is_auth_refusal(exc: Exception) -> bool:
    return isinstance(exc, nats.errors.AuthorizationError) or (
        isinstance(exc, nats.errors.Error) and "authorization violation" in str(exc).lower()
    )


@dataclass
class Component:
    """A started dispatcher or worker and its connection."""

    name: str
    nc: Client
    stop_runtime: Callable[[], Awaitable[None]]
    watch: ConnectionWatch

    async def stop(self, drain_timeout_s: float = 5.0) -> None:
        self.watch.closing = True
        await self.stop_runtime()
        if self.nc.is_closed:
            return
        try:  # drain flushes replies still buffered; a vanished server must not hang shutdown
            await asyncio.wait_for(self.nc.drain(), drain_timeout_s)
        except (TimeoutError, nats.errors.Error):
            await self.nc.close()


async def start_dispatcher(
    config: Config, url: str, tracers: Tracing, meters: MeterProvider | None = None
) -> tuple[Component, Dispatcher]:
    watch = ConnectionWatch("dispatcher")
    nc = await connect(url, "lifeline-dispatcher", watch=watch)
    dispatcher = Dispatcher(nc, config, tracers.recorder("lifeline.dispatcher"))
    await dispatcher.start()
    if meters is not None:
        observe_health(meters, dispatcher.health)
    component = Component(name="dispatcher", nc=nc, stop_runtime=dispatcher.stop, watch=watch)
    return component, dispatcher


async def start_worker(
    config: Config, name: str, url: str, tracers: Tracing
) -> tuple[Component, WorkerRuntime]:
    settings = config.providers[name]
    # Fails here, before connecting, on a missing API key or a plug-in that does not load.
    provider = build_provider(settings, name)
    if testmode.enabled():  # the conformance kit's workers: lifeline-test: directives obeyed
        provider = testmode.with_test_mode(provider)
        log.warning("worker %s in test mode (%s=1)", name, testmode.TEST_MODE_ENV)
    watch = ConnectionWatch(f"worker {name}")
    nc = await connect(url, f"lifeline-worker-{name}", watch=watch)
    runtime = WorkerRuntime(
        name=name,
        kind=settings.kind,
        provider=provider,
        nc=nc,
        spans=tracers.recorder("lifeline.worker"),
        timeout_s=settings.timeout_s,
    )
    await runtime.start()
    component = Component(name=f"worker {name}", nc=nc, stop_runtime=runtime.stop, watch=watch)
    return component, runtime


@dataclass
class Stack:
    """Everything `lifeline run` starts; stopped in reverse order."""

    components: list[Component] = field(default_factory=list)
    dispatcher: Dispatcher | None = None
    workers: dict[str, WorkerRuntime] = field(default_factory=dict)

    async def stop(self) -> None:
        for component in reversed(self.components):
            await component.stop()
        self.components.clear()

    async def lost(self) -> str:
        """Wait until some component's connection is gone for good; returns its name."""
        waits = {asyncio.ensure_future(c.watch.wait_lost()): c.name for c in self.components}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return waits[next(iter(done))]


async def start_stack(
    config: Config,
    url: str,
    tracers: Tracing,
    workers: list[str] | None = None,
    meters: MeterProvider | None = None,
) -> Stack:
    """One dispatcher and one worker per provider (or per name in `workers`)."""
    stack = Stack()
    try:
        for name in config.providers if workers is None else workers:
            component, stack.workers[name] = await start_worker(config, name, url, tracers)
            stack.components.append(component)
        component, stack.dispatcher = await start_dispatcher(config, url, tracers, meters)
        stack.components.append(component)
    except BaseException:
        await stack.stop()
        raise
    return stack
