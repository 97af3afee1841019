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
    close()                                  sync or async, called once when the worker stops;
                                             it stops without it after 5 s
    secrets                                  its credentials (a str or strs, set by __init__
                                             or on the class): replaced by *** in every reply,
                                             audit event and log line

A failure is `raise ModelError(kind, message, retry_after_s=...)` with a kind from
schemas.errors (rate_limit, server_error, timeout, context_length, ...), so the dispatcher
falls back as it does for any provider; any other exception is a `server_error` naming its
type, a BaseException too (SystemExit, KeyboardInterrupt, ...: the worker keeps serving), and
Python's own TimeoutError with them (`timeout` is the runtime's deadline, or a ModelError's).
An Answer of the wrong shape is a `server_error` naming the field at fault. Deadlines,
cancels, trace context, the one-reply rule, size limits and streaming over NATS are the
worker runtime's (workers/runtime.py), not the model's.

A package can register its class under the entry-point group `lifeline.providers`
(`[project.entry-points."lifeline.providers"] mine = "mypackage.models:Mine"`): then
`kind = "mine"` works, without `class` (with it, the config is refused). A kind two packages
register (with different classes) is refused by the config that names it; a built-in kind's
name (`openai`, `python`, ...) stays the built-in kind, with a warning naming the package.

New request fields reach `call` as new attributes of `request`; nothing a model written
today uses goes away.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import difflib
import functools
import importlib
import inspect
import logging
import queue
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from functools import partial
from importlib.metadata import EntryPoint, entry_points
from typing import Annotated, Any, ClassVar, get_args

import msgspec
from msgspec import Meta

from schemas import ProviderOk, ProviderRequest, Usage
from schemas.errors import ProviderError
from schemas.wire import FinishReason, ToolCall, ToolCallDelta, delta_bytes
from workers.scrubbing import scrub
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
CLOSE_TIMEOUT_S = 5.0  # how long a model's close() may take when its worker stops
IDENTIFY_TIMEOUT_S = 2.0  # how long its identifying_params() may take as its worker starts
PYTHON_KIND = "python"
FINISH_REASONS = get_args(FinishReason)

log = logging.getLogger("lifeline.worker")

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
    """The kinds installed packages register under `lifeline.providers`: name -> class path
    (for a kind registered twice, one of them: `entry_point` refuses such a kind)."""
    return {ep.name: ep.value for ep in _entry_points()}


def entry_point(kind: str) -> str:
    """The class path installed packages register `kind` under, "" when none does. Raises
    ValueError naming the packages when two register it with different classes: which one
    serves would depend on the order of sys.path."""
    found = {ep.value: ep for ep in _entry_points() if ep.name == kind}
    if len(found) > 1:
        raise ValueError(
            f"kind {kind!r} is registered by more than one installed package: "
            f"{'; '.join(map(described, found.values()))}; uninstall all but one, or serve "
            'one by kind = "python" and its class'
        )
    return next(iter(found), "")


def registered_as(kind: str) -> list[str]:
    """The entry points registering `kind`, each as `described` says (for a built-in kind's
    name: none should)."""
    return [described(ep) for ep in _entry_points() if ep.name == kind]


def described(ep: EntryPoint) -> str:
    """`name = module:Class (package dist-name 1.0)`, as a message names an entry point."""
    dist = ep.dist
    package = f" (package {dist.name} {dist.version})" if dist is not None else ""
    return f"{ep.name} = {ep.value}{package}"


def _entry_points() -> tuple[EntryPoint, ...]:
    return _entry_points_on(tuple(sys.path))


@functools.lru_cache(maxsize=4)
def _entry_points_on(path: tuple[str, ...]) -> tuple[EntryPoint, ...]:
    """The group's entry points on this sys.path: reading the installed packages' metadata
    takes milliseconds, and a config asks once per provider."""
    return tuple(entry_points(group=ENTRY_POINT_GROUP))


