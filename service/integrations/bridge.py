"""One Lifeline client on a private event loop, callable from any thread and any event loop.

LangChain and Haystack call a model both synchronously (invoke, Pipeline.run) and
asynchronously (ainvoke, AsyncPipeline), from threads and loops they choose. A nats-py
connection belongs to the event loop that opened it, and a sync call cannot run an event loop
inside a thread that may already run one. So each NATS URL gets one daemon thread running its
own loop, which owns the one connection, and every call, sync or async, runs there:

    sync caller     asyncio.run_coroutine_threadsafe(...).result()  blocks only its thread
    async caller    await asyncio.wrap_future(...)                  its loop stays free;
                                                                    cancelling it cancels the call
    a stream        a task on the private loop reads the events and hands each to the caller
                    through a queue (queue.Queue for a thread, call_soon_threadsafe for a loop);
                    a caller that stops reading cancels that task, which unsubscribes

Models that name the same URL share the thread and the connection, as HTTP clients share a
pool; it connects on first use (Unreachable then, and again on the next call, while NATS is
down) and reconnects by itself afterwards. Every model that calls through it holds it, and a
model's close() releases its own hold (`release()`): the other models' calls go on, and so do
its own already in flight. The connection closes when the last model holding it releases it
(or at bridge.close(url), and close_all() at exit, whoever holds it), ending the calls still in
flight on it with LifelineError; the next call opens a new one.

A model dropped without close() holds the connection while it lives. A hold is a weak
reference, so once the model is garbage its hold is gone, but nothing closes then: a finalizer
runs on whatever thread the collector does (the connection's own included, which cannot join
itself), and an app making a model per request would pay a connection per request. The close()
of the last model still holding it closes it then, else close_all() at exit.

The models call through `shared()`, which takes the connection, and the model's hold, at each
call: one closed between the call taking it and sending on it is taken afresh.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import os
import queue
import threading
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator
from itertools import count
from typing import Any, TypeVar

from service.client import LOCAL_NATS, Lifeline, LifelineError

T = TypeVar("T")

_DONE = object()
_TRIES = 3  # connections a shared() call takes, each closed by another user before it went in


class Closed(LifelineError):
    """A call on a Connection that close() has closed, before the call went in: nothing was
    sent. connection() gives a new one (shared() takes it by itself)."""


class Connection:
    """A Lifeline client for one NATS URL, on its own loop in its own thread."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self._name = name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"lifeline-nats-{name}", daemon=True
        )
        self._thread.start()
        self._client: Lifeline | None = None
        self._connecting: asyncio.Lock | None = None
        self.closed = False
        # Calls submitted and not done: close() ends each (no caller is left blocked). A call
        # goes in, and close() begins, under _closing: each call is one close() ends, or one
        # refused as Closed (never one submitted to a loop that has stopped).
        self._calls: set[concurrent.futures.Future[Any]] = set()
        self._closing = threading.Lock()
        # The models holding it, by id: weak references, so that a model dropped without
        # close() is no hold once it is garbage (see the module's docstring).
        self._holders: dict[int, weakref.ref[Any]] = {}

    def hold(self, holder: object) -> None:
        """Count `holder` (a model) among those using the connection, once however often it
        calls. The registry's lock serialises hold() and release()."""
        key = id(holder)
        held = self._holders.get(key)
        if held is not None and held() is holder:
            return
        holders = self._holders

        def dropped(ref: weakref.ref[Any]) -> None:
            # Run by the garbage collector, on any thread, perhaps one holding the registry's
            # lock: no lock here (a dict's pop is atomic). It runs before the holder's memory,
            # and so its id, can go to another object.
            if holders.get(key) is ref:
                holders.pop(key, None)

        holders[key] = weakref.ref(holder, dropped)

    def release(self, holder: object) -> bool:
        """Stop counting `holder`; whether it was the last one holding the connection."""
        held = self._holders.get(id(holder))
        if held is None or held() is not holder:
            return False  # it never called, or called through an earlier connection
        del self._holders[id(holder)]
        return not self._holders

    async def _lifeline(self) -> Lifeline:
        """The client, connected on first use (on the private loop)."""
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._client is not None and self._client.nc.is_closed:
                # Closed for good (nats-py gives up on some server errors, an authorization
                # change say): a new one, rather than "closed" for every call from now on.
                with contextlib.suppress(Exception):
                    await self._client.close()
                self._client = None
            if self._client is None:
                client = await Lifeline.connect(self.url, name=self._name)
                if self.closed:  # while it connected, close() found no client to close
                    await client.close()
                    raise LifelineError("this Lifeline connection was closed")
                self._client = client
            return self._client

    def _submit(self, call: Callable[[Lifeline], Awaitable[T]]) -> concurrent.futures.Future[T]:
        if threading.current_thread() is self._thread:
            raise RuntimeError("a blocking Lifeline call from its own connection's thread")

        async def run() -> T:
            try:
                return await call(await self._lifeline())
            except asyncio.CancelledError:
                if self.closed:  # close() cancelled what it could not end (a connect): say so
                    raise LifelineError("this Lifeline connection was closed") from None
                raise  # its caller cancelled it

        with self._closing:
            if self.closed:
                raise Closed(
                    "this Lifeline connection is closed (bridge.close(), or the close() of the "
                    "last model holding it): bridge.connection() gives a new one"
                )
            future = asyncio.run_coroutine_threadsafe(run(), self._loop)
            self._calls.add(future)
        future.add_done_callback(self._calls.discard)
        return future

    def call(self, call: Callable[[Lifeline], Awaitable[T]]) -> T:
        """Run `call(client)` on the private loop; block this thread until it is done."""
        future = self._submit(call)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # interrupted (Ctrl-C): stop the call too
            raise

    def acall(self, call: Callable[[Lifeline], Awaitable[T]]) -> Awaitable[T]:
        """Run `call(client)` on the private loop; await it from the caller's loop. Submitted
        at once: Closed is raised here, not when awaited."""
        return asyncio.wrap_future(self._submit(call))

    def iterate(self, events: Callable[[Lifeline], AsyncIterator[T]]) -> Generator[T, None, None]:
        """The items of `events(client)`, read on the private loop, yielded in this thread."""
        handoff: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        future = self._submit(lambda client: _pump(events(client), handoff.put))
        future.add_done_callback(_failure_to(handoff.put))
        try:
            while True:
                ok, item = handoff.get()
                if not ok:
                    raise item
                if item is _DONE:
                    return
                yield item
        finally:
            future.cancel()

    async def aiterate(
        self, events: Callable[[Lifeline], AsyncIterator[T]]
    ) -> AsyncGenerator[T, None]:
        """The items of `events(client)`, read on the private loop, yielded on the caller's."""
        caller = asyncio.get_running_loop()
        handoff: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()

        def put(item: tuple[bool, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the caller's loop is gone: nobody reads
                caller.call_soon_threadsafe(handoff.put_nowait, item)

        future = self._submit(lambda client: _pump(events(client), put))
        future.add_done_callback(_failure_to(put))
        try:
            while True:
                ok, item = await handoff.get()
                if not ok:
                    raise item
                if item is _DONE:
                    return
                yield item
        finally:
            future.cancel()

    def close(self) -> None:
        """Close the connection and stop the thread (waits for neither more than a few
        seconds), whoever holds it. Calls still in flight, from any thread or loop, end with
        LifelineError (their requests aborted at their dispatchers) rather than wait for ever."""
        with self._closing:
            if self.closed:
                return
            self.closed = True

        async def shut() -> None:
            if self._client is not None:
                await self._client.close()  # its calls in flight raise LifelineError
            others = {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}
            if others:  # ending with that error; what does not (still connecting, say) is cancelled
                _, pending = await asyncio.wait(others, timeout=1)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=1)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        for future in list(self._calls):  # the loop is gone: nothing else will end them
            if not future.done():
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    future.set_exception(LifelineError("this Lifeline connection was closed"))
        if not self._thread.is_alive():
            self._loop.close()


async def _pump(events: AsyncIterator[Any], put: Callable[[tuple[bool, Any]], None]) -> None:
    """Hand every item of `events` to `put`, then _DONE, or the exception that ended them."""
    try:
        async for item in events:
            put((True, item))
        put((True, _DONE))
    except asyncio.CancelledError:
        raise  # the reader is gone
    except BaseException as exc:  # noqa: BLE001 - the reader raises it
        put((False, exc))
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


def _failure_to(
    put: Callable[[tuple[bool, Any]], None],
) -> Callable[[concurrent.futures.Future[Any]], None]:
    """A done-callback handing a stream's failure before its first item (connecting, say, which
    _pump never sees) to its reader, who would otherwise wait for ever."""

    def done(future: concurrent.futures.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            put((False, future.exception()))

    return done


class Shared:
    """A model's use of the shared Connection of a URL, taken, and held by the model, at each
    call (what the models call through): a call that finds it closed before the call went in
    (its last holder released it just then, or bridge.close()) is made on a new one, as any
    call after that is. Calls already in flight on it end with LifelineError, as close() says."""

    def __init__(self, url: str | None, name: str, holder: object) -> None:
        self.url = url
        self.name = name
        self.holder = holder

    def _connection(self) -> Connection:
        return connection(self.url, self.name, holder=self.holder)

    def _live(self, use: Callable[[Connection], T]) -> T:
        for tries in count(1):
            try:
                return use(self._connection())
            except Closed:
                if tries == _TRIES:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def call(self, call: Callable[[Lifeline], Awaitable[T]]) -> T:
        return self._live(lambda shared: shared.call(call))

    async def acall(self, call: Callable[[Lifeline], Awaitable[T]]) -> T:
        return await self._live(lambda shared: shared.acall(call))

    def iterate(self, events: Callable[[Lifeline], AsyncIterator[T]]) -> Generator[T, None, None]:
        # A Connection's iterate() submits at its first item: a Closed comes before any item.
        for tries in count(1):
            items = self._connection().iterate(events)
            try:
                first = next(items)
            except StopIteration:
                return
            except Closed:
                if tries == _TRIES:
                    raise
                continue
            with contextlib.closing(items):
                yield first
                yield from items
            return

    async def aiterate(
        self, events: Callable[[Lifeline], AsyncIterator[T]]
    ) -> AsyncGenerator[T, None]:
        for tries in count(1):
            items = self._connection().aiterate(events)
            try:
                first = await anext(items)
            except StopAsyncIteration:
                return
            except Closed:
                if tries == _TRIES:
                    raise
                continue
            async with contextlib.aclosing(items):
                yield first
                async for item in items:
                    yield item
            return


_connections: dict[str, Connection] = {}
_lock = threading.Lock()


def _forget_in_child() -> None:
    """A forked child (gunicorn --preload, Celery's prefork, multiprocessing's default on
    Linux) has its parent's connections but not their threads: a call waited for ever on a
    loop nobody ran. It opens its own on first use."""
    global _lock
    _lock = threading.Lock()  # perhaps held by a thread that is not in the child
    _connections.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def _url(url: str | None) -> str:
    return url or os.environ.get("NATS_URL") or LOCAL_NATS


def connection(
    url: str | None = None, name: str = "lifeline-client", *, holder: object | None = None
) -> Connection:
    """The shared Connection for `url` (else $NATS_URL, else nats://127.0.0.1:4222), held by
    `holder` if given (see release())."""
    url = _url(url)
    with _lock:
        shared = _connections.get(url)
        if shared is None or shared.closed:
            shared = _connections[url] = Connection(url, name)
        if holder is not None:
            shared.hold(holder)
        return shared


def shared(url: str | None, name: str, holder: object) -> Shared:
    """What a model calls through: the shared Connection for `url`, taken at each call, and
    held by `holder` (the model) from its first call until release()."""
    return Shared(url, name, holder)


def release(url: str | None, holder: object) -> None:
    """`holder` (a model) is done with the shared connection for `url`: the connection closes
    if no other holds it (their calls go on otherwise, and so do the holder's own in flight)."""
    url = _url(url)
    with _lock:
        shared = _connections.get(url)
        if shared is None or not shared.release(holder):
            return
        del _connections[url]
    shared.close()


def close(url: str | None = None) -> None:
    """Close the shared connection for `url`, if one is open, whoever holds it (their calls in
    flight end with LifelineError; the next call opens another)."""
    url = _url(url)
    with _lock:
        shared = _connections.pop(url, None)
    if shared is not None:
        shared.close()


@atexit.register
def close_all() -> None:
    """Close every shared connection."""
    with _lock:
        shared = list(_connections.values())
        _connections.clear()
    for one in shared:
        one.close()
