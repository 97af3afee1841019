"""Your own model as a provider: a Python class named by import path or installed under the
`lifeline.providers` entry point, serving requests through a real nats-server."""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import plugin_models
import pytest
from helpers import (
    ROOT,
    LifelineProcess,
    Service,
    ask,
    config,
    fake,
    lifelines_side_by_side,
    run_lifeline,
    wait_for,
    write_config,
)
from nats.aio.client import Client

from schemas.subjects import ATTEMPT_ID, DEADLINE_MS, STREAM_TO, provider_subject
from schemas.wire import (
    ChatMessage,
    CompletionRequest,
    ProviderFailure,
    ProviderOk,
    ProviderReply,
    ProviderRequest,
    encoder,
    provider_reply_decoder,
)
from service.client import stream_text
from service.config import ConfigError, parse_config
from workers import runtime as runtime_module
from workers.runtime import _raised_by_call

WEATHER_TOOL = {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


HELLO_REQUEST = {"messages": [{"role": "user", "content": "hi"}]}


def python(cls: str, **keys: object) -> dict[str, object]:
    return {"kind": "python", "class": f"plugin_models:{cls}", **keys}


def hello(text: str = "hello there") -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}]}


async def test_a_sync_model_by_import_path_answers_from_a_thread_of_its_own(lifeline, client):
    await lifeline(config({"mine": python("SyncUpper", model="upper-1")}))
    plugin_models.CALLED_IN.clear()
    reply = await ask(client, hello())
    assert (reply.status, reply.content, reply.provider, reply.model) == (
        "ok",
        "HELLO THERE",
        "mine",
        "upper-1",
    )
    assert reply.finish_reason == "stop"
    [thread] = plugin_models.CALLED_IN
    assert thread.startswith("model-mine")  # off the event loop


async def test_a_model_without_stream_streams_as_one_piece(lifeline, client):
    await lifeline(config({"mine": python("SyncUpper")}))
    text, reply = await stream_text(client, CompletionRequest(**_messages("stream me")))
    assert (text, reply.status, reply.stream.chunks) == ("STREAM ME", "ok", 1)


async def test_an_async_model_streams_its_pieces_and_reports_usage(lifeline, client):
    await lifeline(config({"mine": python("AsyncStreaming")}))
    text, reply = await stream_text(client, CompletionRequest(**_messages()))
    assert (text, reply.stream.chunks) == ("one two three", 3)
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (3, 3)
    reply = await ask(client, hello())  # and its call, not streamed
    assert (reply.content, reply.usage.output_tokens) == ("one two three", 3)


async def test_a_models_answer_over_max_response_bytes_fails_as_too_large(lifeline, client):
    await lifeline(config({"mine": python("SyncUpper", max_response_bytes=5)}))
    reply = await ask(client, hello())  # "HELLO THERE": 11 bytes
    failed = reply.attempts[0]
    assert (reply.status, failed.error_type) == ("error", "response_too_large")
    assert "max_response_bytes (5)" in failed.message and "[providers.mine]" in failed.message


async def test_a_model_that_streams_without_end_is_stopped_at_max_response_bytes(lifeline, client):
    """The size limits come from the runtime, not from the model's author: a stream past
    max_response_bytes fails as response_too_large at the worker, which stops pulling from
    the model, and the request falls back."""
    providers = {
        "mine": python("EndlessStream", max_response_bytes=20_000),
        "backup": {"kind": "fake", "reply": "fine"},
    }
    await lifeline(config(providers, routes={"default": {"targets": ["mine", "backup"]}}))
    plugin_models.STREAMED.clear()
    text, reply = await stream_text(client, CompletionRequest(**_messages()))
    assert (reply.status, reply.provider, text) == ("ok", "backup", "fine")
    failed = reply.attempts[0]
    assert failed.error_type == "response_too_large", failed
    assert "[providers.mine]" in failed.message  # the worker's own message says where
    assert plugin_models.STREAMED == [21]  # 20 pieces within the bound, the 21st over it


async def test_the_shipped_example_streams_a_sync_generator_with_its_settings(lifeline, client):
    example = {
        "kind": "python",
        "class": "workers.examples.echo_model:EchoModel",
        "settings": {"prefix": "you said: "},
    }
    await lifeline(config({"mine": example}))
    text, reply = await stream_text(client, CompletionRequest(**_messages("hi there")))
    assert (text, reply.stream.chunks) == ("you said: hi there", 4)
    assert (await ask(client, hello("overloaded"))).error.type == "all_failed"


async def test_model_failures_map_to_error_kinds_and_fall_back(lifeline, client):
    await lifeline(config({"mine": python("Failing"), "backup": fake(reply="from backup")}))
    limited = await ask(client, hello("rate limit"))
    assert limited.provider == "backup"
    first = limited.attempts[0]
    assert (first.error_type, first.message) == ("rate_limit", "too many requests")
    crashed = (await ask(client, hello("anything"))).attempts[0]
    assert crashed.error_type == "server_error"
    assert "ZeroDivisionError" in crashed.message  # what broke, not its text


async def test_a_model_answers_with_tool_calls(lifeline, client):
    await lifeline(config({"mine": python("ToolCaller")}))
    reply = await ask(client, {**hello("weather in Paris?"), "tools": [WEATHER_TOOL]})
    assert reply.finish_reason == "tool_calls"
    [call] = reply.tool_calls
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Paris"}')


