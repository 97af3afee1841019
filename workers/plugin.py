"""Your own model as a Lifeline provider: a small class, and the runtime does the rest.

    from workers.plugin import Model

    class Shouty(Model):
        def call(self, request):                 # or `async def call`
            return request.messages[-1].text.upper()

and in the config:

    [providers.shouty]
    kind = "python"
    class = "mypackage.models:Shouty"
    model = "shouty-1"

What a model class may have (only `call` is required):

    call(request) -> str | Answer            the answer; sync (run in a thread, off the event
                                             loop) or async. `request` is the ProviderRequest:
                                             messages (each with .text), tools, stop, ...
    stream(request) -> iterator of str       the answer in pieces as they come, sync or async;
                                             may end with an Answer for usage, finish_reason or
                                             tool calls. Without it a model streams as one piece.
    identifying_params() -> dict             what identifies this model (logged at start-up)
    Settings                                 a msgspec.Struct of its own keys, read from
                                             [providers.<name>.settings] and checked at start-up
                                             with errors naming the key; the instance gets it
                                             as `self.settings`
    close()                                  sync or async, called once when the worker stops

A failure is `raise ModelError(kind, message, retry_after_s=...)` with a kind from
schemas.errors (rate_limit, server_error, timeout, context_length, ...), so the dispatcher
falls back as it does for any provider; any other exception is a `server_error`. Deadlines,
cancels, trace context, the one-reply rule, size limits and streaming over NATS are the
worker runtime's (workers/runtime.py), not the model's.

A package can register its class under the entry-point group `lifeline.providers`
(`[project.entry-points."lifeline.providers"] mine = "mypackage.models:Mine"`): then
`kind = "mine"` works, without `class`.

New request fields reach `call` as new attributes of `request`; nothing a model written
today uses goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from importlib.metadata import entry_points
from typing import Annotated, Any, ClassVar

import msgspec
from msgspec import Meta

from schemas import ProviderOk, ProviderRequest, Usage
from schemas.errors import ProviderError
from schemas.wire import FinishReason, ToolCall, ToolCallDelta, delta_bytes
from workers.settings import ProviderSettings

__all__ = [
    "ENTRY_POINT_GROUP",
    "Answer",
    "Model",
    "ModelError",
    "PluginSettings",
    "ProviderRequest",
    "ToolCall",
    "Usage",
    "installed_kinds",
]

ENTRY_POINT_GROUP = "lifeline.providers"
PYTHON_KIND = "python"

# The error a model raises: kind (schemas.errors), message, status_code, retry_after_s.
ModelError = ProviderError


class Answer(msgspec.Struct, frozen=True, kw_only=True):
    """An answer with more than its text."""

    text: str = ""
    usage: Usage | None = None
    tool_calls: list[ToolCall] | None = None
    finish_reason: FinishReason | None = None  # default: tool_calls when there are, else stop


class Model:
    """A base for model classes (optional: any class with `call` will do)."""

    Settings: ClassVar[type[msgspec.Struct] | None] = None

    def __init__(self, settings: Any = None) -> None:
        self.settings = settings

    def call(self, request: ProviderRequest) -> str | Answer:
        raise NotImplementedError(f"{type(self).__name__} must define call(request)")

    def identifying_params(self) -> dict[str, Any]:
        return {}


class PluginSettings(ProviderSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """[providers.<name>] of kind "python" (with `class`) or of an installed plug-in's kind."""

    # "package.module:ClassName"; for an installed plug-in's kind, its entry point gives it.
    class_: str = msgspec.field(default="", name="class")
    # The model class's own keys, checked against its Settings struct.
    settings: dict[str, Any] = {}  # noqa: RUF012 - a msgspec default, copied per instance
    # Calls of a synchronous model running at once (each in a thread of its own).
    threads: Annotated[int, Meta(ge=1, le=256)] = 16


