"""Model classes the plug-in tests name by import path (tests.plugin_models:...)."""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec

from workers.plugin import Answer, Model, ModelError, ProviderRequest, ToolCall, Usage

CALLED_IN: list[str] = []  # the thread each synchronous call ran in


class SyncUpper(Model):
    def call(self, request: ProviderRequest) -> str:
        CALLED_IN.append(threading.current_thread().name)
        return request.messages[-1].text.upper()


class AsyncStreaming(Model):
    """Async call and async stream; the stream ends with an Answer carrying usage."""

    async def call(self, request: ProviderRequest) -> Answer:
        return Answer(text="one two three", usage=Usage(3, 3))

    async def stream(self, request: ProviderRequest) -> AsyncIterator[str | Answer]:
        for word in ("one", " two", " three"):
            await asyncio.sleep(0)
            yield word
        yield Answer(usage=Usage(3, 3), finish_reason="stop")


class Failing(Model):
    """`rate_limit` when asked to, any other exception otherwise."""

    def call(self, request: ProviderRequest) -> str:
        if request.messages[-1].text == "rate limit":
            raise ModelError("rate_limit", "too many requests", retry_after_s=2)
        raise ZeroDivisionError("the model's own bug")


class ToolCaller(Model):
    def call(self, request: ProviderRequest) -> Answer:
        assert request.tools is not None
        return Answer(tool_calls=[ToolCall("call-1", request.tools[0].name, '{"city": "Paris"}')])


class WithSettings(Model):
    class Settings(msgspec.Struct, forbid_unknown_fields=True):
        temperature: float
        greeting: str = "hi"

    def call(self, request: ProviderRequest) -> str:
        return f"{self.settings.greeting} at {self.settings.temperature}"


# ---- models that misbehave: each still gets its one reply, at once ---------------------------


class StopsIterating(Model):
    """A sync call whose StopIteration (a next() on an empty generator) asyncio cannot carry."""

    def call(self, request: ProviderRequest) -> str:
        return next(m.text for m in request.messages if m.role == "system")


class SurrogateText(Model):
    """Text decoded with surrogateescape from a tokenizer's bytes: no JSON can carry it."""

    def call(self, request: ProviderRequest) -> Answer:
        return Answer(text=b"caf\xe9".decode("utf-8", "surrogateescape"))


class UnknownUsage(Model):
    """Token counts of a type msgspec does not know (numpy's, say)."""

    def call(self, request: ProviderRequest) -> Answer:
        return Answer(text="hi", usage=Usage(input_tokens=object()))  # type: ignore[arg-type]


class OwnCancelledError(Model):
    """An async call whose own inner task is cancelled and awaited (a library's time limit):
    the CancelledError is the model's failure, not a cancel of the call."""

    async def call(self, request: ProviderRequest) -> str:
        inner = asyncio.ensure_future(asyncio.sleep(10))
        await asyncio.sleep(0)
        inner.cancel()
        await inner
        return "unreachable"


class UsageAsDict(Model):
    def call(self, request: ProviderRequest) -> Answer:
        return Answer(text="hi", usage={"input_tokens": 3, "output_tokens": 1})  # type: ignore[arg-type]


class BlockingStream(Model):
    """A sync `stream` that is a plain function doing blocking work (an HTTP call, say)
    before it returns its iterator."""

    def call(self, request: ProviderRequest) -> str:
        return "x"

    def stream(self, request: ProviderRequest) -> Iterator[str]:
        time.sleep(3)
        return iter(["a", "b"])


STREAMED: list[int] = []  # the pieces EndlessStream yielded, per stream


class EndlessStream(Model):
    """A stream that never ends (a model generating without a stop): the runtime stops it."""

    def call(self, request: ProviderRequest) -> str:
        return "x"

    async def stream(self, request: ProviderRequest) -> AsyncIterator[str]:
        STREAMED.append(0)
        while True:
            STREAMED[-1] += 1
            await asyncio.sleep(0)
            yield "y" * 1000


HANG = threading.Event()  # set to let HangsInItsThread's calls end


class HangsInItsThread(Model):
    """A sync call that hangs (a stuck library call): its threads stay busy."""

    def call(self, request: ProviderRequest) -> str:
        HANG.wait(30)
        return "late"


NOT_A_CLASS = 42


class NoCall:
    pass


class InitRaises(Model):
    """A class whose making fails (a model file missing, say)."""

    def __init__(self) -> None:
        raise RuntimeError("weights not found")

    def call(self, request: ProviderRequest) -> str:
        return "never"