async def test_texts_and_kinds_given_as_subclasses_of_str_are_taken(lifeline, client):
    """A str subclass (a StrEnum of the model's error kinds, a library's Markup) is a str: the
    answer failed as one that "cannot be encoded as JSON", and the kind became server_error."""
    await lifeline(config({"mine": python("StrSubclasses"), "backup": fake(reply="b")}))
    reply = await ask(client, hello())
    assert (reply.status, reply.provider, reply.content) == ("ok", "mine", "HELLO THERE")
    reply = await ask(client, hello("answer"))
    assert (reply.provider, reply.content) == ("mine", "sunny"), reply.attempts
    [call] = reply.tool_calls
    assert (call.id, call.name, call.arguments) == ("call-1", "get_weather", '{"city": "Paris"}')
    failed = (await ask(client, hello("kind"))).attempts[0]
    assert (failed.error_type, failed.message) == ("rate_limit", "busy")


async def test_a_model_gets_its_checked_settings(lifeline, client):
    own = {"temperature": 0.5, "greeting": "hello"}
    await lifeline(config({"mine": python("WithSettings", settings=own)}))
    assert (await ask(client, hello())).content == "hello at 0.5"


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/plugin_pkg installed (pip, no index) into a directory of its own."""
    tmp = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(ROOT / "tests" / "plugin_pkg", tmp / "src")  # builds write there
    target = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
        + ["--no-build-isolation", "--target", str(target), str(source)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return target


async def test_an_installed_package_adds_its_kind_by_entry_point(
    lifeline, client, installed_plugin, monkeypatch
):
    monkeypatch.syspath_prepend(str(installed_plugin))
    await lifeline(config({"mine": {"kind": "reverse", "settings": {"upper": True}}}))
    reply = await ask(client, hello("stressed"))
    assert (reply.status, reply.content) == ("ok", "DESSERTS")


def test_an_unknown_kind_lists_the_installed_ones(installed_plugin, monkeypatch):
    monkeypatch.syspath_prepend(str(installed_plugin))
    with pytest.raises(ConfigError) as caught:
        parse_config(config({"mine": {"kind": "revers"}}))
    message = str(caught.value)
    assert message.startswith("providers.mine.kind: expected one of")
    assert "python" in message and "reverse" in message and "'revers'" in message


# Each broken [providers.mine] table, and what check-config must say about it.
CHECK_CONFIG_FAULTS = {
    "no-module": (
        {"kind": "python", "class": "no_such_module:Model"},
        "providers.mine.class: cannot import 'no_such_module' (ModuleNotFoundError",
    ),
    "no-colon": (
        {"kind": "python", "class": "plugin_models.SyncUpper"},
        'providers.mine.class: expected "package.module:ClassName"',
    ),
    "no-attribute": (
        {"kind": "python", "class": "plugin_models:Missing"},
        "providers.mine.class: module 'plugin_models' has no 'Missing'",
    ),
    "not-a-class": (
        {"kind": "python", "class": "plugin_models:NOT_A_CLASS"},
        "providers.mine.class: plugin_models:NOT_A_CLASS is not a class",
    ),
    "no-call": (
        {"kind": "python", "class": "plugin_models:NoCall"},
        "providers.mine.class: plugin_models:NoCall has no call(request) method",
    ),
    "no-class": ({"kind": "python"}, 'providers.mine.class: required for kind "python"'),
    "wrong-type": (
        python("WithSettings", settings={"temperature": "warm"}),
        "providers.mine.settings.temperature: Expected `float`, got `str`",
    ),
    "missing-key": (
        python("WithSettings", settings={}),
        "providers.mine.settings: Object missing required field `temperature`",
    ),
    "unknown-key": (
        python("WithSettings", settings={"temperature": 1, "tempreature": 2}),
        "providers.mine.settings: Object contains unknown field `tempreature`",
    ),
    "unknown-key-of-a-lenient-struct": (  # msgspec passes over it: the default stayed silently
        python("LenientSettings", settings={"prefx": ">> "}),
        "providers.mine.settings.prefx: unknown key (did you mean 'prefix'?)",
    ),
    "no-settings-struct": (
        python("SyncUpper", settings={"x": 1}),
        "providers.mine.settings: plugin_models:SyncUpper takes no settings",
    ),
    "secrets-unreadable": (  # was a traceback, exit 1
        python("SecretsFromEnv"),
        "providers.mine: plugin_models:SecretsFromEnv.secrets could not be read (KeyError",
    ),
    "settings-no-type": (
        python("OddSettings", settings={"x": 1}),
        "plugin_models:OddSettings.Settings cannot hold the settings",
    ),
}


@pytest.fixture(scope="module")
def check_config_runs(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """`lifeline check-config` on each of CHECK_CONFIG_FAULTS' tables, run side by side (each
    is mostly Python starting up)."""
    folder = tmp_path_factory.mktemp("check-config")
    commands = {
        name: [
            "check-config",
            "--config",
            str(write_config(folder / f"{name}.toml", config({"mine": table}))),
        ]
        for name, (table, _) in CHECK_CONFIG_FAULTS.items()
    }
    with lifelines_side_by_side(commands, env=_env_with_tests()) as runs:
        yield runs


@pytest.mark.parametrize("fault", CHECK_CONFIG_FAULTS)
def test_check_config_names_the_key_at_fault(fault, check_config_runs):
    error = CHECK_CONFIG_FAULTS[fault][1]
    result = check_config_runs[fault].result()
    assert result.returncode == 2, result.stdout + result.stderr
    assert error in result.stderr, result.stderr
    assert f"{fault}.toml: " in result.stderr  # named by its file, as the loader's mistakes are


def test_a_model_class_that_cannot_be_made_stops_its_worker_with_one_line(tmp_path):
    path = write_config(tmp_path / "bad.toml", config({"mine": python("InitRaises")}))
    result = run_lifeline("worker", "mine", "--config", str(path), env=_env_with_tests())
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "providers.mine: plugin_models:InitRaises could not be made (RuntimeError: weights" in (
        result.stderr
    )


@pytest.mark.parametrize(
    ("model", "key"),
    [
        ("KeyOnTheClassInitRaises", "plugin-KEY-on-the-class-31337"),
        ("KeyInInitRaises", "plugin-KEY-set-in-init-4242"),
    ],
)
def test_a_model_class_that_cannot_be_made_is_named_without_the_key_it_declares(
    tmp_path, model, key
):
    """The line naming the failure quoted the constructor's error whole: an upstream's, with
    the key in the URL it called, in check-config's output and the worker's last line, though
    the class declared that key in `secrets` (on the class, or set by __init__ before)."""
    path = write_config(tmp_path / "bad.toml", config({"mine": python(model)}))
    worker = run_lifeline("worker", "mine", "--config", str(path), env=_env_with_tests())
    checked = run_lifeline("check-config", "--config", str(path), env=_env_with_tests())
    for result in (worker, checked):
        assert result.returncode == 2, result.stdout + result.stderr
        assert "could not be made (RuntimeError: 401 Unauthorized for " in result.stderr
        assert "https://upstream.test/models?key=***" in result.stderr, result.stderr
        assert key not in result.stdout + result.stderr


def test_run_refuses_a_model_class_that_cannot_be_made_before_anything_starts(tmp_path):
    """Its embedded NATS said it was listening, then the model's error came: the models were
    made by the workers, after the server had started."""
    path = write_config(tmp_path / "bad.toml", config({"mine": python("InitRaises")}))
    args = ("run", "--config", str(path), "--port", "-1", "--no-gateway")
    result = run_lifeline(*args, env=_env_with_tests())
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "providers.mine: plugin_models:InitRaises could not be made (RuntimeError: weights" in (
        result.stderr
    )
    assert "embedded NATS" not in result.stdout + result.stderr, result.stdout


def test_run_makes_each_model_once_and_closes_it_when_another_cannot_be_made(tmp_path):
    record = tmp_path / "record.txt"
    good = python("Recorded", settings={"record": str(record)})
    path = write_config(tmp_path / "bad.toml", config({"good": good, "bad": python("InitRaises")}))
    args = ("run", "--config", str(path), "--port", "-1", "--no-gateway")
    result = run_lifeline(*args, env=_env_with_tests())
    assert result.returncode == 2, result.stderr
    assert record.read_text().split() == ["made", "closed"], result.stderr


def test_run_makes_each_model_once_and_closes_it_when_it_stops(tmp_path):
    record = tmp_path / "record.txt"
    good = python("Recorded", settings={"record": str(record)})
    path = write_config(tmp_path / "good.toml", config({"good": good}))
    args = ["run", "--config", str(path), "--port", "-1", "--no-gateway", "--quiet"]
    run = LifelineProcess(args, tmp_path / "run.log", env=_env_with_tests())
    try:
        run.wait_for_log("dispatcher ready")
        run.proc.send_signal(signal.SIGINT)
        assert run.proc.wait(timeout=30) == 0, run.log()
    finally:
        run.stop()
    assert record.read_text().split() == ["made", "closed"], run.log()


def test_a_worker_whose_model_does_not_load_stops_before_connecting(tmp_path):
    table = python("WithSettings", settings={"temperature": "warm"})
    path = write_config(tmp_path / "bad.toml", config({"mine": table}))
    result = run_lifeline("worker", "mine", "--config", str(path), env=_env_with_tests())
    assert result.returncode == 2
    assert "providers.mine.settings.temperature: Expected `float`, got `str`" in result.stderr


def test_a_typo_in_a_settings_table_key_is_named_before_anything_is_imported():
    with pytest.raises(ConfigError, match=r"providers\.mine\.clas: unknown key"):
        parse_config(config({"mine": {"kind": "python", "clas": "plugin_models:SyncUpper"}}))


def _messages(text: str = "hello there") -> dict[str, object]:
    from schemas.wire import ChatMessage

    return {"messages": [ChatMessage("user", text)]}


def _env_with_tests() -> dict[str, str]:
    from helpers import cli_env

    env = cli_env()
    env["PYTHONPATH"] = f"{ROOT / 'tests'}:{env.get('PYTHONPATH', '')}"
    return env


# ---- a misbehaving model gets its one reply, at once, never the deadline ----------------------


@pytest.mark.parametrize(
    "cls", ["StopsIterating", "SurrogateText", "UnknownUsage", "OwnCancelledError"]
)
async def test_a_model_failing_oddly_is_a_server_error_at_once(lifeline, client, cls):
    await lifeline(config({"mine": python(cls, timeout_s=30), "backup": fake(reply="b")}))
    reply = await ask(client, {"messages": [{"role": "user", "content": "hi"}]}, timeout_s=60)
    assert (reply.status, reply.provider) == ("ok", "backup")
    # Its own failure, not its timeout_s waited out (that would be a "timeout").
    assert reply.attempts[0].error_type == "server_error"


async def test_usage_given_as_a_dict_is_taken(lifeline, client):
    await lifeline(config({"mine": python("UsageAsDict")}))
    reply = await ask(client, {"messages": [{"role": "user", "content": "hi"}]})
    assert (reply.content, reply.usage.input_tokens, reply.usage.output_tokens) == ("hi", 3, 1)


async def test_a_plain_stream_function_runs_off_the_event_loop(lifeline, client, monkeypatch):
    """Its blocking start must not stop the worker: its deadline still cuts the call."""
    release, returned = threading.Event(), []

    def blocking(self: Any, request: Any) -> Iterator[str]:  # blocking work until released
        release.wait()
        returned.append(True)
        return iter(["a", "b"])

    monkeypatch.setattr(plugin_models.BlockingStream, "stream", blocking)
    # Were it run on the event loop (this test's too), nothing would move until the release,
    # which a timer gives in case: the reply would come only once the call had returned.
    safety = threading.Timer(30, release.set)
    safety.start()
    try:
        await lifeline(config({"mine": python("BlockingStream", timeout_s=1)}))
        _, reply = await stream_text(client, CompletionRequest(**HELLO_REQUEST))
        assert not returned  # answered while the call still blocked
    finally:
        safety.cancel()
        release.set()
    assert reply.status == "error" and reply.attempts[0].error_type == "timeout"


async def test_calls_given_up_on_while_the_models_threads_hang_are_not_kept(lifeline, client):
    """Every thread stuck in the model: a call given up on (its deadline) must not stay queued
    for a thread, its request with it, one more for every request."""
    plugin_models.HANG.clear()
    stack = await lifeline(
        config({"mine": python("HangsInItsThread", threads=2, timeout_s=0.05)})
        | {"breaker": {"enabled": False}}
    )
    worker = stack.workers["mine"]
    try:
        for _ in range(2):
            replies = await asyncio.gather(
                *(ask(client, {**HELLO_REQUEST, "timeout_s": 0.3}) for _ in range(150))
            )
            assert {r.status for r in replies} == {"error"}
        await wait_for(lambda: worker.in_flight == 0)
        assert worker.provider._threads.queued() <= 2  # was one per request
    finally:
        plugin_models.HANG.set()


async def test_a_call_finding_every_thread_hung_is_refused_at_once_naming_threads(lifeline, client):
    """It waited for a thread until its deadline and was answered as the model's `timeout`,
    though the model never had it, and nothing said that the threads were all hung."""
    plugin_models.HANG.clear()
    await lifeline(config({"mine": python("HangsInItsThread", threads=1, timeout_s=0.3)}))
    try:
        hung = (await ask(client, hello())).attempts[0]
        assert hung.error_type == "timeout"  # its own call: the model had it
        refused = (await ask(client, hello())).attempts[0]
        # Refused, not waited out: a call that waited for a thread until its deadline was
        # answered `timeout`. (No clock here: a loaded machine may take any time to answer.)
        assert refused.error_type == "rate_limit", refused
        assert "each of its 1 threads is held by a call still running after its caller" in (
            refused.message
        )
        assert "raise threads in [providers.mine]" in refused.message
    finally:
        plugin_models.HANG.set()
    await wait_for(lambda: _answers(client))  # the thread back, calls go to the model again


async def test_calls_waiting_for_a_thread_when_the_last_one_hangs_are_refused_naming_threads(
    lifeline, client
):
    """Calls already waiting for a thread when the last one was held by a call given up on
    waited for their own deadlines and were answered `timeout`, where a new call was refused
    at once as rate_limit."""
    plugin_models.HANG.clear()
    stack = await lifeline(config({"mine": python("HangsInItsThread", threads=1, timeout_s=30)}))
    worker = stack.workers["mine"]
    try:
        hung = asyncio.ensure_future(ask_worker(client, "hang", deadline_s=1.5))
        await wait_for(lambda: worker.in_flight == 1)
        waiting = [ask_worker(client, "wait", deadline_s=5) for _ in range(3)]
        replies = asyncio.gather(*waiting)
        await wait_for(lambda: worker.in_flight == 4)  # the three wait for the one thread
        hung_reply = await hung
        assert isinstance(hung_reply, ProviderFailure) and hung_reply.kind == "timeout"
        for reply in await replies:
            assert isinstance(reply, ProviderFailure) and reply.kind == "rate_limit", reply
            assert "each of its 1 threads is held by a call still running" in reply.message
    finally:
        plugin_models.HANG.set()
    await wait_for(lambda: _answers(client))


@pytest.mark.parametrize("grace_s", [0.0, -1.0, math.nan])
async def test_a_worker_stopped_without_grace_answers_each_call_at_once(lifeline, client, grace_s):
    """Calls in a model's threads and calls waiting for one: each gets its no_responders as
    the worker stops, whatever the grace. A NaN one waited for the calls to end (asyncio's
    timer never fired: here, for as long as the model hangs), or raised (uvloop's), cutting
    none short and closing nothing."""
    plugin_models.HANG.clear()
    stack = await lifeline(config({"mine": python("HangsInItsThread", threads=2, timeout_s=30)}))
    worker = stack.workers["mine"]
    try:
        asked = [asyncio.ensure_future(ask_worker(client, "hi", deadline_s=20)) for _ in range(4)]
        await wait_for(lambda: worker.in_flight == 4)
        await asyncio.wait_for(worker.stop(grace_s), 10)
        for reply in await asyncio.gather(*asked):
            assert isinstance(reply, ProviderFailure) and reply.kind == "no_responders", reply
    finally:
        plugin_models.HANG.set()


async def test_a_model_error_whose_kind_is_no_error_kind_is_said_once_per_kind(
    lifeline, client, caplog
):
    """The README: a kind that is not one is a server_error, said once per kind in the worker's
    log. Only a kind that was no str was said: a typo ("ratelimit") left the worker's log silent,
    its author never learning why the dispatcher did not take it as the rate_limit it meant."""
    caplog.set_level(logging.WARNING, logger="lifeline.worker")
    await lifeline(config({"mine": python("KindsUnknown")}))
    for text in ("ratelimit", "weird") * 2:
        reply = await ask(client, hello(text))
        assert (reply.attempts[0].error_type, reply.attempts[0].message) == (
            "server_error",
            f"worker answered an unknown error kind {text!r}: busy",
        )
    said = [r.getMessage() for r in caplog.records if "is no error kind" in r.getMessage()]
    assert len(said) == 2, said  # once per kind, not per call
    assert "'ratelimit'" in said[0] and "rate_limit" in said[0], said[0]


async def _answers(client: Client) -> bool:
    return (await ask(client, hello())).content == "late"


# ---- a model breaking the rules costs its own call, never the worker or the reply --------------


@pytest.mark.parametrize(
    "text, kind, message",
    [
        ("exception", "connection", "upstream refused"),
        ("number", "rate_limit", "12345"),
        ("none", "server_error", "(no message)"),
    ],
)
async def test_a_model_error_whose_message_is_not_text_is_answered_at_once_with_its_kind(
    lifeline, client, text, kind, message
):
    await lifeline(config({"mine": python("OddModelErrors", timeout_s=30)}))
    reply = await ask(client, {**hello(text), "timeout_s": 5}, timeout_s=10)
    failed = reply.attempts[0]  # answered with its kind, not waited out (that is a "timeout")
    assert (failed.error_type, failed.message) == (kind, message)


async def test_a_model_error_whose_kind_is_no_str_is_a_server_error_said_once_per_kind(
    lifeline, client, caplog
):
    """Its kind became server_error without a word: the model's author never learnt why the
    dispatcher did not take it as the rate_limit it meant."""
    caplog.set_level(logging.WARNING, logger="lifeline.worker")
    await lifeline(config({"mine": python("KindsNotStr")}))
    for text in ("int", "enum", "none", "odd") * 2:
        reply = await ask_worker(client, text)
        assert isinstance(reply, ProviderFailure), reply
        assert (reply.kind, reply.message) == ("server_error", "busy")
    said = [r.getMessage() for r in caplog.records if "whose kind is no str" in r.getMessage()]
    assert len(said) == 4, said  # once per kind, not per call
    shown_as = (
        "429",
        "<PlainKind.RATE_LIMIT: 'rate_limit'>",
        "None",
        "(Unshowable that cannot be shown)",
    )
    for shown, line in zip(shown_as, said):
        assert f"raised an error of kind {shown} (" in line, line
        assert "one of timeout, rate_limit, server_error, connection, quota" in line, line


async def test_a_reply_that_cannot_be_encoded_is_still_answered_at_once(
    lifeline, client, monkeypatch
):
    """A bug between the provider's answer and the wire: the one reply still goes."""

    class Broken:  # the answer's encoding fails as a bug would (handle encodes one inline)
        def encode(self, reply: ProviderReply) -> bytes:
            if type(reply) is ProviderOk:  # the bug's own reply, a ProviderFailure, goes
                raise RuntimeError("a bug in encoding")
            return encoder.encode(reply)

    monkeypatch.setattr(runtime_module, "encoder", Broken())
    await lifeline(config({"mine": python("SyncUpper", timeout_s=30)}))
    reply = await ask(client, {**hello(), "timeout_s": 5}, timeout_s=10)
    failed = reply.attempts[0]
    assert failed.error_type == "server_error"
    assert failed.message == "worker mine failed while encoding its reply (a bug: see its log)"


async def test_a_models_own_timeout_error_is_a_server_error_not_the_deadline(lifeline, client):
    """`timeout` is the call's deadline; the model's own TimeoutError is an exception like any
    other (README: "any other exception is a server_error naming its type")."""
    await lifeline(config({"mine": python("OwnTimeoutError", timeout_s=30)}))
    failed = (await ask(client, hello())).attempts[0]
    assert (failed.error_type, failed.message) == (
        "server_error",
        "worker mine failed: TimeoutError",
    )


@pytest.mark.parametrize(
    "text, named",
    [
        ("text", "text must be a str, not int"),
        (
            "tool_calls",
            "tool_calls[0] must be a workers.plugin.ToolCall(id, name, arguments), not str",
        ),
        ("arguments", "tool_calls[0].arguments must be a str, not dict"),
        (
            "finish_reason",
            "finish_reason must be one of stop, length, tool_calls, content_filter, not 'banana'",
        ),
    ],
)
async def test_an_answer_of_the_wrong_shape_is_refused_naming_the_field(
    lifeline, client, text, named
):
    await lifeline(config({"mine": python("WrongAnswers")}))
    failed = (await ask(client, hello(text))).attempts[0]
    assert failed.error_type == "server_error"
    assert failed.message == f"plugin_models:WrongAnswers answered an Answer whose {named}"


@pytest.mark.parametrize(
    "text, kind, status_code, retry_after_s",
    [
        ("retry_str", "rate_limit", None, 2.0),
        ("status_str", "rate_limit", 429, None),
        ("status_float", "rate_limit", 429, None),
        ("status_bool", "rate_limit", None, None),
        ("kind_int", "server_error", None, None),
        ("huge", "rate_limit", None, 2.0),
        ("retry_years", "rate_limit", None, 3600.0),  # at most an hour (RETRY_AFTER_MAX_S)
    ],
)
async def test_a_model_error_with_loosely_typed_fields_still_reaches_the_dispatcher_with_its_kind(
    lifeline, client, text, kind, status_code, retry_after_s
):
    """One field of the wrong type (a Retry-After passed on as the str it was read as) made
    the whole reply one the dispatcher could not decode; a 2 MB message, one over max_payload."""
    from schemas import subjects

    await lifeline(config({"mine": python("LooseModelErrors")}))
    request = encoder.encode({"id": "r", "messages": [{"role": "user", "content": text}]})
    answer = await client.request(subjects.provider_subject("mine"), request, timeout=5)
    reply = provider_reply_decoder.decode(answer.data)
    assert isinstance(reply, ProviderFailure), reply
    assert (reply.kind, reply.status_code, reply.retry_after_s) == (
        kind,
        status_code,
        retry_after_s,
    )


async def test_an_answer_with_negative_usage_is_refused_naming_the_field(lifeline, client):
    """README: an Answer of the wrong shape is a server_error naming the field; a negative
    count was sent on, and the dispatcher could not decode the answer at all."""
    from schemas import subjects

    await lifeline(config({"mine": python("LooseModelErrors")}))
    request = encoder.encode({"id": "r", "messages": [{"role": "user", "content": "usage"}]})
    answer = await client.request(subjects.provider_subject("mine"), request, timeout=5)
    reply = provider_reply_decoder.decode(answer.data)
    assert isinstance(reply, ProviderFailure), reply
    named = "usage.input_tokens must be an int from 0 to 2**53 - 1, not -1"
    assert (reply.kind, reply.message) == (
        "server_error",
        f"plugin_models:LooseModelErrors answered an Answer whose {named}",
    )


async def test_a_models_declared_secrets_are_hidden_from_its_replies_and_log(
    lifeline, client, caplog
):
    """A plug-in had no way to declare its credentials: a key in its upstream's error reached
    the reply, and the audit events and log lines the worker writes."""
    import logging

    from service.logs import TextFormatter

    caplog.set_level(logging.INFO)
    await lifeline(config({"mine": python("KeyedApi")}))
    for text, kind in (("modelerror", "auth"), ("other", "server_error")):
        failed = (await ask(client, hello(text))).attempts[0]
        assert failed.error_type == kind
        assert plugin_models.PLUGIN_KEY not in (failed.message or "")
    assert "401 Unauthorized for url https://api.example/v1/generate?key=***" in (
        (await ask(client, hello("modelerror"))).attempts[0].message
    )
    logged = "\n".join(TextFormatter().format(record) for record in caplog.records)
    assert "connection reset for url" in logged  # the traceback was logged ...
    assert plugin_models.PLUGIN_KEY not in logged  # ... without the key


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_sync_models_own_calls_carry_the_trace_of_the_request(
    lifeline, client, exporter, streamed
):
    """The README says the runtime brings trace context; a sync model's threads did not get
    it, so the HTTP calls a model makes started traces of their own."""
    await lifeline(config({"mine": python("SendsTraceparent")}))
    if streamed:
        pieces, reply = await stream_text(client, CompletionRequest(**HELLO_REQUEST))
        sent = "".join(pieces)
    else:
        reply = await ask(client, HELLO_REQUEST)
        sent = reply.content

    def worker_spans() -> list[Any]:  # the worker's call span: its parent is the dispatcher's
        return [s for s in exporter.get_finished_spans() if s.parent and s.parent.is_remote]

    await wait_for(worker_spans)  # exported just after the reply goes
    [worker_span] = worker_spans()
    span_id = format(worker_span.context.span_id, "016x")
    assert sent.startswith(f"00-{reply.trace_id}-{span_id}-"), sent


@pytest.mark.parametrize(
    "text, field", [("surrogate", "text"), ("surrogate_arguments", "tool_calls[0].arguments")]
)
async def test_an_answer_whose_text_is_not_utf8_is_refused_naming_the_field(
    lifeline, client, text, field
):
    await lifeline(config({"mine": python("WrongAnswers")}))
    failed = (await ask(client, hello(text))).attempts[0]
    assert failed.error_type == "server_error"
    assert failed.message.startswith(
        f"plugin_models:WrongAnswers answered {field} that is not UTF-8 ('\\udce9' at index "
    ), failed.message


@pytest.fixture
def model_worker(tmp_path: Path, nats_url: str) -> Iterator[Callable[..., LifelineProcess]]:
    """`lifeline worker mine` for a model of plugin_models, as a process of its own on the
    test's nats-server; stopped afterwards."""
    services: list[Service] = []

    def start(table: dict[str, object]) -> LifelineProcess:
        env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
        service = Service(tmp_path, nats_url, config({"mine": table}), env=env)
        services.append(service)
        return service.worker("mine")

    yield start
    for service in services:
        service.stop()


async def ask_worker(
    client: Client, text: str, deadline_s: float = 5.0, stream_to: str | None = None
) -> ProviderReply:
    """One ProviderRequest straight to worker mine, as a dispatcher sends it."""
    headers = {
        DEADLINE_MS: str(int((time.time() + deadline_s) * 1000)),
        ATTEMPT_ID: uuid.uuid4().hex,
    }
    if stream_to is not None:
        headers[STREAM_TO] = stream_to
    request = ProviderRequest(id="t", messages=[ChatMessage("user", text)])
    msg = await client.request(
        provider_subject("mine"), encoder.encode(request), timeout=deadline_s + 5, headers=headers
    )
    return provider_reply_decoder.decode(msg.data)


async def test_a_models_base_exceptions_are_server_errors_and_its_worker_keeps_serving(
    model_worker, client
):
    """SystemExit, KeyboardInterrupt, GeneratorExit and a class of the model's own, from a sync
    call (its thread) and an async stream (the worker's event loop): each is that call's
    server_error, named; none stops the worker or goes unanswered."""
    worker = model_worker(python("RaisesBaseExceptions"))
    for name in ("SystemExit", "KeyboardInterrupt", "GeneratorExit", "OwnBaseException"):
        for stream_to in (None, "lifeline-test.chunks"):
            reply = await ask_worker(client, name, stream_to=stream_to)
            assert isinstance(reply, ProviderFailure), (name, stream_to, reply)
            assert reply.kind == "server_error" and reply.message.endswith(name), reply
    assert (await ask_worker(client, "hello")).content == "still serving"
    assert worker.proc.poll() is None


async def test_ctrl_c_still_stops_a_worker_whose_model_raised_keyboard_interrupt(
    model_worker, client
):
    worker = model_worker(python("RaisesBaseExceptions"))
    reply = await ask_worker(client, "KeyboardInterrupt", stream_to="lifeline-test.chunks")
    assert isinstance(reply, ProviderFailure) and reply.kind == "server_error"
    worker.proc.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(worker.proc.wait, 15) == 0
    assert "stopping worker mine" in worker.log()


def test_a_keyboard_interrupt_is_the_providers_only_while_sigint_cannot_raise_one():
    """With Python's own SIGINT handler a Ctrl-C raises KeyboardInterrupt wherever the main
    thread is, a provider's call included: that one is the process's, not the call's. A worker
    serving handles SIGINT on its event loop, and then every one is the provider's."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert not _raised_by_call(KeyboardInterrupt())
        signal.signal(signal.SIGINT, lambda *_: None)  # as `lifeline worker` does, serving
        assert _raised_by_call(KeyboardInterrupt())
        assert _raised_by_call(SystemExit(3))
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    "cls, raised",
    [("ExitsWhileLoading", "SystemExit: 7"), ("InterruptedWhileLoading", "KeyboardInterrupt")],
)
def test_a_model_class_exiting_while_it_is_made_stops_its_worker_with_one_line(
    tmp_path, cls, raised
):
    path = write_config(tmp_path / "bad.toml", config({"mine": python(cls)}))
    result = run_lifeline("worker", "mine", "--config", str(path), env=_env_with_tests())
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"providers.mine: plugin_models:{cls} could not be made ({raised})" in result.stderr


def test_a_model_module_interrupting_its_import_fails_check_config_with_one_line(tmp_path):
    (tmp_path / "interrupts_on_import.py").write_text('raise KeyboardInterrupt("at import")\n')
    table = {"kind": "python", "class": "interrupts_on_import:Model"}
    path = write_config(tmp_path / "bad.toml", config({"mine": table}))
    env = _env_with_tests()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    result = run_lifeline("check-config", "--config", str(path), env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert (
        "providers.mine.class: cannot import 'interrupts_on_import' (KeyboardInterrupt: at "
        "import)" in result.stderr
    )


async def test_a_stream_that_never_awaits_leaves_its_worker_serving_and_ends_at_its_deadline(
    model_worker, client
):
    """`while True: yield "."` in an async stream: the worker still answers its other calls
    (each well within its deadline, a fourth of the stream's: a worker held by the stream
    answers none before the stream's ends), holds no pile of chunks, and the stream's deadline
    stops it. The model's calls run in its threads: on uvloop a loop that never blocked
    starved them of the GIL, and one in three waited half a second or more to start."""
    worker = model_worker(python("HotStream"))
    hot = asyncio.ensure_future(
        ask_worker(client, "go", deadline_s=4, stream_to="lifeline-test.nobody")
    )
    await asyncio.sleep(0.3)
    for _ in range(8):
        reply = await ask_worker(client, "ping", deadline_s=1)
        assert isinstance(reply, ProviderOk) and reply.content == "pong", reply
        await asyncio.sleep(0.05)
    end = await hot
    assert isinstance(end, ProviderFailure) and end.kind == "timeout", end
    assert worker.memory_kib()["VmHWM"] < 150 * 1024  # it grew to 500 MB, chunks queued


async def test_a_worker_exits_soon_after_sigterm_while_a_models_thread_hangs(model_worker, client):
    """Python cannot stop a thread stuck in the model; it must not keep the worker from exiting
    (the call was answered `timeout` at its deadline)."""
    worker = model_worker(python("HangsInItsThread", timeout_s=0.5))  # hangs for 30 s
    reply = await ask_worker(client, "hang", deadline_s=0.5)
    assert isinstance(reply, ProviderFailure) and reply.kind == "timeout"
    worker.proc.terminate()
    assert await asyncio.to_thread(worker.proc.wait, 10) == 0  # not the model's 30 s


@pytest.mark.parametrize("text", ["answered", "refused"])
async def test_a_sync_streams_cleanup_runs_off_the_event_loop(model_worker, client, text):
    """A sync stream left before its generator's end (it yields an Answer last, or a piece the
    runtime refuses) was closed on the event loop: its `finally` (1.5 s here) held every other
    call of the worker."""
    model_worker(python("SlowToCloseStream"))
    streamed = await ask_worker(client, text, stream_to="lifeline-test.nobody")
    assert isinstance(streamed, ProviderOk if text == "answered" else ProviderFailure), streamed
    started = time.monotonic()
    reply = await ask_worker(client, "ping")
    assert isinstance(reply, ProviderOk) and reply.content == "pong", reply
    assert time.monotonic() - started < 0.5  # was 1.5 s, the cleanup's


async def test_a_sync_stream_cut_short_lets_go_of_what_its_models_threads_wait_for():
    """Its close must not wait for one of the model's threads: each may be waiting for what
    the generator holds (a lock taken across its pieces), which only its close lets go."""
    from workers.registry import build_provider

    cfg = parse_config(config({"m": python("LockedStream", threads=1)}, routes=None))
    provider = build_provider(cfg.providers["m"], "m")
    request = ProviderRequest(id="t", messages=[ChatMessage("user", "hi")])
    stream = provider.stream(request, 5)
    assert await anext(stream) == "a"  # the generator holds the lock
    waiting = asyncio.ensure_future(provider.complete(request, 5))  # the one thread waits for it
    await asyncio.sleep(0.1)
    await stream.aclose()  # cut short: a cancel, its deadline
    try:
        assert (await asyncio.wait_for(waiting, 5)).content == "called"
    finally:
        await provider.aclose()


# ---- installed kinds: no package's class served, or ignored, without a word -------------------


def _installed(site: Path, package: str, **kinds: str) -> None:
    """What pip leaves in site-packages for a package registering `kinds` under
    lifeline.providers (name = "module:Class")."""
    info = site / f"{package.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    entries = "".join(f"{kind} = {path}\n" for kind, path in kinds.items())
    (info / "entry_points.txt").write_text(f"[lifeline.providers]\n{entries}")


def test_a_kind_two_installed_packages_register_is_refused_naming_both(tmp_path, monkeypatch):
    _installed(tmp_path, "shouty-a", shouty="plugin_models:SyncUpper")
    _installed(tmp_path, "shouty-b", shouty="plugin_models:Failing")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        parse_config(config({"mine": {"kind": "shouty"}}))
    message = str(caught.value)
    assert message.startswith(
        "providers.mine.kind: kind 'shouty' is registered by more than one installed package"
    )
    assert "shouty = plugin_models:SyncUpper (package shouty-a 0.1)" in message
    assert "shouty = plugin_models:Failing (package shouty-b 0.1)" in message


def test_an_installed_kind_given_a_class_is_refused(tmp_path, monkeypatch):
    _installed(tmp_path, "shouty", shouty="plugin_models:SyncUpper")
    monkeypatch.syspath_prepend(str(tmp_path))
    table = {"kind": "shouty", "class": "plugin_models:Failing"}
    with pytest.raises(ConfigError) as caught:
        parse_config(config({"mine": table}))
    assert str(caught.value) == (
        "providers.mine.class: kind 'shouty' is an installed plug-in's, whose entry point names "
        "its class (plugin_models:SyncUpper); remove `class`, or serve plugin_models:Failing "
        'with kind = "python"'
    )


def test_a_package_registering_a_built_in_kind_is_named_in_a_warning(tmp_path):
    _installed(tmp_path / "site", "sneaky", fake="plugin_models:SyncUpper")
    path = write_config(tmp_path / "ok.toml", config({"mine": fake()}))
    env = _env_with_tests()
    env["PYTHONPATH"] = f"{tmp_path / 'site'}:{env['PYTHONPATH']}"
    result = run_lifeline("check-config", "--config", str(path), env=env)
    assert result.returncode == 0, result.stderr
    assert "kind 'fake' is Lifeline's own" in result.stderr
    assert "fake = plugin_models:SyncUpper (package sneaky 0.1)" in result.stderr


async def test_a_model_whose_identifying_params_or_close_exits_is_logged_not_obeyed(caplog):
    """identifying_params() (logged as the worker starts) and close() (as it stops) let a
    SystemExit through: it stopped the worker at start, or skipped the rest of its stop."""
    from workers.registry import build_provider

    cfg = parse_config(config({"m": python("ExitsWhenAsked")}, routes=None))
    provider = build_provider(cfg.providers["m"], "m")
    assert provider.identifying_params() == {"identifying_params() failed": "SystemExit: 4"}
    await provider.aclose()
    assert "plugin_models:ExitsWhenAsked.close() failed (SystemExit: 5)" in caplog.text


async def test_a_worker_whose_identifying_params_cannot_be_shown_serves_all_the_same(
    model_worker, client
):
    """Its value was shown (repr) in the start-up log line, outside the guard: a repr that
    fails stopped the worker, once subscribed, with a traceback."""
    worker = model_worker(python("ParamsNotShown"))
    assert "identifying_params() failed': \"AttributeError: 'HalfMade' object" in worker.log()
    assert (await ask_worker(client, "hi")).content == "still serving"


async def test_a_worker_whose_identifying_params_hangs_starts_and_serves_all_the_same(
    model_worker, client
):
    """It was called on the event loop as the worker started: the worker never said it served,
    nor answered a call."""
    worker = model_worker(python("ParamsHang"))  # waits for "worker mine serving"
    assert "identifying_params() failed': 'did not return within 2 s'" in worker.log()
    assert (await ask_worker(client, "hi")).content == "still serving"


@pytest.mark.parametrize("cls", ["SyncCloseHangs", "AsyncCloseHangs"])
async def test_a_model_whose_close_hangs_still_lets_its_worker_stop(caplog, monkeypatch, cls):
    """close() ran unbounded (a sync one on the event loop itself): a worker given SIGTERM
    never exited."""
    from workers import plugin
    from workers.registry import build_provider

    monkeypatch.setattr(plugin, "CLOSE_TIMEOUT_S", 0.3, raising=False)
    plugin_models.CLOSE_HANGS.clear()
    # A hang the test can see end: were close() still run on the event loop, no timeout in
    # here could cut it.
    safety = threading.Timer(30, plugin_models.CLOSE_HANGS.set)
    safety.start()
    try:
        cfg = parse_config(config({"m": python(cls)}, routes=None))
        provider = build_provider(cfg.providers["m"], "m")
        await asyncio.wait_for(provider.aclose(), 60)
        assert not plugin_models.CLOSE_HANGS.is_set()  # it let go while close() still hung
    finally:
        safety.cancel()
        plugin_models.CLOSE_HANGS.set()
    assert f"plugin_models:{cls}.close() did not return within 0.3 s" in caplog.text


async def test_a_model_that_swallows_its_cancel_sends_nothing_past_its_deadline(lifeline, client):
    """Its answer went out as ok after the deadline (and a stream's pieces after its cancel):
    the runtime's promise that nothing is sent for a call nobody waits for rests on it, not on
    the model. Past the deadline the worker's answer is the timeout, whatever the model does."""
    from schemas import subjects
    from schemas.deadline import Deadline
    from schemas.wire import encoder, provider_reply_decoder

    await lifeline(config({"mine": python("SwallowsCancel", timeout_s=5)}))
    request = encoder.encode({"id": "r", "messages": [{"role": "user", "content": "hi"}]})
    headers = {subjects.DEADLINE_MS: Deadline.header_after(0.3)}
    answer = await client.request(
        subjects.provider_subject("mine"), request, timeout=5, headers=headers
    )
    reply = provider_reply_decoder.decode(answer.data)
    assert getattr(reply, "kind", None) == "timeout", reply
    chunks = await client.subscribe("chunks.mine")
    headers = {subjects.DEADLINE_MS: Deadline.header_after(0.35), subjects.STREAM_TO: "chunks.mine"}
    answer = await client.request(
        subjects.provider_subject("mine"), request, timeout=5, headers=headers
    )
    assert getattr(provider_reply_decoder.decode(answer.data), "kind", None) == "timeout"
    await asyncio.sleep(0.5)
    assert chunks.pending_msgs <= 3  # the pieces before the deadline, none after