def installed_kinds() -> dict[str, str]:
    """The kinds installed packages register under `lifeline.providers`: name -> class path."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load(settings: PluginSettings, key: str) -> tuple[type[Any], Any]:
    """The model class `settings` names, and its checked settings (None when it has no
    Settings). Raises ValueError naming the config key at fault (`key` is the provider's
    table, e.g. providers.mine)."""
    if settings.kind == PYTHON_KIND:
        where, path = f"{key}.class", settings.class_
        if not path:
            raise ValueError(f'{where}: required for kind "python" ("package.module:ClassName")')
    else:
        where, path = f"{key}.kind", installed_kinds().get(settings.kind, "")
        if not path:
            raise ValueError(f"{where}: no installed package provides kind {settings.kind!r}")
    cls = _import(path, where)
    if not callable(getattr(cls, "call", None)):
        raise ValueError(f"{where}: {path} has no call(request) method")  # noqa: TRY004
    declared = getattr(cls, "Settings", None)
    if declared is None:
        if settings.settings:
            raise ValueError(
                f"{key}.settings: {path} takes no settings (give the class a Settings struct)"
            )
        return cls, None
    try:
        return cls, msgspec.convert(settings.settings, declared)
    except msgspec.ValidationError as exc:
        raise ValueError(_located(f"{key}.settings", exc)) from None
    except TypeError as exc:  # `Settings` is no type msgspec knows (a msgspec.Struct is one)
        raise ValueError(
            f"{where}: {path}.Settings cannot hold the settings ({exc}); make it a msgspec.Struct"
        ) from None


def _import(path: str, where: str) -> type[Any]:
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f'{where}: expected "package.module:ClassName", got {path!r}')
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - whatever it raises: one line
        raise ValueError(
            f"{where}: cannot import {module_name!r} ({type(exc).__name__}: {exc})"
        ) from None
    found: Any = module
    for part in attr.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise ValueError(f"{where}: module {module_name!r} has no {attr!r}")
    if not isinstance(found, type):
        raise ValueError(f"{where}: {path} is not a class")  # noqa: TRY004
    return found


def _located(key: str, exc: msgspec.ValidationError) -> str:
    """msgspec's "... - at `$.temperature`" as "<key>.temperature: ..."."""
    message, sep, path = str(exc).rpartition(" - at `$")
    if not sep:
        return f"{key}: {exc}"
    return f"{key}{path.rstrip('`')}: {message}"