class KeyOnTheClassInitRaises(Model):
    """Its key declared on the class, as the README allows; its making fails with an upstream's
    error that quotes the URL it called, the key in its query."""

    secrets = "plugin-KEY-on-the-class-31337"

    def __init__(self) -> None:
        raise RuntimeError(f"401 Unauthorized for https://upstream.test/models?key={self.secrets}")

    def call(self, request: ProviderRequest) -> str:
        return "never"


class KeyInInitRaises(Model):
    """Its key set on the instance by __init__, as the README allows, before an upstream's
    error quoting it stops the making."""

    def __init__(self) -> None:
        self.secrets = ["plugin-KEY-set-in-init-4242"]
        raise RuntimeError(
            f"401 Unauthorized for https://upstream.test/models?key={self.secrets[0]}"
        )

    def call(self, request: ProviderRequest) -> str:
        return "never"


class OddSettings(Model):
    """`Settings` that is no type msgspec can fill."""

    Settings = 5

    def call(self, request: ProviderRequest) -> str:
        return "never"


# ---- models that break the rules in ways the runtime must survive ---------------------------


class OddModelErrors(Model):
    """ModelError given a message that is no text, chosen by the request's text."""

    def call(self, request: ProviderRequest) -> str:
        text = request.messages[-1].text
        if text == "exception":
            raise ModelError("connection", ConnectionError("upstream refused"))  # type: ignore[arg-type]
        if text == "number":
            raise ModelError("rate_limit", 12345)  # type: ignore[arg-type]
        raise ModelError("server_error", None)  # type: ignore[arg-type]


class PlainKind(enum.Enum):  # a plain Enum, no str: its members are no kinds
    RATE_LIMIT = "rate_limit"


class Unshowable:
    def __repr__(self) -> str:
        raise SystemExit(3)


class KindsNotStr(Model):
    """ModelError given a kind that is no str, chosen by the request's text."""

    def call(self, request: ProviderRequest) -> str:
        kinds = {"int": 429, "enum": PlainKind.RATE_LIMIT, "none": None, "odd": Unshowable()}
        raise ModelError(kinds[request.messages[-1].text], "busy")  # type: ignore[arg-type]


class KindsUnknown(Model):
    """ModelError given a str kind that is no error kind (a typo: "ratelimit"), the request's text."""

    def call(self, request: ProviderRequest) -> str:
        raise ModelError(request.messages[-1].text, "busy")  # type: ignore[arg-type]


class OwnTimeoutError(Model):
    """Python's TimeoutError from the model's own upstream call, long before any deadline."""

    async def call(self, request: ProviderRequest) -> str:
        raise TimeoutError("the upstream took too long")


class WrongAnswers(Model):
    """An Answer of the wrong shape, chosen by the request's text (msgspec checks a Struct when
    it decodes one, not when code makes one)."""

    def call(self, request: ProviderRequest) -> Answer:
        wrong = {
            "text": lambda: Answer(text=123),  # type: ignore[arg-type]
            "tool_calls": lambda: Answer(tool_calls=["nope"]),  # type: ignore[list-item]
            "arguments": lambda: Answer(tool_calls=[ToolCall("c1", "f", {"a": 1})]),  # type: ignore[arg-type]
            "finish_reason": lambda: Answer(text="a", finish_reason="banana"),  # type: ignore[arg-type]
            "surrogate": lambda: Answer(text="caf\udce9"),
            "surrogate_arguments": lambda: Answer(tool_calls=[ToolCall("c1", "f", '"\udce9"')]),
        }
        return wrong[request.messages[-1].text]()


class OwnBaseException(BaseException):
    pass


def _raise_named(name: str) -> None:
    if name == "SystemExit":
        raise SystemExit(3)
    if name == "KeyboardInterrupt":
        raise KeyboardInterrupt
    if name == "GeneratorExit":
        raise GeneratorExit
    if name == "OwnBaseException":
        raise OwnBaseException("a class of its own")


class RaisesBaseExceptions(Model):
    """SystemExit, KeyboardInterrupt, GeneratorExit or a BaseException of its own, named by the
    request's text: from its sync call (in a model thread) and from its async stream (on the
    worker's event loop)."""

    def call(self, request: ProviderRequest) -> str:
        _raise_named(request.messages[-1].text)
        return "still serving"

    async def stream(self, request: ProviderRequest) -> AsyncIterator[str]:
        yield "a"
        _raise_named(request.messages[-1].text)
        yield "b"


