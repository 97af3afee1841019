"""The `lifeline` command as a user runs it: real processes, a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from helpers import (
    LIFELINE,
    ROOT,
    LifelineProcess,
    cli_env,
    config,
    dial_upstream,
    fake,
    free_port,
    lifelines_side_by_side,
    rest_of_output,
    run_lifeline,
    spawn_lifeline,
    wait_for_line,
    write_config,
)

from schemas import ChatMessage, CompletionRequest, subjects
from schemas.wire import audit_decoder, encoder
from service.config import JobsSettings
from service.embedded import EmbeddedNats
from service.jobstore import ensure_jobs
from service.natsio import ensure_subscribed

EXAMPLE = str(ROOT / "lifeline.example.toml")


@pytest.fixture(scope="module")
def running(tmp_path_factory) -> Iterator[tuple[LifelineProcess, str]]:
    """`lifeline run` on an embedded NATS on a free port, outside the checkout and without
    --config: the example config installed with Lifeline is what it runs. One for the module's
    tests that only send it requests, one after the other (a start is a second or more of
    Python importing); what it prints goes to a file (a line per request, which would fill a
    pipe nobody reads)."""
    folder = tmp_path_factory.mktemp("run")
    run = LifelineProcess(["run", "--port", "-1", "--no-gateway"], folder / "run.log", cwd=folder)
    try:
        run.wait_for_log(r"dispatcher ready")
        ready = next(line for line in run.log().splitlines() if "dispatcher ready" in line)
        url = re.search(r"nats://[\d.]+:\d+", ready).group(0)  # type: ignore[union-attr]
        yield run, url
    finally:
        run.stop()


@pytest.fixture
def own_run(tmp_path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`lifeline run` as `running` starts it, for a test that reads what it prints and stops it."""
    proc = spawn_lifeline(
        "run",
        "--port",
        "-1",
        "--no-gateway",
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as in a terminal
    )
    try:
        line, _ = wait_for_line(proc, r"dispatcher ready")
        url = re.search(r"nats://[\d.]+:\d+", line).group(0)  # type: ignore[union-attr]
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            stream and stream.close()


def test_help_lists_every_command_with_an_example():
    out = run_lifeline("--help").stdout
    for command in ("run", "dispatcher", "worker", "ask", "check-config"):
        assert command in out
    assert 'lifeline ask "Why did the chicken cross the road?"' in out


# Runs `lifeline ARGS...` in this interpreter, then prints, last, the modules it loaded.
LOADED_BY_A_COMMAND = """
import json, sys
from service.cli import main
try:
    main(sys.argv[1:])
except SystemExit:  # --help
    pass
print(json.dumps(sorted(sys.modules)))
"""

# What a serving command needs and a client command does not (HTTP clients of every provider
# kind, OpenTelemetry's SDK, the engine): it took most of every command's start (0.6 s).
SERVING_ONLY = ("httpx", "opentelemetry", "workers", "service.config", "service.dispatcher")


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["ask", "--help"],
        ["ask", "hi", "--nats-url", "nats://127.0.0.1:1"],
        ["health", "--nats-url", "nats://127.0.0.1:1"],
    ],
    ids=" ".join,
)
def test_a_client_command_loads_neither_providers_nor_telemetry_nor_the_dispatcher(tmp_path, args):
    done = subprocess.run(
        [sys.executable, "-c", LOADED_BY_A_COMMAND, *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,  # no lifeline.example.toml here: no config is read
        env=cli_env(),
        check=False,  # the assert below shows why
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.splitlines()[-1])
    heavy = [m for m in loaded if m.startswith(SERVING_ONLY)]
    assert heavy == [], done.stderr


def test_run_then_ask_shows_the_answer_the_provider_and_every_attempt(own_run):
    proc, url = own_run
    result = run_lifeline("ask", "--nats-url", url, "Why did the chicken cross the road?")
    assert result.returncode == 0, result.stderr
    # The answer alone on stdout (the example's backup echoes); the rest on stderr.
    assert result.stdout == "Why did the chicken cross the road?\n"
    out = result.stderr
    assert "served by backup" in out
    assert re.search(r"1\. flaky .* rate_limit 429", out)
    assert re.search(r"2\. sleepy .* timeout", out)
    assert re.search(r"3\. backup .* ok", out)
    # `run` prints a line per request from the audit subject, and stops cleanly on Ctrl-C,
    # which a terminal sends to the whole process group (the embedded server included).
    wait_for_line(
        proc,
        r"\[ok\] id=\w+ .*flaky:rate_limit 429->fallback -> sleepy:timeout->fallback -> backup:ok",
    )
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=15) == 0
    assert "stopped" in rest_of_output(proc)


def test_ask_reads_the_prompt_from_stdin_and_keeps_stdout_for_the_answer(running, tmp_path):
    _, url = running
    answer = tmp_path / "answer.txt"
    with answer.open("w") as out:
        result = subprocess.run(
            [*LIFELINE, "ask", "--nats-url", url, "-"],
            input="a prompt\nfrom a pipe\n",
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
            cwd=ROOT,
            env=cli_env(),
            check=False,
        )
    assert result.returncode == 0, result.stderr
    # The backup echoes it, alone on its line, without the pipe's last line break.
    assert answer.read_text() == "a prompt\nfrom a pipe\n"
    assert "served by backup" in result.stderr