def load(settings: PluginSettings, key: str) -> tuple[type[Any], Any]:
    """The model class `settings` names, and its checked settings (None when it has no
    Settings). Raises ValueError naming the config key at fault (`key` is the provider's
    table, e.g. providers.mine)."""
    where, path = class_path(settings, key)
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
    known = getattr(declared, "__struct_encode_fields__", None)  # a Struct's keys, as written
    if known is not None and not getattr(declared.__struct_config__, "forbid_unknown_fields", 0):
        # msgspec passes over keys a Struct does not name: a typo (`prefx`) would leave the
        # default in place without a word, where every other key of the config is checked.
        for name in settings.settings:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (keys: {', '.join(known)})"
                raise ValueError(f"{key}.settings.{name}: unknown key{hint}")
    try:
        return cls, msgspec.convert(settings.settings, declared)
    except msgspec.ValidationError as exc:
        raise ValueError(_located(f"{key}.settings", exc)) from None
    except TypeError as exc:  # `Settings` is no type msgspec knows (a msgspec.Struct is one)
        raise ValueError(
            f"{where}: {path}.Settings cannot hold the settings ({exc}); make it a msgspec.Struct"
        ) from None


def class_path(settings: PluginSettings, key: str) -> tuple[str, str]:
    """The config key naming the model class, and its "package.module:ClassName": `class`
    for kind "python", else the installed package's entry point. Raises ValueError naming
    the key at fault."""
    if settings.kind == PYTHON_KIND:
        where, path = f"{key}.class", settings.class_
        if not path:
            raise ValueError(f'{where}: required for kind "python" ("package.module:ClassName")')
        return where, path
    where = f"{key}.kind"
    try:
        path = entry_point(settings.kind)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if not path:
        raise ValueError(f"{where}: no installed package provides kind {settings.kind!r}")
    if settings.class_:
        raise ValueError(f"{key}.class: {class_ignored(settings.kind, settings.class_, path)}")
    return where, path


def class_ignored(kind: str, class_: str, path: str) -> str:
    """Why `class` cannot go with an installed plug-in's kind."""
    return (
        f"kind {kind!r} is an installed plug-in's, whose entry point names its class "
        f'({path}); remove `class`, or serve {class_} with kind = "python"'
    )


def _import(path: str, where: str) -> type[Any]:
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f'{where}: expected "package.module:ClassName", got {path!r}')
    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:  # noqa: BLE001 - whatever it raises (SystemExit...): one line
        raise ValueError(f"{where}: cannot import {module_name!r} ({_shown(exc)})") from None
    found: Any = module
    for part in attr.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise ValueError(f"{where}: module {module_name!r} has no {attr!r}")
    if not isinstance(found, type):
        raise ValueError(f"{where}: {path} is not a class")  # noqa: TRY004
    return found