class ExitsWhileLoading(Model):
    def __init__(self) -> None:
        raise SystemExit(7)

    def call(self, request: ProviderRequest) -> str:
        return "never"


class InterruptedWhileLoading(Model):
    def __init__(self) -> None:
        raise KeyboardInterrupt

    def call(self, request: ProviderRequest) -> str:
        return "never"


class HotStream(Model):
    """An async stream that never awaits: its pieces come at once, without end."""

    def call(self, request: ProviderRequest) -> str:
        return "pong"

    async def stream(self, request: ProviderRequest) -> AsyncIterator[str]:
        while True:
            yield "."


class ExitsWhenAsked(Model):
    """identifying_params() and close() that raise SystemExit: the worker logs them and goes
    on (starting) or stops all the same (stopping)."""

    def call(self, request: ProviderRequest) -> str:
        return "ok"

    def identifying_params(self) -> dict[str, object]:
        raise SystemExit(4)

    def close(self) -> None:
        raise SystemExit(5)


# The numbers 0, 1, 2, ... written one after the other, 200,000 characters: a piece out of
# place shows.
TINY_TEXT = "".join(map(str, range(50_000)))[:200_000]


class TinyPieces(Model):
    """An async stream of TINY_TEXT, a character a piece, that never awaits (a tokenizer's loop
    run on the event loop, say): every piece comes at once."""

    def call(self, request: ProviderRequest) -> str:
        return "pong"

    async def stream(self, request: ProviderRequest) -> AsyncIterator[str | Answer]:
        for character in TINY_TEXT:
            yield character
        yield Answer(usage=Usage(1, len(TINY_TEXT)), finish_reason="stop")


class SwallowsCancel(Model):
    """A call that catches its own cancel and answers anyway (a library catching
    BaseException, a retry loop), as a stream that goes on yielding."""

    async def call(self, request: ProviderRequest) -> str:
        try:
            await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            await asyncio.sleep(0.2)
        return "a late answer"

    async def stream(self, request: ProviderRequest) -> AsyncIterator[str]:
        for n in range(8):
            try:
                await asyncio.sleep(0.1)
            except asyncio.CancelledError:
                pass
            yield f"piece{n} "


class LenientSettings(Model):
    """Settings as the README's example writes them: a Struct that does not forbid unknown keys."""

    class Settings(msgspec.Struct):
        prefix: str = ""

    def call(self, request: ProviderRequest) -> str:
        return self.settings.prefix + "hi"


class LooseModelErrors(Model):
    """ModelError and Answer fields of a loose type or out of range, chosen by the request's
    text: a Retry-After passed on as the str it was read as, a status code as a float."""

    def call(self, request: ProviderRequest) -> Answer:
        text = request.messages[-1].text
        loose = {
            "retry_str": lambda: ModelError("rate_limit", "busy", retry_after_s="2"),  # type: ignore[arg-type]
            "status_str": lambda: ModelError("rate_limit", "busy", status_code="429"),  # type: ignore[arg-type]
            "status_float": lambda: ModelError("rate_limit", "busy", status_code=429.0),  # type: ignore[arg-type]
            "status_bool": lambda: ModelError("rate_limit", "busy", status_code=True),
            "kind_int": lambda: ModelError(429, "busy"),  # type: ignore[arg-type]
            "huge": lambda: ModelError("rate_limit", "x" * 2_000_000, retry_after_s=2),
            "retry_years": lambda: ModelError("rate_limit", "busy", retry_after_s=1e306),
        }
        if text == "usage":
            return Answer(text="hi", usage=Usage(input_tokens=-1, output_tokens=3))
        raise loose[text]()


PLUGIN_KEY = "plugin-key-3f9a1c77e2"


class KeyedApi(Model):
    """A model calling an API whose key goes in the URL (as Google's do), so its upstream's
    errors name the key; it declares the key as its `secrets`."""

    def __init__(self, settings: object = None) -> None:
        super().__init__(settings)
        self.secrets = PLUGIN_KEY

    def call(self, request: ProviderRequest) -> str:
        url = f"https://api.example/v1/generate?key={PLUGIN_KEY}"
        if request.messages[-1].text == "modelerror":
            raise ModelError("auth", f"401 Unauthorized for url {url}")
        raise RuntimeError(f"connection reset for url {url}")


CLOSE_HANGS = threading.Event()  # set: the close() below return


class SyncCloseHangs(Model):
    """A close() that hangs until CLOSE_HANGS is set (joining a stuck thread, say)."""

    def call(self, request: ProviderRequest) -> str:
        return "ok"

    def close(self) -> None:
        CLOSE_HANGS.wait()