def test_ask_stream_prints_tokens_as_they_arrive_and_shows_the_reset(running):
    """The example's streaming route: chatty fails after 5 of its chunks, storyteller answers."""
    _, url = running
    proc = spawn_lifeline(
        "ask",
        "--stream",
        "--nats-url",
        url,
        "--route",
        "streaming",
        "hello streaming world",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    first = os.read(proc.stdout.fileno(), 64)  # the first token(s), printed as they came
    assert first and "hello streaming world".startswith(first.decode())
    assert proc.poll() is None  # ... while the answer is still streaming
    out = first.decode() + proc.stdout.read()
    assert proc.stderr is not None
    notes = proc.stderr.read()
    assert proc.wait(timeout=15) == 0, notes
    proc.stdout.close()
    proc.stderr.close()
    assert "[reset: attempt 1 failed with server_error (5 chunks voided): " in notes
    story = "Once upon a time, a lighthouse keeper kept the light burning through every storm."
    assert out.rstrip().endswith(story)  # after the voided text, which stdout cannot take back
    out = notes
    assert "served by storyteller" in out
    assert re.search(r"streamed 21 chunks, first after [\d.]+ ms, 1 reset", out)
    assert re.search(r"1\. chatty .* server_error 503->fallback", out)
    running[0].wait_for_log(r"chatty:server_error 503->fallback -> storyteller:ok  streamed 21")


WEATHER_TOOLS = (
    '[{"name": "get_weather", "parameters": {"type": "object", '
    '"properties": {"city": {"type": "string"}}, "required": ["city"]}}]'
)


def test_ask_with_tools_shows_the_tool_call_the_finish_reason_and_the_skip(running):
    """The example's tools route: backup cannot call tools and is skipped; agent calls one.
    The answer is the tool call alone: agent's empty text printed a blank line before it."""
    _, url = running
    args = ("--route", "tools", "--tools", WEATHER_TOOLS, "--tool-choice", "required")
    result = run_lifeline("ask", "--nats-url", url, *args, "Weather in Paris?")
    assert result.returncode == 0, result.stderr
    assert result.stdout == 'tool call call_1: get_weather({"city": "Paris"})\n'
    out = result.stderr
    assert "finish: tool_calls" in out
    assert re.search(r"1\. backup .* skipped:tools", out)
    assert "served by agent" in out


MISTAKES = [
    (["batch", "no-such-file.jsonl"], "no-such-file.jsonl does not exist"),
    (["batch", "."], ". is a directory"),
    (["batch", "JOBS", "--out", "."], "--out . is a directory: name a file"),
    # before connecting (no server there), not after submitting
    (["batch", "JOBS", "--out", "nowhere/r.jsonl", "--nats-url", "nats://127.0.0.1:1"], "No such"),
    (["spec", "--out", "README.md"], "File exists"),
    (["gateway", "--port", "99999"], "is not a port"),
    (["run", "--gateway-port", "70000"], "is not a port"),
    (["result", "x", "--wait", "nan"], "not a number of seconds"),
    (["health", "--timeout", "-1"], "not a number of seconds"),
    (["submit", "--timeout", "0", "hi"], "not a number of seconds"),
    (["submit", "--id", "i" * 300, "hi"], "at most 256"),
    (["dispatcher", "--nats-url", ",", "--config", EXAMPLE], "names no server"),
    (["audit", "--config", "AUDITLESS"], "keeps no audit stream"),
    # at once, not after connecting: with NATS unreachable a worker waited without a word
    (["worker", "p", "--health-port", "notaport", "--nats-url", "nats://127.0.0.1:1"], "PORT"),
    (["dispatcher", "--health-port", "localhost:99999"], "expected [HOST:]PORT"),
    # one tool's object, not in a list, was read as a file's name
    (["ask", "--tools", '{"name": "get_weather"}', "hi"], "expected a JSON list of tools"),
]


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory) -> Iterator[dict[Any, Any]]:
    """Every mistake's command, run side by side (each is mostly Python starting up)."""
    tmp_path = tmp_path_factory.mktemp("mistakes")
    auditless = tmp_path / "auditless.toml"
    auditless.write_text('[audit]\nstream = ""\n[providers.p]\nkind = "fake"\n')
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"id": "j", "messages": [{"role": "user", "content": "hi"}]}\n')
    files = {"AUDITLESS": str(auditless), "JOBS": str(jobs)}
    commands = {tuple(argv): [files.get(a, a) for a in argv] for argv, _ in MISTAKES}
    with lifelines_side_by_side(commands, timeout_s=20) as runs:
        yield runs


@pytest.mark.parametrize("argv, says", MISTAKES)
def test_a_mistake_on_the_command_line_gets_one_line_saying_what_not_a_traceback(
    argv, says, mistakes
):
    result = mistakes[tuple(argv)].result()
    assert result.returncode in (1, 2), result
    assert says in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_ask_refuses_json_with_stream_instead_of_ignoring_one():
    result = run_lifeline("ask", "--json", "--stream", "hi")
    assert result.returncode == 2 and "not allowed with argument" in result.stderr


def test_a_gateway_port_taken_is_said_once_without_a_false_connection_error(running):
    _, url = running
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_lifeline("gateway", "--nats-url", url, "--port", str(port))
    assert result.returncode != 0 and "Address already in use" in result.stderr
    assert "gone for good" not in result.stderr, result.stderr


def test_ask_says_what_is_wrong_with_its_tools():
    result = run_lifeline("ask", "--tools", '[{"description": "no name"}]', "hi")
    assert result.returncode == 2
    assert "--tools" in result.stderr and "name" in result.stderr