def _shown(exc: BaseException) -> str:
    """ "SystemExit: 7", or "KeyboardInterrupt" when it says nothing more."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _secrets_before_made(cls: type, exc: BaseException) -> tuple[str, ...]:
    """The `secrets` known when making the class failed, as strs: the class's own, and those
    its __init__ set on the instance before it raised (that instance is `self` in the
    traceback's frame of it, the only place left holding it). Read without running a property:
    a wrong one is said once the class is made."""
    holders: list[object] = [cls]
    frame = exc.__traceback__
    while frame is not None:
        made = frame.tb_frame.f_locals.get("self")
        if isinstance(made, cls) and all(made is not held for held in holders):
            holders.append(made)
        frame = frame.tb_next
    found: list[str] = []
    for holder in holders:
        secrets = inspect.getattr_static(holder, "secrets", None)
        if isinstance(secrets, str):
            found.append(secrets)
        elif isinstance(secrets, (list, tuple, set, frozenset)):
            found += [secret for secret in secrets if isinstance(secret, str)]
    return tuple(found)


def _declared_secrets(instance: object, what: str) -> tuple[str, ...]:
    """A model's `secrets` attribute (a str, or an iterable of strs) as a tuple."""
    try:
        found = getattr(instance, "secrets", None)
        if found is None:
            return ()
        if isinstance(found, str):
            found = (found,)
        try:
            secrets = tuple(found)
        except TypeError:
            secrets = (found,)
    # A property (or an iterable) of the class's own that fails as it is read (a key looked up
    # in os.environ): one line naming it, as for __init__, not a traceback.
    except BaseException as exc:  # noqa: BLE001
        raise ValueError(f"{what} could not be read ({_shown(exc)})") from None
    for secret in secrets:
        if not isinstance(secret, str):
            # A ValueError, as every start-up error of a model class: one line, exit 2.
            kind = type(secret).__name__
            raise ValueError(f"{what} must be a str or strs, not {kind}")  # noqa: TRY004
    return tuple(secret for secret in secrets if secret)


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
        self.label = class_path(settings, key)[1]  # the class served, as the config names it
        self._key = key
        self._max_bytes = settings.max_response_bytes  # an answer's text and tool calls, at most
        try:
            self.instance = cls(own) if own is not None else cls()
        # The class's own, SystemExit and KeyboardInterrupt too (a Ctrl-C while it loads stops
        # the worker as well, with this line): the user gets one line, the worker exits 2.
        except BaseException as exc:  # noqa: BLE001
            # Without the secrets it declares, on the class or set by __init__ before it
            # raised: its error may be an upstream's quoting what it called (a URL with
            # ?key=...), and this line is printed, by check-config too, where no log line's
            # scrubbing reaches.
            shown = scrub(_shown(exc), _secrets_before_made(cls, exc))
            raise ValueError(
                f"{key}: {self.label} could not be made ({shown}); it is "
                "called with its Settings when it declares them, else with nothing"
            ) from None
        # Its credentials, as the built-in kinds declare theirs: scrubbed from every reply and
        # log line, where an upstream error (a URL with ?key=...) would otherwise show them.
        self.secrets = _declared_secrets(self.instance, f"{key}: {self.label}.secrets")
        self._threads = _ModelThreads(settings.threads, f"model-{name}")
        self._thread_count = settings.threads
        self._free = _FreeThreads(settings.threads)
        self._abandoned = 0  # threads still running a call whose caller stopped waiting
        self._async_call = inspect.iscoroutinefunction(self.instance.call)
        self._stream = getattr(self.instance, "stream", None)
        self._closing: set[asyncio.Task[None]] = set()  # sync streams closing (_close_later)
        self._free_closers: asyncio.Semaphore | None = None  # made on the loop that first closes

    def identifying_params(self) -> dict[str, Any]:
        """The class's own, only logged: one that fails says so instead of stopping the worker,
        and one that does not return within IDENTIFY_TIMEOUT_S (a lazy load stuck on a peer)
        is left to run in a daemon thread of its own: called as the worker started, it kept the
        worker from serving, and from stopping on SIGTERM, for as long as it hung."""
        params = getattr(self.instance, "identifying_params", None)
        if not callable(params):
            return {}
        done: Future[dict[str, Any]] = Future()
        threading.Thread(
            target=_run, args=(done, _identified, (params,)), name="model-params", daemon=True
        ).start()
        try:
            return done.result(timeout=IDENTIFY_TIMEOUT_S)
        except TimeoutError:
            log.warning(
                "%s: %s.identifying_params() did not return within %g s; the worker serves "
                "without it",
                self._key,
                self.label,
                IDENTIFY_TIMEOUT_S,
            )
            return {
                "identifying_params() failed": f"did not return within {IDENTIFY_TIMEOUT_S:g} s"
            }

    async def complete(self, request: ProviderRequest, timeout_s: float) -> ProviderOk:
        if self._async_call:
            result = await self.instance.call(request)
        else:  # off the event loop; past its deadline the answer is dropped, the thread ends
            result = await self._in_thread(self.instance.call, request)
        answer = self._ok(result)
        if self._size(answer) > self._max_bytes:
            raise self._too_large()
        return answer

    def _size(self, answer: ProviderOk) -> int:
        """What an answer's text and tool calls count against max_response_bytes; a text
        that is not UTF-8 (a lone surrogate) is a server_error naming where it is."""
        try:
            text = len(answer.content.encode()) if answer.content else 0
            return text + sum(
                delta_bytes(ToolCallDelta(0, c.id, c.name, c.arguments))
                for c in answer.tool_calls or ()
            )
        except UnicodeEncodeError as exc:
            raise self._not_utf8(_surrogate_field(answer), exc) from None

    def _not_utf8(self, field: str, exc: UnicodeEncodeError) -> ProviderError:
        bad = exc.object[exc.start : exc.end]
        return ProviderError(
            "server_error",
            f"{self.label} answered {field} that is not UTF-8 ({bad!r} at index {exc.start}, a "
            'lone surrogate): text must encode as UTF-8 (bytes decoded with errors="replace", '
            'not "surrogateescape")',
        )

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
        if self._free.locked() and self._abandoned >= self._thread_count:
            # Waiting for a thread, it would get none before its deadline, answered as a
            # `timeout` of the model that it never called, and nothing said why.
            raise self._threads_held()
        await self._free.acquire()  # refused as above if the last free thread gets held
        loop = asyncio.get_running_loop()
        try:
            # With the caller's contextvars, the call's span among them: the trace context the
            # model's own HTTP calls send on, as an async model's do.
            context = contextvars.copy_context()
            running = self._threads.submit(
                context.run, _in_model_thread, self.label, function, *args
            )
        except BaseException:
            self._free.release()
            raise
        # Free again when the thread is, not when its caller stops waiting.
        running.add_done_callback(partial(_release_on, loop, self._free))
        try:
            return await asyncio.wrap_future(running)
        except asyncio.CancelledError:
            if not running.done():  # its caller gave up; Python cannot stop the thread
                self._abandoned += 1
                running.add_done_callback(partial(_call_on, loop, self._thread_returned))
                if self._abandoned == self._thread_count:  # the last one: none left to wait for
                    log.warning(
                        "%s: each of its %d threads is held by a call still running after its "
                        "caller gave up on it; calls are refused until one returns",
                        self._key,
                        self._thread_count,
                    )
                    self._free.refuse_waiting(self._threads_held)
            raise

    def _thread_returned(self) -> None:
        self._abandoned -= 1

    def _threads_held(self) -> ProviderError:
        """Every thread held by a call given up on that still runs (hung in the model):
        refused at once, as a worker at its max_in_flight refuses, naming the limit."""
        return ProviderError(
            "rate_limit",
            f"{self.label}: each of its {self._thread_count} threads is held by a call still "
            "running after its caller gave up on it (its deadline, a cancel: Python cannot stop "
            "a thread), so none is free; make call async for its deadline to stop it, or raise "
            f"threads in [{self._key}]",
        )

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
        # Closed as the stream ends (an Answer, a piece refused), not when it is collected.
        async with contextlib.aclosing(self._pieces(request)) as pieces:
            async for item in pieces:
                if isinstance(item, Answer):
                    end = item
                    break
                if not isinstance(item, str):
                    raise ProviderError(
                        "server_error",
                        f"{self.label}.stream yielded {type(item).__name__}; expected str pieces "
                        "and, last, an optional Answer",
                    )
                try:
                    left -= delta_bytes(item)
                except UnicodeEncodeError as exc:
                    raise self._not_utf8("a stream piece", exc) from None
                if left < 0:  # a model that never stops: its pieces are no longer pulled
                    raise self._too_large()
                if item:
                    yield item
        last = self._ok(end if end is not None else "")
        if self._size(last) > left:
            raise self._too_large()
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
            self._close_later(pieces)

    def _close_later(self, pieces: Iterator[Any]) -> None:
        """A sync stream left before its end (an Answer, a piece refused, a cancel) closed off
        the event loop, and not waited for. Closing a generator runs its `finally` and `with`
        exits (a response closed, an upstream told to stop), which may block: on the event
        loop they held every other call of the worker."""
        if not callable(getattr(pieces, "close", None)):
            return
        if inspect.isgenerator(pieces) and inspect.getgeneratorstate(pieces) != "GEN_SUSPENDED":
            # Never started or done: nothing of the model's would run. Running (a piece its
            # call stopped waiting for): it is closed in that thread as the thread lets it go.
            return
        task = asyncio.get_running_loop().create_task(self._closed(pieces))
        self._closing.add(task)  # a task only weakly held by the loop may be collected
        task.add_done_callback(self._closing.discard)

    async def _closed(self, pieces: Iterator[Any]) -> None:
        """`pieces.close()` in a thread of its own, not one of the model's: those may all be
        held by calls waiting for what the generator holds (a lock taken across its pieces),
        which its close lets go. At most `threads` such closes run at once; past that (closes
        that hang), one waits for a model's thread."""
        close = partial(_in_model_thread, self.label, pieces.close)  # type: ignore[attr-defined]
        if self._free_closers is None:
            self._free_closers = asyncio.Semaphore(self._thread_count)
        try:
            if self._free_closers.locked():
                await self._in_thread(pieces.close)  # type: ignore[attr-defined]
                return
            await self._free_closers.acquire()  # at once: it is not locked
            done: Future[Any] = Future()
            # Free again when the thread is (see _in_thread).
            done.add_done_callback(
                partial(_release_on, asyncio.get_running_loop(), self._free_closers)
            )
            threading.Thread(
                target=_run, args=(done, close, ()), name="model-stream-close", daemon=True
            ).start()
            await asyncio.wrap_future(done)
        except Exception as exc:  # noqa: BLE001 - its own failure, or the worker stopped
            log.warning("%s: closing %s.stream failed (%s)", self._key, self.label, _shown(exc))

    def _ok(self, result: Any) -> ProviderOk:
        if isinstance(result, str):
            return ProviderOk(_plain(result), self.model, finish_reason="stop")
        if isinstance(result, Answer):
            problem = _answer_problem(result)
            if problem is not None:  # msgspec does not check a Struct made in code
                raise ProviderError(
                    "server_error", f"{self.label} answered an Answer whose {problem}"
                )
            calls = [_plain_call(c) for c in result.tool_calls] if result.tool_calls else None
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
                _plain(result.text),
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
        """The class's close(), whose failure is logged: the worker stops all the same."""
        close = getattr(self.instance, "close", None)
        bound = asyncio.timeout(CLOSE_TIMEOUT_S)
        try:
            if callable(close):
                # Bounded, a sync one in a (daemon) thread of its own: a close() that hangs (a
                # stuck thread joined, a pool closed on a dead peer) kept the worker from
                # exiting on SIGTERM.
                async with bound:
                    if inspect.iscoroutinefunction(close):
                        result = close()
                    else:
                        done: Future[Any] = Future()
                        threading.Thread(
                            target=_run, args=(done, close, ()), name="model-close", daemon=True
                        ).start()
                        result = await asyncio.wrap_future(done)
                    if inspect.isawaitable(result):
                        await result
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - the class's own, SystemExit too
            if isinstance(exc, TimeoutError) and bound.expired():
                log.error(
                    "%s: %s.close() did not return within %g s; the worker stops without it",
                    self._key,
                    self.label,
                    CLOSE_TIMEOUT_S,
                )
            else:
                log.error("%s: %s.close() failed (%s)", self._key, self.label, _shown(exc))
        finally:
            self._threads.shutdown()


def _identified(params: Callable[[], Any]) -> dict[str, Any]:
    """A model's identifying_params() as a dict whose repr can be shown, or what failed."""
    try:
        found = dict(params())
        # Shown once logged, which raised out of the worker's start-up: a value whose repr
        # fails (an object half made) fails here, said as any other failure of it is.
        repr(found)
    except BaseException as exc:  # noqa: BLE001 - the class's own, SystemExit too
        return {"identifying_params() failed": _shown(exc)}
    return found


def _release_on(
    loop: asyncio.AbstractEventLoop, free: asyncio.Semaphore | _FreeThreads, _: Any
) -> None:
    """A model thread is free again (called in that thread)."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: the worker stopped
        loop.call_soon_threadsafe(free.release)


def _call_on(loop: asyncio.AbstractEventLoop, function: Callable[[], None], _: Any) -> None:
    """`function()` on `loop` (called in a model's thread)."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: the worker stopped
        loop.call_soon_threadsafe(function)


def _in_model_thread(label: str, function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` in a model's thread, with what asyncio cannot carry made into what it
    can: a StopIteration in a future would never end the call; a SystemExit or a
    KeyboardInterrupt would be raised again out of the event loop, stopping the worker. Raised
    here they are the model's (signals reach the main thread only), so each, and any other
    BaseException that is no Exception, is a server_error naming it."""
    try:
        return function(*args)
    except StopIteration as exc:
        raise RuntimeError(f"{function.__qualname__} raised StopIteration") from exc
    except Exception:
        raise
    except BaseException as exc:
        log.error("model %s raised %s", label, type(exc).__name__, exc_info=exc)
        raise ProviderError("server_error", f"{label} raised {type(exc).__name__}") from None


def _plain(text: str) -> str:
    """`text` as a str itself: msgspec writes no subclass of str (a library's Markup, numpy's
    str_), and the reply failed as one that "cannot be encoded as JSON"."""
    return text if type(text) is str else str.__str__(text)


def _plain_call(call: ToolCall) -> ToolCall:
    """A tool call whose id, name and arguments are each a str itself (see `_plain`)."""
    if type(call.id) is str and type(call.name) is str and type(call.arguments) is str:
        return call
    return ToolCall(_plain(call.id), _plain(call.name), _plain(call.arguments))


def _answer_problem(answer: Answer) -> str | None:
    """What is wrong with an Answer's fields, as "<field> must be ..., not ...", or None."""
    if not isinstance(answer.text, str):
        return f"text must be a str, not {type(answer.text).__name__}"
    calls = answer.tool_calls
    if calls is not None:
        if not isinstance(calls, list | tuple):
            return f"tool_calls must be a list of ToolCall, not {type(calls).__name__}"
        for i, call in enumerate(calls):
            if not isinstance(call, ToolCall):
                return (
                    f"tool_calls[{i}] must be a workers.plugin.ToolCall(id, name, arguments), "
                    f"not {type(call).__name__}"
                )
            for field in ("id", "name", "arguments"):
                value = getattr(call, field)
                if not isinstance(value, str):
                    return f"tool_calls[{i}].{field} must be a str, not {type(value).__name__}"
    if answer.finish_reason is not None and answer.finish_reason not in FINISH_REASONS:
        return f"finish_reason must be one of {', '.join(FINISH_REASONS)}, not {answer.finish_reason!r}"
    usage = answer.usage
    if isinstance(usage, Usage):
        for field in usage.__struct_fields__:
            value = getattr(usage, field)
            if type(value) is not int:
                return f"usage.{field} must be an int, not {type(value).__name__}"
            if not 0 <= value <= 2**53 - 1:  # what the dispatcher decodes
                return f"usage.{field} must be an int from 0 to 2**53 - 1, not {value}"
    return None


def _surrogate_field(answer: ProviderOk) -> str:
    """Which of an answer's texts does not encode as UTF-8."""
    for i, call in enumerate(answer.tool_calls or ()):
        for field in ("id", "name", "arguments"):
            try:
                getattr(call, field).encode()
            except UnicodeEncodeError:
                return f"tool_calls[{i}].{field}"
    return "text"


class _FreeThreads:
    """How many of a model's threads are free, and the calls waiting for one, first come first
    served: an asyncio.Semaphore that can also refuse every call waiting (`refuse_waiting`),
    for when each thread is held by a call given up on and none will be free in time."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    def locked(self) -> bool:
        return self._free == 0

    async def acquire(self) -> None:
        if self._free > 0:  # none waits then: `release` hands a thread to a waiting call first
            self._free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()  # given a thread as it was cancelled: the next call's
            raise
        finally:
            with contextlib.suppress(ValueError):  # handed its thread, or refused, already
                self._waiting.remove(waiter)

    def release(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    def refuse_waiting(self, error: Callable[[], BaseException]) -> None:
        """Every call waiting for a thread raises `error()`."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(error())


_Call = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]


def _run(future: Future[Any], function: Callable[..., Any], args: tuple[Any, ...]) -> None:
    if future.set_running_or_notify_cancel():  # not cancelled while it waited in the queue
        try:
            result = function(*args)
        except BaseException as exc:  # noqa: BLE001 - the caller's to see
            future.set_exception(exc)
        else:
            future.set_result(result)


class _ModelThreads:
    """A synchronous model's threads: up to `size`, started as calls need them, taking calls
    from one queue. Daemon threads, unlike a ThreadPoolExecutor's, which Python joins as it
    exits (concurrent.futures' exit hook): a call stuck in the model (a hung library call, a
    stream that never ends) would keep a stopped worker from exiting past its shutdown grace,
    for as long as the call hangs. A daemon thread is left where it hangs when the process
    ends; its call has been answered (no_responders) by then."""

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()  # None: a thread ends
        self._idle = threading.Semaphore(0)  # one count per thread waiting for a call
        self._threads: list[threading.Thread] = []
        self._shut = False

    def submit(self, function: Callable[..., Any], *args: Any) -> Future[Any]:
        if self._shut:
            raise RuntimeError("the model's threads are shut down")
        future: Future[Any] = Future()
        self._calls.put((future, function, args))
        if not self._idle.acquire(blocking=False) and len(self._threads) < self._size:
            thread = threading.Thread(
                target=self._serve, name=f"{self._name}_{len(self._threads)}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return future

    def queued(self) -> int:
        return self._calls.qsize()

    def _serve(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            _run(*call)
            del call  # nothing of a finished call is kept while the thread waits
            self._idle.release()

    def shutdown(self) -> None:
        """No more calls: the queued ones are cancelled, each thread ends when its call does."""
        self._shut = True
        with contextlib.suppress(queue.Empty):
            while True:
                call = self._calls.get_nowait()
                if call is not None:
                    call[0].cancel()
        for _ in self._threads:
            self._calls.put(None)