class AsyncCloseHangs(Model):
    """An async close() that hangs until CLOSE_HANGS is set (a pool closed on a dead peer)."""

    async def call(self, request: ProviderRequest) -> str:
        return "ok"

    async def close(self) -> None:
        while not CLOSE_HANGS.is_set():
            await asyncio.sleep(0.05)


def _traceparent() -> str:
    """The traceparent header this model's own HTTP call would send upstream."""
    from opentelemetry.propagate import inject

    headers: dict[str, str] = {}
    inject(headers)
    return headers.get("traceparent", "(none)")


class SendsTraceparent(Model):
    """A sync call and a sync stream answering the traceparent they would send upstream."""

    def call(self, request: ProviderRequest) -> str:
        return _traceparent()

    def stream(self, request: ProviderRequest) -> Iterator[str]:
        yield _traceparent()


class SlowToCloseStream(Model):
    """A sync stream whose cleanup blocks (its upstream told to stop, a response closed): it
    ends with an Answer, or with a piece the runtime refuses, before its generator does."""

    def call(self, request: ProviderRequest) -> str:
        return "pong"

    def stream(self, request: ProviderRequest) -> Iterator[Any]:
        try:
            yield "a"
            if request.messages[-1].text == "refused":
                yield 42  # no str: the stream fails here
            yield Answer(text="b")
        finally:
            time.sleep(1.5)


LOCK = threading.Lock()  # LockedStream's: one generation at a time, as a local model's


class LockedStream(Model):
    """A sync stream holding its model's lock across its pieces, and a call taking it."""

    def call(self, request: ProviderRequest) -> str:
        with LOCK:
            return "called"

    def stream(self, request: ProviderRequest) -> Iterator[str]:
        with LOCK:
            yield "a"
            yield "b"


class Kind(enum.StrEnum):  # a model's own names for the error kinds
    RATE_LIMIT = "rate_limit"


class Markup(str):  # a library's str subclass (markupsafe.Markup, numpy.str_)
    pass


class StrSubclasses(Model):
    """Texts and an error kind given as subclasses of str: each is a str."""

    def call(self, request: ProviderRequest) -> str | Answer:
        text = request.messages[-1].text
        if text == "kind":
            raise ModelError(Kind.RATE_LIMIT, "busy", retry_after_s=1)
        if text == "answer":
            call = ToolCall(Markup("call-1"), Markup("get_weather"), Markup('{"city": "Paris"}'))
            return Answer(text=Markup("sunny"), tool_calls=[call])
        return Markup(text.upper())


class SecretsFromEnv(Model):
    """`secrets` as a property that fails as it is read (its key not in the environment)."""

    def call(self, request: ProviderRequest) -> str:
        return "ok"

    @property
    def secrets(self) -> str:
        raise KeyError("MINE_API_KEY")


class HalfMade:
    def __repr__(self) -> str:
        raise AttributeError("'HalfMade' object has no attribute 'path'")


class ParamsNotShown(Model):
    """identifying_params() answering a value whose repr fails."""

    def call(self, request: ProviderRequest) -> str:
        return "still serving"

    def identifying_params(self) -> dict[str, object]:
        return {"weights": HalfMade()}


class ParamsHang(Model):
    """identifying_params() that never returns (a lazy load waiting on a dead peer)."""

    def call(self, request: ProviderRequest) -> str:
        return "still serving"

    def identifying_params(self) -> dict[str, object]:
        threading.Event().wait()
        return {}


class KeyInSettingsInitRaises(Model):
    """Its key written in the config's settings and not declared in `secrets`: an upstream's
    error quoting it stops the making."""

    class Settings(msgspec.Struct, forbid_unknown_fields=True):
        api_key: str

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        raise RuntimeError(f"401 Unauthorized: key {self.settings.api_key} is not valid")

    def call(self, request: ProviderRequest) -> str:
        return "never"


class Recorded(Model):
    """Writes "made" when made and "closed" when closed to the file its settings name: how many
    times `lifeline run` made it, and whether it closed it."""

    class Settings(msgspec.Struct, forbid_unknown_fields=True):
        record: str

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self._write("made")

    def _write(self, what: str) -> None:
        with open(self.settings.record, "a", encoding="utf-8") as record:
            record.write(what + "\n")

    def call(self, request: ProviderRequest) -> str:
        return "recorded"

    def close(self) -> None:
        self._write("closed")