class PluginProvider:
    """A model class as a Provider (workers/base.py), for the worker runtime."""

    def __init__(self, settings: PluginSettings, name: str = "") -> None:
        key = f"providers.{name}" if name else "provider"
        cls, own = load(settings, key)
        self.model = settings.model or getattr(cls, "model_name", "") or cls.__name__
        self.label = settings.class_ or settings.kind
        self._key = key
        self._max_bytes = settings.max_response_bytes  # an answer's text and tool calls, at most
        try:
            self.instance = cls(own) if own is not None else cls()
        except Exception as exc:  # noqa: BLE001 - the class's own: the user gets one line
            raise ValueError(
                f"{key}: {self.label} could not be made ({type(exc).__name__}: {exc}); it is "
                "called with its Settings when it declares them, else with nothing"
            ) from None
        self._threads = ThreadPoolExecutor(settings.threads, thread_name_prefix=f"model-{name}")
        self._thread_count = settings.threads
        self._free: asyncio.Semaphore | None = None  # made on the loop that first calls
        self._async_call = inspect.iscoroutinefunction(self.instance.call)
        self._stream = getattr(self.instance, "stream", None)

    def identifying_params(self) -> dict[str, Any]:
        params = getattr(self.instance, "identifying_params", None)
        return dict(params()) if callable(params) else {}

    async def complete(self, request: ProviderRequest, timeout_s: float) -> ProviderOk:
        if self._async_call:
            result = await self.instance.call(request)
        else:  # off the event loop; past its deadline the answer is dropped, the thread ends
            result = await self._in_thread(self.instance.call, request)
        answer = self._ok(result)
        size = delta_bytes(answer.content) + sum(
            delta_bytes(ToolCallDelta(0, c.id, c.name, c.arguments))
            for c in answer.tool_calls or ()
        )
        if size > self._max_bytes:
            raise self._too_large()
        return answer

    def _too_large(self) -> ProviderError:
        """An answer over max_response_bytes, as an HTTP provider's is refused."""
        return ProviderError(
            "response_too_large",
            f"{self.label} answered over max_response_bytes ({self._max_bytes}); raise "
            f"max_response_bytes in [{self._key}] if such answers are expected",
        )

    async def _in_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` in one of the model's threads. A call waits for a free thread
        here, not in the pool's queue: cancelled there (its deadline passed, the dispatcher
        gave up) it stays queued, request and all, until a thread is free, and with threads
        hung in the model that is never, one call more for every request."""
        if self._free is None:
            self._free = asyncio.Semaphore(self._thread_count)
        await self._free.acquire()
        loop = asyncio.get_running_loop()
        try:
            running = self._threads.submit(_no_stop_iteration, function, *args)
        except BaseException:
            self._free.release()
            raise
        # Free again when the thread is, not when its caller stops waiting.
        running.add_done_callback(partial(_release_on, loop, self._free))
        return await asyncio.wrap_future(running)

    async def stream(
        self, request: ProviderRequest, timeout_s: float
    ) -> AsyncIterator[str | ToolCallDelta | ProviderOk]:
        if self._stream is None:  # one piece: the whole answer
            answer = await self.complete(request, timeout_s)
            if answer.content:
                yield answer.content
            yield msgspec.structs.replace(answer, content="")
            return
        end: Any = None
        left = self._max_bytes
        async for item in self._pieces(request):
            if isinstance(item, Answer):
                end = item
                break
            if not isinstance(item, str):
                raise ProviderError(
                    "server_error",
                    f"{self.label}.stream yielded {type(item).__name__}; expected str pieces "
                    "and, last, an optional Answer",
                )
            left -= delta_bytes(item)
            if left < 0:  # a model that never stops: its pieces are no longer pulled
                raise self._too_large()
            if item:
                yield item
        last = self._ok(end if end is not None else "")
        if last.content:
            yield last.content
        for index, call in enumerate(last.tool_calls or ()):
            yield ToolCallDelta(index, call.id, call.name, call.arguments)
        yield msgspec.structs.replace(last, content="")

    async def _pieces(self, request: ProviderRequest) -> AsyncIterator[Any]:
        assert self._stream is not None
        stream = self._stream
        if inspect.isgeneratorfunction(stream) or inspect.isasyncgenfunction(stream):
            produced = stream(request)  # makes the generator; its body runs on each next
        elif inspect.iscoroutinefunction(stream):
            produced = await stream(request)
        else:  # a plain function may block (an HTTP call) before it returns its iterator
            produced = await self._in_thread(stream, request)
        if inspect.isawaitable(produced):
            produced = await produced
        if hasattr(produced, "__aiter__"):
            async for item in produced:
                yield item
            return
        pieces: Iterator[Any] = iter(produced)
        done = object()
        try:
            while (item := await self._in_thread(next, pieces, done)) is not done:
                yield item
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                try:
                    close()
                except ValueError:  # still running in its thread; it ends there on its own
                    pass

    def _ok(self, result: Any) -> ProviderOk:
        if isinstance(result, str):
            return ProviderOk(result, self.model, finish_reason="stop")
        if isinstance(result, Answer):
            calls = result.tool_calls or None
            finish = result.finish_reason or ("tool_calls" if calls else "stop")
            usage = result.usage or Usage()
            if not isinstance(usage, Usage):  # a dict of its fields, say
                try:
                    usage = msgspec.convert(usage, Usage)
                except msgspec.ValidationError as exc:
                    raise ProviderError(
                        "server_error",
                        f"{self.label} answered usage that is no Usage ({exc}); expected "
                        "workers.plugin.Usage(input_tokens=..., output_tokens=...)",
                    ) from None
            return ProviderOk(
                result.text,
                self.model,
                usage=usage,
                tool_calls=calls,
                finish_reason=finish,
            )
        raise ProviderError(
            "server_error",
            f"{self.label} answered with {type(result).__name__}; expected str or Answer",
        )

    async def aclose(self) -> None:
        close = getattr(self.instance, "close", None)
        try:
            if callable(close):
                result = close()
                if inspect.isawaitable(result):
                    await result
        finally:
            self._threads.shutdown(wait=False, cancel_futures=True)


def _release_on(loop: asyncio.AbstractEventLoop, free: asyncio.Semaphore, _: Any) -> None:
    """A model thread is free again (called in that thread)."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: the worker stopped
        loop.call_soon_threadsafe(free.release)


def _no_stop_iteration(function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` in a thread, a StopIteration it raises turned into a RuntimeError:
    asyncio cannot put a StopIteration into a future, and the call would never end."""
    try:
        return function(*args)
    except StopIteration as exc:
        raise RuntimeError(f"{function.__qualname__} raised StopIteration") from exc