def test_submit_a_job_then_fetch_its_result_by_id(running):
    _, url = running
    submitted = run_lifeline("submit", "--nats-url", url, "--id", "cli-job-1", "a durable hello")
    assert submitted.returncode == 0, submitted.stderr
    assert "cli-job-1: submitted" in submitted.stdout
    # Says how to get the answer, from the same server.
    assert f"lifeline result cli-job-1 --nats-url {url}" in submitted.stdout
    refused = run_lifeline("submit", "--nats-url", url, "--notify", "llm.mine", "hello")
    assert refused.returncode == 2 and "--notify 'llm.mine'" in refused.stderr
    assert "Lifeline's own namespace" in refused.stderr
    again = run_lifeline("submit", "--nats-url", url, "--id", "cli-job-1", "a durable hello")
    assert "already submitted" in again.stdout
    result = run_lifeline("result", "--nats-url", url, "--wait", "10", "cli-job-1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "a durable hello\n"  # the example's backup echoes
    assert "served by backup" in result.stderr
    missing = run_lifeline("result", "--nats-url", url, "no-such-job")
    assert missing.returncode == 3 and "no result for job 'no-such-job'" in missing.stderr
    # Its audit event was kept in the audit stream, though nobody asked for it then.
    audit = run_lifeline("audit", "--nats-url", url, "cli-job-1")
    assert audit.returncode == 0, audit.stderr
    [line] = audit.stdout.splitlines()  # one event for the id, the duplicate submit made none
    assert re.match(r"\d{4}-\d\d-\d\dT[\d:.]+Z \[ok\] id=cli-job-1 ", line), line
    assert "backup:ok" in line
    latest = run_lifeline("audit", "--nats-url", url, "--last", "1", "--json")
    assert '"id":"cli-job-1"' in latest.stdout


def test_a_job_that_fits_max_payload_only_without_its_headers_is_refused_at_once():
    """nats-py checks a message's body alone; the server closes the connection over the whole,
    and the submit waited out its 5 s for an ack, then blamed JetStream, permissions or a full
    disk."""
    with EmbeddedNats(port=-1, conf="max_payload: 65536") as server:
        around = len(encoder.encode(CompletionRequest([ChatMessage("user", "x")], id="big"))) - 1
        prompt = "x" * (65536 - around - 5)  # 5 bytes under max_payload, 25 over with headers
        refused = run_lifeline("submit", "--nats-url", server.url, "--id", "big", "-", input=prompt)
    assert refused.returncode == 2  # the prompt is the user's to shorten
    assert "with its headers, over the NATS server's max_payload of 65536" in refused.stderr


def test_the_result_command_submit_prints_works_as_printed_with_a_config(running, tmp_path):
    """With --config naming the server in its [nats] table, the command printed had no
    --config, and failed: it looked for the job on nats://127.0.0.1:4222. And it said
    `lifeline result` to one who ran `.venv/bin/lifeline submit`, not on their PATH."""
    _, url = running
    path = tmp_path / "my configs" / "lifeline.toml"
    path.parent.mkdir()
    path.write_text(Path(EXAMPLE).read_text() + f'\n[nats]\nurl = "{url}"\n')
    lifeline = Path(sys.executable).parent / "lifeline"  # this venv's, as `make run` installs it
    env = cli_env(PATH="/usr/bin:/bin")  # the venv not activated
    submitted = subprocess.run(
        [lifeline, "submit", "--config", str(path), "a configured hello"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert submitted.returncode == 0, submitted.stderr
    [printed] = re.findall(r"^result: (.*)$", submitted.stdout, re.MULTILINE)
    result = subprocess.run(  # as printed, from the same directory and shell
        printed,
        shell=True,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "a configured hello\n"  # the example's backup echoes


def test_submit_and_batch_to_a_server_without_jetstream_say_what_to_do(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"id": "j1", "messages": [{"role": "user", "content": "hello"}]}\n')
    with EmbeddedNats(port=-1, jetstream=False) as server:
        submitted = run_lifeline("submit", "--nats-url", server.url, "hello")
        batch = run_lifeline("batch", "--nats-url", server.url, str(jobs))
    assert submitted.returncode == 1
    assert "could not submit the job" in submitted.stderr
    assert "is JetStream on (nats-server -js)" in submitted.stderr
    assert batch.returncode == 1
    assert "batch stopped" in batch.stderr and "rerun to resume" in batch.stderr
    assert "is JetStream on (nats-server -js)" in batch.stderr


def test_batch_with_jobs_still_without_a_result_at_its_timeout_exits_1_to_be_rerun(tmp_path):
    """No dispatcher runs: the job waits in the stream, and the run gives up at --timeout
    with exit 1, saying to rerun it, its results file without a line for the job."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"id": "j1", "messages": [{"role": "user", "content": "hello"}]}\n')
    with EmbeddedNats(port=-1) as server:
        batch = run_lifeline("batch", "--nats-url", server.url, "--timeout", "1", str(jobs))
    assert batch.returncode == 1, batch
    assert "1 job still without a result after 1 s; rerun the same command" in batch.stderr
    assert (tmp_path / "jobs.results.jsonl").read_text() == ""


def test_audit_skips_an_event_it_cannot_read_and_goes_on(running):
    """One event of another shape (a newer Lifeline's status, or anyone's publish) must not
    end the listing."""
    _, url = running

    async def publish_junk() -> None:
        nc = await nats.connect(url)
        await nc.publish("llm.audit.ok", b'{"id": "z", "status": "weird"}')
        await nc.flush()
        await nc.close()

    asyncio.run(publish_junk())
    ask = run_lifeline("ask", "--nats-url", url, "after the junk")
    assert ask.returncode == 0, ask.stderr
    audit = run_lifeline("audit", "--nats-url", url, "--last", "3")
    assert audit.returncode == 0, audit.stderr
    assert "skipping an event that is no AuditEvent" in audit.stderr
    assert "[ok]" in audit.stdout.splitlines()[-1]


def test_batch_submits_a_file_of_jobs_shows_progress_and_resumes(running, tmp_path):
    _, url = running
    lines = [
        json.dumps(
            {"id": f"b{n}", "route": "strict", "messages": [{"role": "user", "content": f"q{n}"}]}
        )
        for n in range(300)
    ]
    lines[7] = json.dumps(
        {"id": "b7", "route": "nope", "messages": [{"role": "user", "content": "x"}]}
    )
    source = tmp_path / "jobs.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "jobs.results.jsonl"
    first = run_lifeline("batch", "--nats-url", url, str(source))
    assert first.returncode == 1  # b7's route does not exist: one failed job
    assert "300/300 done, 1 failed, 0 in flight" in first.stderr
    assert "ETA" in first.stderr
    results = {json.loads(line)["id"]: json.loads(line) for line in out.read_text().splitlines()}
    assert len(results) == 300
    assert results["b3"]["content"] == "q3" and results["b7"]["error"]["type"] == "unknown_route"
    # A run cut short: the last 50 results never made it to the file. Rerunning resumes.
    kept = out.read_text().splitlines()[:250]
    out.write_text("\n".join(kept) + "\n")
    second = run_lifeline("batch", "--nats-url", url, str(source))
    assert "50/50 done" in second.stderr and "250 had results" in second.stderr
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == sorted(
        f"b{n}" for n in range(300)
    )
    again = run_lifeline("batch", "--nats-url", url, str(source))
    assert again.returncode == 1 and "all 300 jobs" in again.stdout  # b7 is an error
    assert again.stdout.rstrip().endswith(", 1 failed"), again.stdout


def test_batch_runs_an_openai_batch_file_and_answers_in_its_output_shape(running, tmp_path):
    """A file written for OpenAI's Batch API runs through the route's fallbacks as it is, and
    its results are the Batch API's output lines: what the gateway would answer, a failed
    job's error under its HTTP status. A rerun resumes from those lines."""

    def line(custom_id: str, model: str, content: str, **body: object) -> str:
        chat = {"model": model, "messages": [{"role": "user", "content": content}]} | body
        return json.dumps(
            {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": chat}
        )

    source = tmp_path / "input.jsonl"
    source.write_text(
        line("oa-route", "gpt-4o-mini", "through the default route")  # the example's alias
        + "\n"
        + line("oa-target", "backup", "straight to backup", frequency_penalty=0.5, stream=True)
        + "\n"
        + line("oa-fails", "default", "to no provider", lifeline={"targets": ["missing"]})
        + "\n"
    )
    _, url = running
    first = run_lifeline("batch", "--nats-url", url, "--config", EXAMPLE, str(source))
    assert first.returncode == 1, first  # oa-fails: its one target is in no config
    assert "ignored what Lifeline does not carry: frequency_penalty (1 line), stream (1 line)" in (
        first.stderr
    )
    assert "3/3 done, 1 failed, 0 in flight" in first.stderr
    written = (tmp_path / "input.results.jsonl").read_text().splitlines()
    results = {r["custom_id"]: r for r in map(json.loads, written)}
    assert set(results) == {"oa-route", "oa-target", "oa-fails"}
    assert all(r["id"].startswith("batch_req_") and r["error"] is None for r in results.values())

    route = results["oa-route"]["response"]
    assert route["status_code"] == 200 and route["request_id"] == "oa-route"
    answer = route["body"]
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == "through the default route"  # echoed
    fallbacks = [a["outcome"] for a in answer["lifeline"]["attempts"]]
    assert answer["lifeline"]["route"] == "default"
    assert answer["lifeline"]["provider"] == "backup" and fallbacks[-1] == "ok"
    assert len(fallbacks) >= 2  # flaky (or its open breaker) first: a fallback, not one call

    target = results["oa-target"]["response"]["body"]
    assert target["lifeline"]["target"] == "backup" and len(target["lifeline"]["attempts"]) == 1

    failed = results["oa-fails"]["response"]  # the dispatcher's refusal, as the gateway says it
    assert failed["status_code"] == 404 and failed["request_id"] == "oa-fails"
    error = failed["body"]["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "model_not_found")
    assert "unknown target or provider 'missing'" in error["message"]

    again = run_lifeline("batch", "--nats-url", url, "--config", EXAMPLE, str(source))
    assert again.returncode == 1, again
    assert again.stdout.strip() == (
        f"all 3 jobs of {source} have results in {tmp_path / 'input.results.jsonl'}, 1 failed"
    )


def test_the_readme_s_openai_batch_example_runs_on_the_example_config(running, tmp_path):
    """The README's OpenAI Batch example file, as a newcomer runs it against `make run`: each
    line's model (two aliases and a provider) served, every result a chat completion."""
    _, url = running
    out = tmp_path / "results.jsonl"
    source = str(ROOT / "workers" / "examples" / "openai_batch.jsonl")
    ran = run_lifeline("batch", "--nats-url", url, "--config", EXAMPLE, source, "--out", str(out))
    assert ran.returncode == 0, ran
    results = {r["custom_id"]: r["response"] for r in map(json.loads, out.read_text().splitlines())}
    served = {
        custom_id: (response["status_code"], response["body"]["lifeline"]["route"])
        for custom_id, response in results.items()
    }
    assert served == {
        "summary-1": (200, "default"),
        "hedged-2": (200, "hedged"),
        "direct-3": (200, "default"),  # a provider by name: its chain of one
    }
    assert results["direct-3"]["body"]["lifeline"]["provider"] == "backup"


def test_batch_writes_to_stdout_and_passes_over_what_is_no_result(running, tmp_path):
    """`--out /dev/stdout` read its own stdout for ids to resume, and waited for ever; a value
    on a job's key that is no result (anyone may have JetStream write one there) stopped the
    batch with msgspec's error."""
    _, url = running
    lines = [
        json.dumps({"id": f"o{n}", "messages": [{"role": "user", "content": f"q{n}"}]})
        for n in range(3)
    ]
    source = tmp_path / "jobs.jsonl"
    source.write_text("\n".join(lines) + "\n")

    async def junk_on_a_key() -> None:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            await ensure_jobs(js, JobsSettings())
            kv = await js.key_value(JobsSettings().results_bucket)
            await kv.put(subjects.job_key("o1"), b'{"stream":"LIFELINE_JOBS","seq":1}')
        finally:
            await nc.close()

    asyncio.run(junk_on_a_key())
    done = run_lifeline("batch", "--nats-url", url, str(source), "--out", "/dev/stdout")
    assert done.returncode == 0, done.stderr
    ids = sorted(
        json.loads(line)["id"] for line in done.stdout.splitlines() if line.startswith("{")
    )
    assert ids == ["o0", "o1", "o2"]


async def test_batch_longer_than_the_jobs_stream_has_room_for_waits_for_room(
    lifeline, client, nats_url, tmp_path
):
    """A stream full (jobs.max_jobs waiting) refused the third job, and the batch stopped at
    once, collected nothing, and asked whether JetStream was on."""
    await ensure_jobs(client.jetstream(), JobsSettings(max_jobs=2))
    await lifeline(
        {**config({"main": fake(latency_ms=150)}), "jobs": {"max_jobs": 2, "in_flight": 1}}
    )
    source = tmp_path / "jobs.jsonl"
    source.write_text(
        "".join(
            json.dumps({"id": f"r{n}", "messages": [{"role": "user", "content": "q"}]}) + "\n"
            for n in range(6)
        )
    )
    done = await asyncio.to_thread(run_lifeline, "batch", "--nats-url", nats_url, str(source))
    assert done.returncode == 0, done.stderr
    assert "6/6 done" in done.stderr and "waiting for room" in done.stderr


class _CutLink:
    """A TCP proxy to a NATS server whose connections can be cut; a connection made after a
    cut reaches the server only `late_s` later (None: never), as after a server's restart."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("nats://").rsplit(":", 1)
        self.upstream, self.late_s = (host, int(port)), 0.0
        self.cuts = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        if self.cuts:
            if self.late_s is None:
                writer.close()
                return
            await asyncio.sleep(self.late_s)
        if (upstream := await dial_upstream(self.server, self.upstream, self.writers)) is None:
            writer.close()
            return
        up_reader, up_writer = upstream
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    def cut(self, late_s: float | None) -> None:
        self.cuts, self.late_s = self.cuts + 1, late_s
        for writer in self.writers:
            writer.close()
        self.writers.clear()  # in place: a link being made as it is cut lands in it, not lost

    async def close(self) -> None:
        self.cut(None)
        self.server.close()


@pytest.mark.parametrize("late_s", [None, 3.0], ids=["lost for good", "back after the results"])
async def test_batch_whose_connection_drops_stops_or_asks_for_what_it_missed(
    lifeline, nats_url, tmp_path, late_s
):
    """Results come pushed, on core NATS: those published while the batch's connection was
    down never come. Lost for good (a client reconnects once), the batch waited its whole
    --timeout (10 minutes by default) on a closed connection, then blamed the time; back,
    it waited as long for the results pushed meanwhile, which it now asks for."""
    await lifeline(config({"main": fake(latency_ms=1500)}))
    link = _CutLink(nats_url)
    url = await link.start()
    source = tmp_path / "jobs.jsonl"
    source.write_text(
        "".join(
            json.dumps({"id": f"c{n}", "messages": [{"role": "user", "content": f"q{n}"}]}) + "\n"
            for n in range(2)
        )
    )
    started = asyncio.get_running_loop().time()
    batch = asyncio.create_task(
        asyncio.to_thread(
            run_lifeline, "batch", "--nats-url", url, "--timeout", "20", str(source), timeout_s=60
        )
    )
    out = tmp_path / "jobs.results.jsonl"
    stream = JobsSettings().stream
    async with await nats.connect(nats_url) as nc:  # both jobs in, neither answered yet

        async def submitted() -> bool:
            with contextlib.suppress(Exception):
                return (await nc.jetstream().stream_info(stream)).state.messages == 2
            return False

        while not await submitted():
            await asyncio.sleep(0.05)
    link.cut(late_s)
    try:
        done = await batch
    finally:
        await link.close()
    took = asyncio.get_running_loop().time() - started
    assert took < 15, (took, done.stderr)  # not the whole --timeout
    if late_s is None:
        assert done.returncode == 1 and "rerun to resume" in done.stderr, done.stderr
        assert "the NATS connection was lost" in done.stderr, done.stderr
    else:
        assert done.returncode == 0, done.stderr
        assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == [
            "c0",
            "c1",
        ]


def test_batch_takes_odd_lines_and_resumes_after_a_line_cut_in_two(running, tmp_path):
    """Lines a JSONL file may hold (a raw U+2028 in a text, CRLF endings, no ids, ids the
    dispatcher cannot read, a job too large for NATS), files of one name in two folders, and
    a results file whose last line a crash cut in two."""
    _, url = running
    long_id = "L" * 300  # over the 256 characters of an id
    vast_id = "V" * 70_000  # more than JetStream takes in headers: once, it stopped the batch
    ids_refused = tmp_path / "ids.jsonl"
    ids_refused.write_text(
        "".join(
            json.dumps({"id": job_id, "messages": [{"role": "user", "content": "q"}]}) + "\n"
            for job_id in ("fine", long_id, vast_id)
        )
    )
    run = run_lifeline("batch", "--nats-url", url, str(ids_refused))
    assert run.returncode == 2, run.stderr  # both named, before anything is submitted
    assert "ids.jsonl:2: invalid request: Expected `str` of length <= 256 - at `$.id`" in run.stderr
    assert "ids.jsonl:3: invalid request: Expected `str` of length <= 256" in run.stderr
    assert "nothing was submitted" in run.stderr and not (tmp_path / "ids.results.jsonl").exists()
    lines = [
        json.dumps(
            {"id": "sep", "messages": [{"role": "user", "content": "a\u2028b"}]}, ensure_ascii=False
        ),
        json.dumps({"messages": [{"role": "user", "content": "no id"}]}),
        json.dumps({"id": "huge", "messages": [{"role": "user", "content": "x" * 1_100_000}]}),
        json.dumps({"id": "last", "messages": [{"role": "user", "content": "q"}]}),
    ]
    results = {}
    for team in ("billing", "support"):
        folder = tmp_path / team
        folder.mkdir()
        source = folder / "jobs.jsonl"
        source.write_text(
            "\r\n".join([*lines, json.dumps({"messages": [{"role": "user", "content": team}]})])
            + "\r\n",
            encoding="utf-8",
        )
        run = run_lifeline("batch", "--nats-url", url, str(source))
        assert run.returncode == 1, run.stderr  # failed: the huge job
        assert "5/5 done, 1 failed, 0 in flight" in run.stderr, run.stderr  # never below 0
        out = folder / "jobs.results.jsonl"
        results[team] = [json.loads(line) for line in out.read_text().split("\n") if line]
    by_id = {r["id"]: r for r in results["billing"]}
    assert by_id["sep"]["content"] == "a\u2028b"
    assert by_id["huge"]["error"]["type"] == "payload_too_large"
    # Lines without an id: each folder's file got its own answers, not the other's (the same
    # line at the same place in both: one job each, told apart by the file's full path).
    nameless = [r for r in results["billing"] if r.get("content") == "no id"]
    assert len(nameless) == 1 and nameless[0]["trace_id"] not in {
        r["trace_id"] for r in results["support"]
    }
    assert [r["content"] for r in results["support"] if r["id"].startswith("jobs.jsonl:5:")] == [
        "support"
    ]
    # A crash cut the last line in two: the rerun writes that job's line again, whole.
    out = tmp_path / "support" / "jobs.results.jsonl"
    text = out.read_text()
    out.write_text(text[: text.rstrip("\n").rfind("\n") + 1] + text.rstrip("\n")[-40:][:20])
    again = run_lifeline("batch", "--nats-url", url, str(tmp_path / "support" / "jobs.jsonl"))
    assert "1/1 done" in again.stderr and "4 had results" in again.stderr, again.stderr
    third = run_lifeline("batch", "--nats-url", url, str(tmp_path / "support" / "jobs.jsonl"))
    assert third.returncode == 1 and "all 5 jobs" in third.stdout, third.stderr
    assert third.stdout.rstrip().endswith(", 1 failed"), third.stdout
    assert len([line for line in out.read_text().split("\n") if line.startswith("{")]) >= 5


def test_batch_reads_a_file_that_starts_with_a_byte_order_mark(running, tmp_path):
    """As Windows tools write UTF-8 (PowerShell's Out-File, older Notepad): its first line was
    "not JSON" and the run stopped before sending anything."""
    _, url = running
    source = tmp_path / "bom.jsonl"
    line = json.dumps({"id": "bom-1", "messages": [{"role": "user", "content": "hi"}]})
    source.write_text(line + "\n", encoding="utf-8-sig")
    run = run_lifeline("batch", "--nats-url", url, str(source))
    assert run.returncode == 0, run.stderr
    [result] = (tmp_path / "bom.results.jsonl").read_text().splitlines()
    assert json.loads(result)["id"] == "bom-1"


def test_batch_on_an_inbox_no_dispatcher_publishes_to_stops_before_sending_anything(
    running, tmp_path
):
    """Each result is pushed to the run's inbox, and asked for there: under an inbox prefix
    a dispatcher never publishes to (the dispatchers' own, set in a config both share; one of
    Lifeline's or the server's), the batch sent every job, waited its whole --timeout (10
    minutes by default) for nothing, and said to rerun, which did the same."""
    _, url = running
    source = tmp_path / "jobs.jsonl"
    source.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    for prefix in (subjects.DISPATCHER_INBOX_PREFIX, "llm.mine"):
        run = run_lifeline(
            "batch", "--nats-url", url, "--nats-inbox-prefix", prefix, "--timeout", "3", str(source)
        )
        assert run.returncode == 2, run.stderr
        assert f"inbox prefix {prefix!r}" in run.stderr, run.stderr
        assert not (tmp_path / "jobs.results.jsonl").exists()  # nothing sent, nothing written


def test_ask_exits_non_zero_and_explains_an_error_reply(running):
    _, url = running
    result = run_lifeline("ask", "--nats-url", url, "--route", "nope", "hi")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "unknown_route" in result.stderr and "'default'" in result.stderr


def test_dispatcher_and_worker_run_as_separate_processes(nats_url):
    procs = [
        spawn_lifeline(
            *args,
            "--config",
            EXAMPLE,
            "--nats-url",
            nats_url,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for args in (["worker", "backup"], ["dispatcher"])
    ]
    try:
        for proc, ready in zip(procs, ("worker backup serving", "dispatcher serving")):
            wait_for_line(proc, ready, stream=proc.stderr)  # subscribed: both log it after
        result = run_lifeline(
            "ask", "--nats-url", nats_url, "--target", "backup", "--timeout", "10", "ping"
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "served by backup" in result.stderr
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(timeout=15) for proc in procs] == [0, 0]
        for proc in procs:
            proc.stderr and proc.stderr.close()


def test_a_bad_config_fails_at_start_up_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[providers.a]\nkind = "fake"\ntimeout_s = "soon"\n')
    result = run_lifeline("dispatcher", "--config", str(bad), "--nats-url", "nats://127.0.0.1:1")
    assert result.returncode == 2
    assert "providers.a.timeout_s" in result.stderr


def test_a_bad_policy_key_fails_at_start_up_naming_it(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[providers.a]\nkind = "fake"\n\n[templates.terse]\nuser = "Be terse."\n\n'
        '[routes.default]\ntargets = [{ provider = "a", template = "terse" }]\n'
    )
    result = run_lifeline("dispatcher", "--config", str(bad), "--nats-url", "nats://127.0.0.1:1")
    assert result.returncode == 2
    assert "templates.terse: `user` must contain {input}" in result.stderr


def test_ask_can_simulate_a_fault_and_show_the_retry(tmp_path, nats_url):
    cfg = tmp_path / "faults.toml"
    cfg.write_text(
        "[dispatcher]\nallow_fault_injection = true\n\n"
        '[providers.a]\nkind = "fake"\nreply = "from a"\n\n'
        '[routes.default]\ntargets = [{ provider = "a", retries = 1, backoff_s = 0 }]\n'
    )
    proc = spawn_lifeline(
        "run",
        "--config",
        str(cfg),
        "--nats-url",
        nats_url,
        "--quiet",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_line(proc, r"dispatcher ready")
        result = run_lifeline("ask", "--nats-url", nats_url, "--fault", "a=503,ok", "hi")
        assert result.returncode == 0, result.stdout + result.stderr
        assert re.search(r"1\. a .* server_error 503->retry", result.stderr)
        assert re.search(r"2\. a \(retry 1\) .* ok", result.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        for stream in (proc.stdout, proc.stderr):
            stream and stream.close()


def test_a_worker_without_its_api_key_says_which_variable_to_set(tmp_path):
    cfg = tmp_path / "openai.toml"
    cfg.write_text(
        '[providers.gpt]\nkind = "openai"\nmodel = "gpt-4o-mini"\n'
        'api_key_env = "LIFELINE_TEST_KEY"\n'
    )
    result = run_lifeline("worker", "gpt", "--config", str(cfg), "--nats-url", "nats://127.0.0.1:1")
    assert result.returncode == 2
    assert "LIFELINE_TEST_KEY" in result.stderr


def test_ask_without_a_server_says_how_to_start_one_in_one_line():
    result = run_lifeline("ask", "--nats-url", "nats://127.0.0.1:1", "hi")
    assert result.returncode != 0
    [line] = result.stderr.splitlines()  # no log line per retry, no traceback
    assert line.startswith("lifeline: cannot reach NATS") and "lifeline run" in line


def test_a_missing_api_key_is_named_by_check_config_and_by_the_worker(tmp_path):
    cfg = tmp_path / "keys.toml"
    cfg.write_text('[providers.primary]\nkind = "openai"\nmodel = "gpt-4o-mini"\n')
    env = {k: v for k, v in cli_env().items() if k != "OPENAI_API_KEY"}
    checked = run_lifeline("check-config", "--config", str(cfg), env=env)
    assert checked.returncode == 0  # the file is right; the environment here is not
    assert "warning: providers.primary: $OPENAI_API_KEY is not set" in checked.stderr
    worker = run_lifeline("worker", "primary", "--config", str(cfg), env=env)
    assert worker.returncode == 2
    assert "providers.primary: " in worker.stderr and "OPENAI_API_KEY" in worker.stderr


@pytest.mark.parametrize("command", ["check-config", "nats-config"])
def test_config_warnings_under_json_logs_are_json_records_like_every_other_line(tmp_path, command):
    """They were plain "warning: ..." lines among the JSON ones, which a log shipper could not
    parse; each of the six is said (a place in the code writes at most five log lines in 10 s)."""
    routes = "".join(
        f'[routes.alone{n}]\ntargets = ["primary"]\nhedge_after_ms = 5\n' for n in range(6)
    )
    cfg = tmp_path / "warned.toml"
    cfg.write_text(f'[providers.primary]\nkind = "openai"\nmodel = "gpt-4o-mini"\n{routes}')
    env = {k: v for k, v in cli_env(LIFELINE_LOG_FORMAT="json").items() if k != "OPENAI_API_KEY"}
    result = run_lifeline(command, "--config", str(cfg), env=env)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]  # every line JSON
    warned = [r["message"] for r in records if r["level"] == "WARNING"]
    hedges = [m for m in warned if "so no hedge can start beside it" in m]
    assert sorted(m.partition(".")[2][:6] for m in hedges) == [f"alone{n}" for n in range(6)]
    if command == "check-config":  # its own: the environment it checks the config in
        assert "providers.primary: $OPENAI_API_KEY is not set here" in " ".join(warned)


def test_check_config_shows_groups_and_error_class_chains(tmp_path):
    cfg = tmp_path / "groups.toml"
    cfg.write_text(
        '[providers.a]\nkind = "fake"\n[providers.b]\nkind = "fake"\n'
        '[providers.c]\nkind = "fake"\n\n[routes.default]\n'
        'targets = [{ group = [{ provider = "a", weight = 3 }, "b"] }, "c"]\n'
        'context_length_fallbacks = ["b"]\n'
    )
    result = run_lifeline("check-config", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    assert "{a x3 | b} -> c" in result.stdout
    assert "on context_length: b" in result.stdout


# A plug-in model whose constructor checks its settings; it notes being made and closed.
PICKY_MODEL = """
import os
import msgspec
from workers.plugin import Model

class Picky(Model):
    class Settings(msgspec.Struct):
        weights: str

    def __init__(self, settings):
        super().__init__(settings)
        if not os.path.exists(settings.weights):
            raise FileNotFoundError(f"no weights at {settings.weights}")
        self.note = settings.weights + ".log"
        with open(self.note, "a") as note:
            note.write("made\\n")

    def call(self, request):
        return "picked"

    def close(self):
        with open(self.note, "a") as note:
            note.write("closed\\n")
"""


def test_check_config_makes_each_plug_in_model_as_its_worker_would(tmp_path):
    """A model class whose constructor refused its settings passed check-config, which only
    imported it; `lifeline run` then failed. It is made, and closed, as its worker makes it."""
    (tmp_path / "picky_model.py").write_text(PICKY_MODEL)
    weights = tmp_path / "weights.bin"
    cfg = tmp_path / "picky.toml"
    cfg.write_text(
        '[providers.picky]\nkind = "python"\nclass = "picky_model:Picky"\n'
        f'settings = {{ weights = "{weights}" }}\n'
        '[routes.default]\ntargets = ["picky"]\n'
    )
    env = cli_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    refused = run_lifeline("check-config", "--config", str(cfg), env=env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr, refused.stderr
    assert (
        "providers.picky: picky_model:Picky could not be made (FileNotFoundError: no weights at "
        f"{weights})"
    ) in refused.stderr
    weights.write_bytes(b"")
    checked = run_lifeline("check-config", "--config", str(cfg), env=env)
    assert checked.returncode == 0, checked.stderr
    assert Path(f"{weights}.log").read_text().split() == ["made", "closed"]


def test_run_on_a_taken_port_says_so_in_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_lifeline("run", "--port", str(port), "--config", EXAMPLE)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()  # the hint, not the server's log
    assert f"port {port} is taken" in line and "--port -1" in line


@pytest.mark.parametrize(
    ("stream", "stop"),
    [
        (False, signal.SIGINT),
        (True, signal.SIGINT),
        (False, signal.SIGTERM),  # timeout(1), a cancelled CI job: it was killed, not aborted
        (True, signal.SIGHUP),  # its terminal closed: the same
    ],
    ids=["ask-ctrl-c", "ask --stream-ctrl-c", "ask-sigterm", "ask --stream-sighup"],
)
async def test_ask_stopped_by_ctrl_c_or_a_signal_aborts_its_request_at_the_dispatcher(
    running, stream, stop
):
    """A user who gives up on `lifeline ask` (Ctrl-C, or SIGTERM or SIGHUP) stops the provider
    call too: the dispatcher answers the request `aborted` at once instead of after slowpoke's
    1.5 s."""
    _, url = running
    nc = await nats.connect(url)
    try:
        attempts = await nc.subscribe(subjects.provider_subject("slowpoke"))  # a spy beside it
        audit = await nc.subscribe(subjects.AUDIT_ALL)
        await ensure_subscribed(nc)
        args = ["ask", "--nats-url", url, "--target", "slowpoke", "hi"]
        if stream:
            args.insert(1, "--stream")
        ask = spawn_lifeline(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            attempt = await attempts.next_msg(timeout=20)  # the request is at the worker: Ctrl-C
            ask.send_signal(stop)
            code = await asyncio.to_thread(ask.wait, 10)
        finally:
            if ask.poll() is None:
                ask.kill()
            out, err = ask.communicate()
        assert code == 128 + stop, (code, out, err)
        # Its own event: jobs the tests before left running can still be audited meanwhile.
        request_id = attempt.headers[subjects.REQUEST_ID]
        event = audit_decoder.decode((await audit.next_msg(timeout=5)).data)
        while event.id != request_id:
            event = audit_decoder.decode((await audit.next_msg(timeout=5)).data)
        assert (event.status, event.error_type) == ("error", "aborted"), (event, out, err)
    finally:
        await nc.close()


def test_ask_refuses_a_midstream_policy_without_a_stream():
    """It was ignored without a word: the answer came whole, the policy never applied."""
    refused = run_lifeline("ask", "--on-midstream", "fail", "hi")
    assert refused.returncode == 2 and "add --stream" in refused.stderr


def test_audit_prints_what_another_client_wrote_without_its_escape_sequences(running):
    """Anyone who may publish on llm.audit.> writes what `lifeline audit` prints: an id with a
    terminal escape sequence (or a raw C1 control, in --json) reached the terminal as is, and
    one with a line break printed a second, forged, event line (so did `lifeline run`)."""
    _, url = running
    event = {
        "id": "\x1b]0;pwned\x07\u009b2J\n2026-01-01T00:00:00.000Z [ok] id=forged",
        "status": "ok",
        **dict.fromkeys(("route", "provider", "model", "trace_id")),
        "attempts": [],
        "latency_ms": 1.0,
        "ts_unix_ms": 1,
    }

    async def publish() -> None:
        nc = await nats.connect(url)
        await nc.publish("llm.audit.ok", json.dumps(event, ensure_ascii=False).encode())
        await nc.flush()
        await nc.close()

    asyncio.run(publish())
    for json_output in ((), ("--json",)):
        audit = run_lifeline("audit", "--nats-url", url, "--last", "1", *json_output)
        assert audit.returncode == 0, audit.stderr
        assert "\x1b" not in audit.stdout and "\u009b" not in audit.stdout
        assert "pwned" in audit.stdout and len(audit.stdout.splitlines()) == 1, audit.stdout


def test_the_start_banner_suggests_an_ask_the_config_can_answer(capsys):
    """It always suggested the route "default": a config without one got unknown_route."""
    from service.cli import LOCAL_NATS, _print_started
    from service.config import parse_config

    for routes, expected in (
        ({"main": {"targets": ["solo"]}}, "ask --route main "),
        ({}, "ask --target solo "),
        ({"default": {"targets": ["solo"]}}, 'ask "Why'),
    ):
        _print_started(parse_config({"providers": {"solo": fake()}, "routes": routes}), LOCAL_NATS)
        assert expected in capsys.readouterr().out


def _slow_config(tmp_path) -> str:
    from helpers import config, write_config

    return str(write_config(tmp_path / "slow.toml", config({"slow": fake(latency_ms=1500)})))


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
def test_a_closed_terminal_stops_a_dispatcher_as_sigterm_does_its_requests_answered(
    nats_url, tmp_path, sig
):
    """SIGHUP (the terminal `lifeline run` ran in closed) killed every serving command
    outright: its requests in flight got no reply and no audit event."""
    path = _slow_config(tmp_path)
    procs = [
        spawn_lifeline(*args, "--config", path, "--nats-url", nats_url, stderr=subprocess.PIPE)
        for args in (["worker", "slow"], ["dispatcher"])
    ]
    try:
        for proc, ready in zip(procs, ("worker slow serving", "dispatcher serving")):
            wait_for_line(proc, ready, stream=proc.stderr)

        async def ask_then_stop() -> Any:
            nc = await nats.connect(nats_url)
            try:
                asked = asyncio.ensure_future(
                    nc.request(
                        subjects.COMPLETE,
                        b'{"messages": [{"role": "user", "content": "hi"}]}',
                        timeout=10,
                    )
                )
                await asyncio.sleep(0.5)  # the call is at the worker
                procs[1].send_signal(sig)
                return json.loads((await asked).data)
            finally:
                await nc.close()

        reply = asyncio.run(ask_then_stop())
        assert reply["status"] == "ok" and reply["content"] == "hi"
        assert procs[1].wait(timeout=15) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)
            proc.stderr and proc.stderr.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_while_waiting_for_nats_stops_at_once(sig):
    """A dispatcher waiting for a NATS server that is not there has taken nothing, so has
    nothing to finish: one SIGTERM stops it. It waited for a second, and `docker stop` (or
    any supervisor) killed it after its grace, 10 s later. It exits 128 + the signal, as a
    client command does (SIGTERM exited 130, Ctrl-C's status)."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    proc = spawn_lifeline(
        "dispatcher",
        "--config",
        EXAMPLE,
        "--nats-url",
        f"nats://127.0.0.1:{port}",
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_line(
            proc, r"NATS at .* retrying|ConnectionRefused|Connect call failed", stream=proc.stderr
        )
        proc.send_signal(sig)
        assert proc.wait(timeout=5) == 128 + sig
        assert proc.stderr is not None
        assert f"{sig.name} while waiting for NATS: stopping now" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr and proc.stderr.close()


@contextlib.contextmanager
def silent_nats() -> Iterator[tuple[str, threading.Event]]:
    """A NATS server that lets one client connect, then answers nothing more: the client is
    connected and starting for as long as it waits for its answers. The event: it has sent
    something since connecting (its connect call has returned)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    connected = threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                info = {"server_id": "silent", "proto": 1, "headers": True, "max_payload": 1 << 20}
                conn.sendall(b"INFO " + json.dumps(info).encode() + b"\r\n")
                heard = b""
                while b"PING\r\n" not in heard:  # its CONNECT, then the PING it waits on
                    heard += conn.recv(4096) or b"PING\r\n"
                conn.sendall(b"PONG\r\n")
                if conn.recv(4096):  # what it sends once connected: a SUB, say
                    connected.set()
                while conn.recv(4096):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"nats://127.0.0.1:{port}", connected
    finally:
        listener.close()


def test_a_stop_signal_once_connected_waits_for_the_start_and_a_second_one_stops_at_once():
    """A dispatcher connected and starting (subscribing, its buckets): the first SIGTERM says
    it stops once started, so the requests it takes meanwhile are answered; a second stops it
    now (before, the first killed it outright, subscribed already, its requests unanswered)."""
    with silent_nats() as (url, connected):
        proc = spawn_lifeline(
            "dispatcher", "--config", EXAMPLE, "--nats-url", url, stderr=subprocess.PIPE
        )
        try:
            assert connected.wait(15)
            proc.send_signal(signal.SIGTERM)
            wait_for_line(proc, "SIGTERM while starting: stopping once started", stream=proc.stderr)
            assert proc.poll() is None  # still starting: it has heard nothing from its server
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 128 + signal.SIGTERM
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr and proc.stderr.close()


# A sitecustomize that holds one import ($HOLD_IMPORT) until a Ctrl-C comes, saying so first.
# The signal is blocked from before it says so: one that came before pause() (a handler that
# does not raise, asyncio.Runner's) was handled there, and pause() waited for ever.
HOLD_IMPORT = """
import os, signal, sys

class Hold:
    def find_spec(self, name, path=None, target=None):
        if name == os.environ.get("HOLD_IMPORT"):
            sys.meta_path.remove(self)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            print("holding the import of", name, file=sys.stderr, flush=True)
            signal.sigwait({signal.SIGINT})
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            signal.raise_signal(signal.SIGINT)  # its handler runs here, within the import
        return None

sys.meta_path.insert(0, Hold())
"""


@pytest.mark.parametrize(
    ("module", "args"),
    [
        ("msgspec", ["check-config"]),  # one of the service.cli module's own imports
        ("resource", ["gateway", "--port", "0"]),  # main()'s, before a serving command's loop
        ("service.config", ["check-config"]),  # a command's own, once its loop runs
    ],
)
def test_a_ctrl_c_while_starting_exits_130_without_a_traceback(tmp_path, module, args):
    """A Ctrl-C while `lifeline` still imported its modules (most of a start) printed Python's
    traceback through the import under way. The console script, as a user runs it."""
    script = Path(sys.executable).parent / "lifeline"
    if not script.exists():
        pytest.skip("the `lifeline` console script is not installed (make install)")
    (tmp_path / "sitecustomize.py").write_text(HOLD_IMPORT)
    env = cli_env(HOLD_IMPORT=module)
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    proc = subprocess.Popen(
        [str(script), *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _, before = wait_for_line(proc, f"holding the import of {module}", stream=proc.stderr)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    err = "".join(before) + err
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_a_process_that_imports_the_cli_keeps_its_own_ctrl_c():
    """Importing service.cli (a test, a plug-in's host) set Lifeline's hook for the whole
    process: a Ctrl-C it did not catch ended it at once, exit 130, without its traceback and
    without running its atexit handlers."""
    code = (
        "import atexit, service.cli; atexit.register(print, 'cleaned up', flush=True); "
        "raise KeyboardInterrupt"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=cli_env(),
        check=False,  # a KeyboardInterrupt's exit
    )
    assert done.stdout == "cleaned up\n", done
    assert "Traceback" in done.stderr and done.stderr.rstrip().endswith("KeyboardInterrupt")


def test_run_whose_reader_has_gone_still_stops_cleanly(own_run):
    """`lifeline run | head`: the reader gone, its status lines on stop ("shutting down",
    "stopped") raised BrokenPipeError, which made a clean stop exit 1 and skipped draining
    the line-per-request watcher (whose cut connection was then logged as a slow consumer)."""
    proc, _ = own_run
    assert proc.stdout is not None
    proc.stdout.close()  # as `head` does once it has its lines
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=15) == 0
    assert proc.stderr is not None
    assert "slow consumer" not in proc.stderr.read()


NO_THREADS = """
import sys, threading
def refuse(self):  # what pthread_create's EAGAIN becomes in Python
    raise RuntimeError("can't start new thread")
threading.Thread.start = refuse
from service.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_process_that_cannot_start_a_thread_says_which_limit_to_raise():
    """At a pids limit (ulimit -u, a container's), start-up ended in a traceback."""
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-c",
            NO_THREADS,
            "dispatcher",
            "--config",
            EXAMPLE,
            "--nats-url",
            "nats://127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=cli_env(),
        check=False,
    )
    assert done.returncode == 1 and "ulimit -u" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_ask_shows_a_slow_requests_progress_while_it_falls_back(tmp_path):
    """Without --stream, `ask` showed nothing until the reply while a route fell back past a
    hung target. Every heartbeat (2 s) now prints how long it has run and the attempts that
    failed so far on stderr; stdout keeps the answer alone."""
    write_config(
        tmp_path / "lifeline.toml",
        config({"hung": fake(hang=True, timeout_s=2.2), "backup": fake(latency_ms=4000)}),
    )
    run = LifelineProcess(
        ["run", "--config", "lifeline.toml", "--port", "-1", "--no-gateway"],
        tmp_path / "run.log",
        cwd=tmp_path,
    )
    try:
        run.wait_for_log(r"dispatcher ready")
        url = re.search(r"nats://[\d.]+:\d+", run.log()).group(0)  # type: ignore[union-attr]
        asked = run_lifeline("ask", "--nats-url", url, "still there?", cwd=tmp_path)
    finally:
        run.stop()
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout == "still there?\n"
    progress = [line for line in asked.stderr.splitlines() if line.startswith("... ")]
    assert re.fullmatch(r"\.\.\. [23] s(, so far: hung timeout->fallback)?", progress[0]), progress
    assert re.fullmatch(r"\.\.\. [45] s, so far: hung timeout->fallback", progress[1]), progress


def test_run_stops_with_exit_1_when_its_embedded_nats_server_dies(tmp_path):
    """Killed (the OOM killer, a stray kill), the server was never started again, and `lifeline
    run` stayed up, every connection retrying for ever, its /healthz 200: no supervisor would
    restart it."""
    run = LifelineProcess(["run", "--port", "-1", "--no-gateway"], tmp_path / "run.log")
    try:
        run.wait_for_log(r"dispatcher ready")
        children = Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()
        [server] = [c for c in children if "nats-server" in Path(f"/proc/{c}/cmdline").read_text()]
        os.kill(int(server), signal.SIGKILL)
        assert run.proc.wait(timeout=30) == 1
        assert "the embedded nats-server exited (-9)" in run.log()
    finally:
        run.stop()


@pytest.mark.parametrize("command", [["worker", "p"], ["dispatcher"], ["run"]])
def test_a_health_port_in_use_is_refused_before_anything_starts(command, tmp_path):
    """The probes' port was bound after the component had connected and logged "serving": a
    port in use stopped the process (exit 2) only once NATS was reachable, after a "serving"
    line, and with NATS down the process waited for it without a word. It is bound first."""
    config_path = tmp_path / "lifeline.toml"
    config_path.write_text('[providers.p]\nkind = "fake"\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_lifeline(
            *command,
            "--config",
            str(config_path),
            "--health-port",
            f"127.0.0.1:{port}",
            "--nats-url",
            "nats://127.0.0.1:1",  # nobody there: a process that connects first waits for good
            timeout_s=20,
        )
    assert result.returncode == 2, result
    assert f"--health-port 127.0.0.1:{port}: cannot listen there" in result.stderr
    assert "serving" not in result.stderr and "Traceback" not in result.stderr


def test_check_config_of_providers_without_routes_says_requests_must_name_their_targets(tmp_path):
    """A plug-in's config as the README writes it (providers, no route) passed check-config
    silently; a request without `targets` then met `unknown_route` at run time."""
    cfg = tmp_path / "noroutes.toml"
    cfg.write_text('[providers.shouty]\nkind = "fake"\n[providers.calm]\nkind = "fake"\n')
    result = run_lifeline("check-config", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    [warned] = [line for line in result.stderr.splitlines() if "route" in line]
    assert warned.startswith("warning: ") and "targets" in warned, warned
    assert "'calm'" in warned and "'shouty'" in warned, warned


def _probe(proc: LifelineProcess, url: str, until: Any) -> Any:
    """GET `url` again and again (the process may not listen yet) until the answer passes
    `until`; the last answer, or the test fails once 30 s pass or the process has exited."""
    answer = None
    for _ in range(300):
        assert proc.proc.poll() is None, proc.log()[-3000:]
        with contextlib.suppress(httpx.TransportError):
            answer = httpx.get(url, timeout=5)
            if until(answer):
                return answer
        threading.Event().wait(0.1)
    raise AssertionError(f"{url}: last answered {answer and answer.text}; log:\n{proc.log()}")


@pytest.mark.parametrize("command", [["worker", "p"], ["dispatcher"], ["run", "--no-gateway"]])
def test_a_process_waiting_for_nats_is_live_not_ready_and_ready_once_connected(command, tmp_path):
    """The probes are bound before the process connects, for the components that join them as
    they start: while NATS is away /healthz says 200 and /readyz 503 with no component; once
    NATS comes, /readyz says 200 for the process's components."""
    config_path = tmp_path / "lifeline.toml"
    config_path.write_text('[providers.p]\nkind = "fake"\n')
    health = f"http://127.0.0.1:{free_port()}"
    server = EmbeddedNats(port=free_port())
    proc = LifelineProcess(
        [*command, "--config", str(config_path), "--health-port", health.removeprefix("http://")]
        + ["--nats-url", server.url],
        tmp_path / "lifeline.log",
    )
    try:
        _probe(proc, f"{health}/healthz", lambda answer: answer.status_code == 200)
        waiting = httpx.get(f"{health}/readyz", timeout=5)
        assert (waiting.status_code, waiting.json()["components"]) == (503, [])
        server.start()
        ready = _probe(proc, f"{health}/readyz", lambda answer: answer.status_code == 200)
        names = {component["name"] for component in ready.json()["components"]}
        expected = {"worker": {"lifeline-worker-p"}, "dispatcher": {"lifeline-dispatcher"}}
        assert names == expected.get(command[0], {"lifeline-dispatcher", "lifeline-worker-p"})
    finally:
        proc.stop()
        server.stop()
