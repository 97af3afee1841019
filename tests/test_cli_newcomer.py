"""The `lifeline` command as a newcomer meets it, README in hand: outside a checkout, a job
not there yet, a batch run again, a request given up on. Real processes, a real nats-server."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import msgspec
import nats
import pytest
from helpers import (
    LIFELINE,
    ROOT,
    cli_env,
    config,
    fake,
    free_port,
    run_lifeline,
    spawn_lifeline,
    wait_for_line,
)

from schemas import subjects
from schemas.wire import AuditEvent, CompletionReply, CompletionRequest, StreamStats
from service import cli
from service.natsio import ensure_subscribed


def lifeline_in(folder: Path, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess:
    """`lifeline <args>` to its end, run from `folder` (not the checkout), output captured."""
    return subprocess.run(
        [*LIFELINE, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=folder,
        env=cli_env(),
    )


# ---- outside a checkout: the example config installed with Lifeline ----------------------


def test_commands_that_read_the_default_config_find_the_installed_example(tmp_path):
    """From a folder without lifeline.example.toml only `run` found the installed copy;
    check-config and nats-config said "no such file" (exit 2), though --help names it."""
    checked = lifeline_in(tmp_path, "check-config")
    assert checked.returncode == 0, checked.stderr
    assert re.search(r"example\.toml: OK", checked.stdout)
    assert re.search(r"route +default +flaky -> sleepy -> backup", checked.stdout)
    permissions = lifeline_in(tmp_path, "nats-config")
    assert permissions.returncode == 0, permissions.stderr
    assert "llm.provider.flaky" in permissions.stdout  # the example's providers, each a user
    # A --config named that is not there is still a mistake, even the example's name.
    named = lifeline_in(tmp_path, "check-config", "--config", "lifeline.example.toml")
    assert named.returncode == 2 and "no such file" in named.stderr


def test_serving_commands_outside_a_checkout_run_the_installed_example(tmp_path, nats_url):
    """dispatcher, worker, gateway and health --expect-all, from a folder without the file."""
    health = lifeline_in(tmp_path, "health", "--expect-all", "--nats-url", nats_url)
    assert health.returncode == 1  # nothing runs yet; but it knows what should
    assert re.search(r"MISSING +lifeline-worker-backup", health.stdout), health.stdout
    servers = {
        "dispatcher": spawn_lifeline(
            "dispatcher", "--nats-url", nats_url, cwd=tmp_path, stderr=subprocess.PIPE
        ),
        "worker": spawn_lifeline(
            "worker", "backup", "--nats-url", nats_url, cwd=tmp_path, stderr=subprocess.PIPE
        ),
        "gateway": spawn_lifeline(
            "gateway",
            "--port",
            "0",
            "--nats-url",
            nats_url,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ),
    }
    try:
        wait_for_line(
            servers["dispatcher"], r"dispatcher serving", stream=servers["dispatcher"].stderr
        )
        wait_for_line(servers["worker"], r"worker backup serving", stream=servers["worker"].stderr)
        line, _ = wait_for_line(servers["gateway"], r"OpenAI-compatible gateway on")
        assert "model: a route (default, strict," in line, line  # its routes, listed
        assert "or an alias (gpt-4o-mini, gpt-4.1);" in line, line  # and the example's aliases
    finally:
        for proc in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc in servers.values():
            proc.wait(timeout=15)
            for stream in (proc.stdout, proc.stderr):
                stream and stream.close()
    assert [proc.returncode for proc in servers.values()] == [0, 0, 0]


@pytest.mark.parametrize("command", [["run", "--port", "-1"], ["ask", "hi"]], ids=["run", "ask"])
def test_a_config_not_there_says_where_it_was_looked_for(tmp_path, command):
    """`--config mine.toml` that is not there said "no such file (pass --config, ...)" to
    someone who had: the folder a relative name was looked for in is what they need."""
    missing = lifeline_in(tmp_path, *command, "--config", "mine.toml")
    assert missing.returncode == 2, missing
    assert f"mine.toml: no such file in {tmp_path}\n" in missing.stderr, missing.stderr
    assert "pass --config" not in missing.stderr


# ---- result: what "no result" means, and --wait ------------------------------------------


def test_no_result_yet_says_why_there_may_be_none_and_what_to_do(tmp_path, nats_url):
    missing = lifeline_in(tmp_path, "result", "--nats-url", nats_url, "j2")
    assert missing.returncode == 3
    said = missing.stderr
    assert "no result for job 'j2' (yet)" in said, said
    assert "not submitted" in said and "waiting for a dispatcher" in said
    assert "jobs.results_ttl_s" in said and "--wait" in said
    waited = lifeline_in(tmp_path, "result", "--nats-url", nats_url, "--wait", "0.2", "j2")
    assert waited.returncode == 3 and "waited 0.2 s" in waited.stderr, waited.stderr


def test_result_wait_takes_0_or_more_seconds_and_says_so():
    negative = lifeline_in(Path.cwd(), "result", "--wait", "-5", "j2")
    assert negative.returncode == 2
    assert "-5 is not a number of seconds, 0 or more" in negative.stderr, negative.stderr


def test_help_gives_the_defaults_of_wait_and_timeout(capsys):
    for command in (["result", "--help"], ["submit", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(command)
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps its lines
    assert "wait this long for it (default: 0" in shown
    assert "seconds for the job once it runs (default:" in shown


# ---- batch: a rerun's exit status is the first run's --------------------------------------


async def test_a_batch_rerun_counts_the_failed_results_it_finds(tmp_path, nats_url, lifeline):
    await lifeline(config({"echo": fake()}))
    source = tmp_path / "jobs.jsonl"
    lines = [
        {"id": "j1", "messages": [{"role": "user", "content": "one"}]},
        {"id": "j2", "route": "nope", "messages": [{"role": "user", "content": "two"}]},
        {"id": "j3", "messages": [{"role": "user", "content": "three"}]},
    ]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    batch = ("batch", "--nats-url", nats_url, str(source))
    first = await asyncio.to_thread(lifeline_in, tmp_path, *batch)
    assert first.returncode == 1 and "3/3 done, 1 failed" in first.stderr, first.stderr
    again = await asyncio.to_thread(lifeline_in, tmp_path, *batch)
    assert again.returncode == 1, again
    assert "all 3 jobs of" in again.stdout and "have results" in again.stdout
    assert again.stdout.rstrip().endswith(", 1 failed"), again.stdout
    # Resumed with j3's result lost: j3 is answered again, and j2's error still counts.
    out = tmp_path / "jobs.results.jsonl"
    kept = [line for line in out.read_text().splitlines() if json.loads(line)["id"] != "j3"]
    out.write_text("\n".join(kept) + "\n")
    resumed = await asyncio.to_thread(lifeline_in, tmp_path, *batch)
    assert resumed.returncode == 1, resumed
    assert "1/1 done, 0 failed" in resumed.stderr
    assert "1 job failed in an earlier run" in resumed.stdout, resumed.stdout


# ---- ask given up on -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "stop"),
    [(False, signal.SIGTERM), (True, signal.SIGINT)],
    ids=["ask-sigterm", "ask --stream-ctrl-c"],
)
async def test_ask_stopped_says_its_request_was_aborted(nats_url, lifeline, stream, stop):
    """It exited 130 or 143 without a word: was the request left running, paid for?"""
    await lifeline(config({"hung": fake(hang=True)}))
    nc = await nats.connect(nats_url)
    try:
        attempts = await nc.subscribe(subjects.provider_subject("hung"))  # a spy beside it
        await ensure_subscribed(nc)
        args = ["ask", "--nats-url", nats_url, "--timeout", "20", "hi"]
        if stream:
            args.insert(1, "--stream")
        ask = spawn_lifeline(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            attempt = await attempts.next_msg(timeout=20)  # the request is at the worker
            ask.send_signal(stop)
            code = await asyncio.to_thread(ask.wait, 10)
        finally:
            if ask.poll() is None:
                ask.kill()
            _, err = ask.communicate()
    finally:
        await nc.close()
    assert code == 128 + stop, err
    request_id = attempt.headers[subjects.REQUEST_ID]
    assert f"request {request_id} aborted at its dispatcher" in err, err


# ---- counts in words: 1 reset, 2 resets ----------------------------------------------------


def test_counts_of_one_are_singular(capsys):
    stats = StreamStats(ttft_ms=0.9, chunks=21, resets=1)
    cli._print_reply(CompletionReply("r1", "ok", content=None, stream=stats))
    assert "streamed 21 chunks, first after 0.9 ms, 1 reset\n" in capsys.readouterr().err
    event = AuditEvent("r1", "ok", "default", "p", "m", [], 1.0, None, 0, stream=stats)
    assert cli._audit_line(event).endswith("streamed 21 chunks, 1 reset")
    one_chunk = StreamStats(ttft_ms=1.0, chunks=1, resets=2)
    assert cli._audit_line(
        AuditEvent("r2", "ok", None, "p", "m", [], 1.0, None, 0, stream=one_chunk)
    ).endswith("streamed 1 chunk, 2 resets")


# ---- help --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "ask", "conformance"])
def test_help_describes_the_command_and_names_each_value(capsys, command):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    shown = capsys.readouterr().out
    usage, _, rest = shown.partition("\n\n")
    assert rest.split("\n\n")[0].strip() and not rest.startswith(("positional", "options"))
    # Each option's value named for what it is: PORT, SECONDS, N, not its own name in capitals.
    assert not re.search(r"--[a-z-]+ (GATEWAY_PORT|TIMEOUT|MAX_TOKENS|TARGETS|SYSTEM)\b", usage)
    if command == "conformance":  # the first example runs on a fresh clone
        assert "npm ci --prefix workers/examples/node" in shown.split("examples:")[1]


@pytest.mark.parametrize("command", ["ask", "batch"])
def test_a_client_command_s_help_shows_examples_it_takes(capsys, command):
    """`batch --help` said each line is "a request body (as for llm.complete)" and showed
    none; `ask --help` no example of its options. Each example line is one the command takes,
    and batch's JSON line a request a dispatcher takes."""
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    examples = capsys.readouterr().out.partition("\nexamples:\n")[2]
    lines = [shlex.split(line, comments=True) for line in examples.splitlines()]
    runs = [words[1:] for words in lines if words[:2] == ["lifeline", command]]
    assert len(runs) >= 2, examples
    for words in runs:
        redirect = next((i for i, w in enumerate(words) if w in ("<", ">")), len(words))
        cli.build_parser().parse_args(words[:redirect])  # exits 2 on an option it lacks
    if command == "batch":
        line = next(words[1] for words in lines if words[:1] == ["echo"])
        request = msgspec.json.decode(line, type=CompletionRequest)
        assert request.id and request.messages[0].role == "user"


@pytest.mark.parametrize(
    ("args", "meant"),
    [
        (["ask", "--routes", "strict", "hi"], "--route"),
        (["run", "--gateway-prot", "-1"], "--gateway-port"),
        (["status", "--jsno"], "--json"),
    ],
    ids=["ask", "run", "status"],
)
def test_a_misspelt_option_is_named_with_its_command_and_the_option_meant(capsys, args, meant):
    """`lifeline ask --routes strict hi` printed the usage of `lifeline` itself and
    "lifeline: error: unrecognized arguments: --routes hi": neither the command's options
    nor the one meant."""
    with pytest.raises(SystemExit) as stopped:
        cli.main(args)
    assert stopped.value.code == 2
    said = capsys.readouterr().err
    assert said.startswith(f"usage: lifeline {args[0]} "), said
    assert f"lifeline {args[0]}: error: unrecognized arguments: {args[1]}" in said, said
    assert f"(did you mean {meant}?)" in said, said


def test_a_misspelt_option_does_not_echo_a_urls_password(capsys):
    """The refusal quotes the arguments it did not take, a NATS URL with its password too."""
    with pytest.raises(SystemExit):
        cli.main(["ask", "--nats-urll=nats://bob:s3cret@127.0.0.1:4222", "hi"])
    said = capsys.readouterr().err
    assert "unrecognized arguments: --nats-urll=nats://***@127.0.0.1:4222" in said, said
    assert "s3cret" not in said, said


@pytest.mark.parametrize(
    "args",
    [
        ["ask", "--max-tokens", "0", "hi"],
        ["ask", "--max-attempts", "-1", "hi"],
        ["conformance", "--replicas", "0", "--", "true"],
    ],
    ids=["max-tokens", "max-attempts", "replicas"],
)
def test_a_count_under_one_is_a_command_line_mistake_named_by_its_option(args):
    """ask sent --max-tokens 0 to a dispatcher and exited 1 with its invalid_request, telling a
    command-line user to send JSON like {"messages": ...}; conformance printed "starting 0 x"."""
    refused = lifeline_in(Path.cwd(), *args, "--nats-url", "nats://127.0.0.1:1")
    assert refused.returncode == 2, refused
    option = args[1]
    assert f"argument {option}: {args[2]} is not 1 or more" in refused.stderr, refused.stderr
    assert not refused.stdout


def test_tools_that_are_neither_a_file_nor_json_say_what_tools_takes():
    """`--tools get_weather` said "--tools get_weather: No such file or directory" alone."""
    refused = lifeline_in(Path.cwd(), "ask", "--tools", "get_weather", "hi")
    assert refused.returncode == 2, refused
    said = refused.stderr
    assert "--tools get_weather: no such file" in said, said
    assert 'a JSON list of tools, [{"name", "description", "parameters"}' in said, said


@pytest.mark.parametrize(
    "command", [["ask"], ["ask", "--stream"], ["submit"]], ids=["ask", "stream", "submit"]
)
def test_a_prompt_over_max_payload_is_one_mistake_said_alike_by_every_command(
    tmp_path, nats_url, command
):
    """ask exited 1 with "shorten the prompt", ask --stream 2 without it, and submit 1 asking
    whether JetStream was on (`MaxPayloadError`) for the same 2 MB prompt."""
    refused = run_lifeline(
        *command, "--nats-url", nats_url, "-", input="x" * 2_000_000, cwd=tmp_path
    )
    assert refused.returncode == 2, refused.stderr
    said = refused.stderr
    assert re.fullmatch(
        r"lifeline: the request is \d+ bytes with its headers, over the NATS server's "
        r"max_payload of 1048576: shorten the prompt\n",
        said,
    ), said


@pytest.mark.parametrize("host", ["nosuchhost.invalid", "192.0.2.1"], ids=["unknown", "not-here"])
def test_a_gateway_host_it_cannot_listen_on_is_named_as_the_mistake(host, nats_url):
    """It said "cannot listen on nosuchhost.invalid:0: ...; try --port 0 (any free port)": the
    port was never the problem."""
    refused = lifeline_in(
        Path.cwd(), "gateway", "--host", host, "--port", "-1", "--nats-url", nats_url
    )
    assert refused.returncode == 2, refused
    assert f"cannot listen on {host}:0" in refused.stderr, refused.stderr
    assert "--host names no address of this machine" in refused.stderr, refused.stderr
    assert "--port" not in refused.stderr


def test_a_gateway_port_taken_still_says_to_take_any_free_one(nats_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = lifeline_in(Path.cwd(), "gateway", "--port", str(port), "--nats-url", nats_url)
    assert refused.returncode == 2, refused
    assert "Address already in use; try --port 0 (any free port)" in refused.stderr


@pytest.mark.parametrize(
    "variable", ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
)
def test_an_otlp_endpoint_without_its_scheme_stops_a_service_before_it_starts(variable):
    """`localhost:4318` started the dispatcher, whose every export then failed with "No
    connection adapters were found for 'localhost:4318/v1/traces'"; not quoted here, for an
    endpoint may hold a token."""
    refused = subprocess.run(
        [*LIFELINE, "dispatcher", "--nats-url", "nats://127.0.0.1:1"],
        env=cli_env(**{variable: "user:s3cret@localhost:4318"}),
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert refused.returncode == 2, refused.stderr
    said = refused.stderr
    assert f"{variable} is no http:// or https:// URL" in said, said
    assert "e.g. http://localhost:4318" in said and "s3cret" not in said


def test_an_event_loop_it_does_not_know_is_a_mistake_as_a_log_level_is(tmp_path):
    """LIFELINE_EVENT_LOOP=asycnio ran on uvloop without a word, LIFELINE_LOG_LEVEL=verbose
    stopped with what it takes."""
    refused = run_lifeline("check-config", env=cli_env(LIFELINE_EVENT_LOOP="asycnio"), cwd=tmp_path)
    assert refused.returncode == 2, refused
    assert refused.stderr == (
        "lifeline: LIFELINE_EVENT_LOOP='asycnio': expected asyncio, or uvloop (the default)\n"
    )


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_is_taken_before_the_command_or_after_it(where):
    """`lifeline ask -v ...` said "unrecognized arguments: -v": only `lifeline -v ask` took it."""
    args = ["ask", "--nats-url", "nats://127.0.0.1:1", "hi"]
    args = ["-v", *args] if where == "before" else [args[0], "-v", *args[1:]]
    ran = lifeline_in(Path.cwd(), *args)
    assert ran.returncode == 1, ran  # nothing listens there
    assert " DEBUG lifeline lifeline-ask: NATS at nats://127.0.0.1:1" in ran.stderr, ran.stderr


def test_lifeline_alone_lists_the_commands():
    """It said only "the following arguments are required: COMMAND"."""
    bare = lifeline_in(Path.cwd())
    assert bare.returncode == 2, bare
    assert re.search(r"check-config\s+validate a config file", bare.stderr), bare.stderr
    assert "examples:" in bare.stderr and not bare.stdout


@pytest.mark.parametrize("stream", [False, True], ids=["ask", "ask --stream"])
def test_ask_without_a_dispatcher_says_so_alike_on_either_subject(nats_url, stream):
    """ask said "no answer from a dispatcher on ... (NoRespondersError); is `lifeline run`
    up?", ask --stream "no dispatcher is subscribed to llm.stream: start one"."""
    args = ["ask", *(["--stream"] if stream else []), "--nats-url", nats_url, "hi"]
    asked = lifeline_in(Path.cwd(), *args)
    assert asked.returncode == 1, asked
    subject = "llm.stream" if stream else "llm.complete"
    said = asked.stderr.strip()
    assert said == (
        f"lifeline: no dispatcher is subscribed to {subject}: start one (`lifeline run`) "
        f"({nats_url})"
    ), said


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/chat/completions")],
    ids=["base-url-without-v1", "legacy-completions", "get"],
)
def test_a_gateway_path_it_does_not_serve_says_what_it_serves(nats_url, method, path):
    """A base_url without /v1 (the SDK then posts to /chat/completions) or the legacy
    completions API got "POST /chat/completions: Not Found" and nothing more."""
    gateway = spawn_lifeline(
        "gateway", "--port", "0", "--nats-url", nats_url, stdout=subprocess.PIPE
    )
    try:
        line, _ = wait_for_line(gateway, r"OpenAI-compatible gateway on")
        base = re.search(r"(http://\S+)/v1", line).group(1)
        answer = httpx.request(method, base + path, json={}, timeout=10)
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(timeout=15)
        gateway.stdout.close()
    assert answer.status_code in (404, 405), answer
    message = answer.json()["error"]["message"]
    assert message.startswith(f"{method} {path}: "), message
    assert message.endswith(
        "; this gateway serves POST /v1/chat/completions and GET /v1/models: an SDK's "
        f"base_url is {base}/v1"
    ), message


def test_batch_out_naming_a_directory_is_a_mistake_named_by_its_option(tmp_path):
    """It said "lifeline: [Errno 21] Is a directory: '...'" and exited 1."""
    source = tmp_path / "jobs.jsonl"
    source.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    refused = lifeline_in(tmp_path, "batch", str(source), "--out", str(tmp_path))
    assert refused.returncode == 2, refused
    assert refused.stderr == f"lifeline: --out {tmp_path} is a directory: name a file\n"


def test_batch_of_an_empty_file_says_it_holds_no_request(tmp_path):
    """It said "all 0 jobs of empty.jsonl have results in empty.results.jsonl"."""
    (tmp_path / "empty.jsonl").write_text("\n")
    ran = lifeline_in(tmp_path, "batch", "empty.jsonl")
    assert ran.returncode == 0, ran
    assert ran.stdout == "empty.jsonl holds no request: nothing to submit\n"


@pytest.mark.parametrize("given", ["flag", "variable", "config"])
def test_run_port_with_a_nats_url_is_a_mistake_not_ignored(tmp_path, given):
    """`make run PORT=-1` with a NATS_URL left in the shell connected there, --port unsaid,
    and waited for a server that was not up. A config's [nats] url names one as well (the
    README's row of `run` said only --nats-url and NATS_URL)."""
    url = "nats://127.0.0.1:1"
    config = tmp_path / "lifeline.toml"
    config.write_text(f'[providers.p]\nkind = "fake"\n[nats]\nurl = "{url}"\n')
    flag = {"flag": ["--nats-url", url], "config": ["--config", str(config)]}.get(given, [])
    env = cli_env(NATS_URL=url) if given == "variable" else cli_env()
    refused = run_lifeline("run", "--port", "-1", *flag, env=env, cwd=tmp_path)
    assert refused.returncode == 2, refused
    origin = {"flag": "--nats-url", "variable": "$NATS_URL"}.get(given, f"{config} [nats] url")
    assert refused.stderr == (
        f"lifeline: --port -1 is for an embedded NATS server, and none starts: {origin} names "
        f"{url}; drop one of them\n"
    ), refused.stderr


@pytest.mark.parametrize("choice", ["required", "auto", "get_weather"])
def test_a_tool_choice_without_tools_is_a_command_line_mistake_naming_both_options(choice):
    """`ask --tool-choice required` without --tools was sent, and the dispatcher's
    invalid_request exited 1, as if the request had run and failed."""
    refused = lifeline_in(
        Path.cwd(), "ask", "--tool-choice", choice, "hi", "--nats-url", "nats://127.0.0.1:1"
    )
    assert refused.returncode == 2, refused
    assert "--tool-choice" in refused.stderr and "--tools" in refused.stderr, refused.stderr
    assert not refused.stdout


def test_a_tool_choice_naming_a_tool_not_in_tools_is_a_command_line_mistake():
    tools = '[{"name": "get_weather", "parameters": {"type": "object"}}]'
    refused = lifeline_in(
        Path.cwd(),
        "ask",
        "--tools",
        tools,
        "--tool-choice",
        "get_time",
        "hi",
        "--nats-url",
        "nats://127.0.0.1:1",
    )
    assert refused.returncode == 2, refused
    assert "--tool-choice get_time" in refused.stderr and "get_weather" in refused.stderr, (
        refused.stderr
    )


def test_submit_with_an_empty_id_is_a_command_line_mistake_not_a_random_id():
    """`submit --id "$JOB"` with $JOB unset submitted under a random id, which the user never
    learns to ask for unless they read the line it printed."""
    refused = lifeline_in(
        Path.cwd(), "submit", "--id", "", "hi", "--nats-url", "nats://127.0.0.1:1"
    )
    assert refused.returncode == 2, refused
    assert "--id" in refused.stderr and "leave --id out" in refused.stderr, refused.stderr
    assert not refused.stdout


def test_run_refuses_a_missing_api_key_before_starting_its_embedded_nats(tmp_path):
    """`run` printed "embedded NATS (JetStream) listening on ..." and then exited 2 for a
    missing API key, as if it had started."""
    path = tmp_path / "keyless.toml"
    path.write_text('[providers.p]\nkind = "anthropic"\nmodel = "m"\napi_key_env = "R9_NO_KEY"\n')
    refused = lifeline_in(tmp_path, "run", "--config", str(path), "--port", "-1", "--no-gateway")
    assert refused.returncode == 2, refused
    assert "providers.p: provider needs an API key: set $R9_NO_KEY" in refused.stderr, refused
    assert "embedded NATS" not in refused.stdout, refused.stdout


# ---- ask --stream failing before its first token -------------------------------------------


def test_ask_stream_with_no_dispatcher_prints_its_error_alone(tmp_path, nats_url):
    """The error came after a blank line on stderr, there to end a line of streamed text that
    was never printed."""
    asked = lifeline_in(tmp_path, "ask", "--stream", "--nats-url", nats_url, "hi")
    assert asked.returncode == 1
    assert asked.stdout == ""
    assert asked.stderr.startswith("lifeline: no dispatcher"), repr(asked.stderr)
    assert asked.stderr.count("\n") == 1, repr(asked.stderr)


async def test_ask_stream_failing_before_its_first_token_prints_no_blank_line(
    tmp_path, nats_url, lifeline
):
    """An error reply before any text: stdout stays empty (`> answer.txt` got a blank line)."""
    await lifeline(config({"down": fake(fail_status=503)}))
    ask = ("ask", "--stream", "--nats-url", nats_url, "hi")
    asked = await asyncio.to_thread(lifeline_in, tmp_path, *ask)
    assert asked.returncode == 1, asked.stderr
    assert asked.stdout == ""
    assert asked.stderr.startswith("error: "), repr(asked.stderr)


# ---- a service started before its NATS server ----------------------------------------------


@pytest.mark.parametrize("command", [["dispatcher"], ["worker", "backup"]])
def test_a_service_waiting_for_nats_says_once_where_it_looks_and_what_to_do(tmp_path, command):
    """It logged nats-py's "Connection refused" every 2 s and nothing else: no word of which
    URL, nor that a NATS server has to be started first (or `lifeline run` used)."""
    url = f"nats://127.0.0.1:{free_port()}"
    proc = spawn_lifeline(*command, "--nats-url", url, cwd=tmp_path, stderr=subprocess.PIPE)
    said: list[str] = []
    try:
        for _ in range(3):  # three tries: the hint is not said again at each
            said += wait_for_line(proc, "Connection refused", stream=proc.stderr)[1]
    finally:
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=30)
    hints = [line for line in [*said, *rest.splitlines()] if "lifeline run" in line]
    assert len(hints) == 1, rest
    assert f"cannot reach NATS at {url} (--nats-url)" in hints[0]
    assert "start nats-server" in hints[0]


# ---- run with a plug-in that cannot load ---------------------------------------------------


def test_run_refuses_a_plug_in_it_cannot_import_before_starting_its_nats(tmp_path):
    """It printed "embedded NATS (JetStream) listening on ..." and then refused the class:
    a server started for nothing, and a line that said all was well."""
    path = tmp_path / "mine.toml"
    path.write_text(
        '[providers.mine]\nkind = "python"\nclass = "no_such_module_here:Model"\n'
        '[routes.default]\ntargets = ["mine"]\n'
    )
    ran = lifeline_in(tmp_path, "run", "--config", str(path), "--port", "-1", "--no-gateway")
    assert ran.returncode == 2, ran.stderr
    assert "providers.mine.class: cannot import 'no_such_module_here'" in ran.stderr
    assert "embedded NATS" not in ran.stdout, ran.stdout


@pytest.mark.parametrize("command", ["ask", "submit", "batch", "result", "audit", "status"])
def test_a_client_command_s_help_says_what_it_reads_of_its_config(capsys, command):
    """ "--config FILE  TOML config file" on `ask`, beside the same words on `run`: nothing said
    that a client reads only how to connect and where jobs, results and audit events are."""
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps its lines
    assert "the config whose [nats] table" in shown, shown


def _commands_table() -> dict[str, str]:
    """Each command's row of the README's Commands table, by command."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.partition("\n## Commands\n")[2].partition("\nExit status")[0]
    return dict(re.findall(r"^\| `lifeline ([a-z-]+)([^`]*)` \|", table, re.MULTILINE))


def test_every_option_of_every_command_is_in_its_row_of_the_readmes_commands_table():
    """`ask`, `submit`, `batch`, `result` and `audit` take --nats-url, as `status` does; their
    rows left it out, while `status`'s and `health`'s gave it. The other connection options
    (--nats-creds, ...) are said once, below the table, for every command that connects."""
    rows = _commands_table()
    commands = cli.build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(rows) == set(commands)
    left_out = [
        f"{name} {option}"
        for name, command in commands.items()
        for option in command._option_string_actions
        if option not in ("-h", "--help", "-v", "--verbose")
        and (option == "--nats-url" or not option.startswith("--nats-"))
        and not re.search(rf"{re.escape(option)}(?![\w-])", rows[name])
    ]
    assert not left_out, left_out


def test_the_dispatchers_help_gives_its_own_inbox_prefix_as_the_default(capsys):
    """Its --nats-inbox-prefix said "instead of _INBOX", as a client's does: its default is
    _LIFELINE_DISPATCHER, the inbox `lifeline nats-config` lets workers stream chunks to, and
    one set to _INBOX.<user> as a client's stops it at start."""
    with pytest.raises(SystemExit):
        cli.main(["dispatcher", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps its lines
    assert "instead of _INBOX" not in shown, shown
    assert f"default: {subjects.DISPATCHER_INBOX_PREFIX}" in shown, shown


def test_a_gateway_port_with_no_gateway_is_a_mistake_not_ignored(capsys):
    """The README gives `[--gateway-port P | --no-gateway]`; both were taken, and the port
    was ignored without a word."""
    with pytest.raises(SystemExit) as refused:
        cli.build_parser().parse_args(["run", "--gateway-port", "9000", "--no-gateway"])
    assert refused.value.code == 2
    assert "not allowed with argument --gateway-port" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "dispatcher", "worker"])
def test_a_serving_command_s_help_names_each_signal_it_stops_on_and_its_exit_status(
    capsys, command
):
    """`dispatcher --help` and `worker --help` named SIGTERM and Ctrl-C, while SIGHUP (a
    terminal closed) stops them as gracefully; the worker's said nothing of its exit status."""
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps its lines
    assert "Ctrl-C, SIGTERM or SIGHUP" in shown, shown
    assert "exits 0" in shown and "exits 1 when its NATS connection is gone for good" in shown


def test_gateway_banner_names_the_providers_of_a_config_without_routes(tmp_path, nats_url):
    """The README's plug-in config is one provider and no route: the gateway printed
    "model: a route ()", naming nothing a client could ask for, though `model = "shouty"` works."""
    config = tmp_path / "lifeline.toml"
    config.write_text('[providers.shouty]\nkind = "fake"\nmodel = "shouty-1"\n')
    gateway = spawn_lifeline(
        "gateway",
        "--port",
        "0",
        "--nats-url",
        nats_url,
        "--config",
        str(config),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line, _ = wait_for_line(gateway, r"OpenAI-compatible gateway on")
        assert "model: a route or a provider (shouty)" in line, line
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(timeout=15)
        gateway.stdout.close()
        gateway.stderr.close()


def test_batch_names_every_line_it_cannot_read_not_only_the_first(tmp_path):
    """A line that was not JSON, not an object, had an id no header can carry or one used
    before stopped the run at the first such line, unnamed the rest: a file of many bad lines
    took a run per line to mend. Each is named now, with the requests the dispatcher would
    refuse, and nothing is submitted (no server runs here)."""
    good = json.dumps({"id": "ok-1", "messages": [{"role": "user", "content": "hi"}]})
    lines = [
        "{not json",
        good,
        '["a", "list"]',
        json.dumps({"id": " padded", "messages": [{"role": "user", "content": "hi"}]}),
        good,  # the same id again
        json.dumps({"id": "typo", "messages": [{"role": "user", "content": "hi"}], "max_token": 5}),
    ]
    (tmp_path / "jobs.jsonl").write_text("\n".join(lines) + "\n")
    ran = lifeline_in(tmp_path, "batch", "jobs.jsonl")
    assert ran.returncode == 2, ran
    said = ran.stderr.splitlines()
    assert said[0].startswith("lifeline: jobs.jsonl:1: not JSON ("), ran.stderr
    assert "jobs.jsonl:3: a request is a JSON object, not an array" in said, ran.stderr
    assert any(line.startswith("jobs.jsonl:4: job id ' padded' starts or ends") for line in said)
    assert "jobs.jsonl:5: id 'ok-1' appears twice" in said, ran.stderr
    assert any(line.startswith("jobs.jsonl:6: invalid request: unknown field") for line in said)
    assert said[-1] == (
        "5 of the 6 lines of jobs.jsonl are not requests (the wire contract: README's "
        '"Wire contract v1"); nothing was submitted: mend them and run again'
    ), ran.stderr
    assert not (tmp_path / "jobs.results.jsonl").exists()


def test_batch_of_lines_that_are_not_requests_says_which_before_submitting_any(tmp_path):
    """An OpenAI Batch API line (`custom_id`, `method`, `url`, `body`) among Lifeline's
    requests, or a misspelt field, was submitted line by line, every job came back an
    invalid_request result, and the run took as long as the file was. Each line is read as a
    dispatcher reads it first; no server is needed to be told (none runs here)."""
    good = {"id": "ok-1", "messages": [{"role": "user", "content": "hi"}]}
    openai_line = {
        "custom_id": "req-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    }
    misspelt = {"id": "typo", "messages": [{"role": "user", "content": "hi"}], "max_token": 5}
    lines = [good, openai_line, misspelt, {"id": "x", "messages": "hi"}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    ran = lifeline_in(tmp_path, "batch", "jobs.jsonl")
    assert ran.returncode == 2, ran
    first, *rest = ran.stderr.splitlines()
    assert first == (
        "lifeline: jobs.jsonl:2: the file's first request is a Lifeline request, and a file "
        "holds one kind: OpenAI Batch API lines (custom_id, method, url, body) or Lifeline's "
        'requests ({"id": ..., "messages": [...]})'
    ), ran.stderr
    assert (
        "jobs.jsonl:3: invalid request: unknown field `max_token` (did you mean `max_tokens`?)"
        in (ran.stderr)
    )
    assert "jobs.jsonl:4: invalid request: Expected `array`, got `str` - at `$.messages`" in (
        ran.stderr
    )
    assert rest[-1] == (
        "3 of the 4 lines of jobs.jsonl are not requests (the wire contract: README's "
        '"Wire contract v1"); nothing was submitted: mend them and run again'
    ), ran.stderr
    assert not (tmp_path / "jobs.results.jsonl").exists()


def test_batch_of_openai_batch_lines_names_each_line_it_cannot_run_before_sending_any(tmp_path):
    """A file written for OpenAI's Batch API runs as it is; a line Lifeline cannot run (another
    endpoint, a model the config does not have, a custom_id missing or repeated, what the
    gateway refuses, one of Lifeline's own requests among them) is named with why before
    anything is sent (no server runs here)."""

    def line(custom_id: object, url: str = "/v1/chat/completions", **body: object) -> str:
        body = {"model": "backup", "messages": [{"role": "user", "content": "hi"}]} | body
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})

    lines = [
        line("ok-1", frequency_penalty=0.5),
        line("emb", url="/v1/embeddings"),
        line("nope", model="gpt-4o"),  # the example config aliases gpt-4o-mini, not it
        line(""),
        line("ok-1"),
        line("two", n=2),
        line("x" * 257),
        json.dumps({"id": "mine", "messages": [{"role": "user", "content": "hi"}]}),
    ]
    (tmp_path / "input.jsonl").write_text("\n".join(lines) + "\n")
    example = str(ROOT / "lifeline.example.toml")
    ran = lifeline_in(tmp_path, "batch", "input.jsonl", "--config", example)
    assert ran.returncode == 2, ran
    said = ran.stderr.splitlines()
    assert said[0] == (
        "lifeline: input.jsonl:2: its url is '/v1/embeddings': Lifeline answers chat "
        "completions only ('/v1/chat/completions', or Azure's '/chat/completions')"
    ), ran.stderr
    assert any(
        s.startswith(
            "input.jsonl:3: its body: The model `gpt-4o` does not exist: `model` "
            "names a Lifeline route, target or alias (default, strict,"
        )
        for s in said
    ), ran.stderr
    assert "input.jsonl:4: its custom_id must be a string, not empty: it is the job's id" in said
    assert "input.jsonl:5: custom_id 'ok-1' appears twice" in said, ran.stderr
    assert "input.jsonl:6: its body: Lifeline answers with one choice: n must be 1" in said
    assert "... and 2 more" in said, ran.stderr  # a custom_id too long, Lifeline's request
    assert said[-1] == (
        "7 of the 8 lines of input.jsonl are not requests (OpenAI Batch API files: README's "
        '"Durable jobs"); nothing was submitted: mend them and run again'
    ), ran.stderr
    assert not (tmp_path / "input.results.jsonl").exists()


def test_an_openai_batch_custom_id_longer_than_a_job_id_may_be_is_refused_by_its_length():
    """A custom_id over 256 characters was refused with the wire's advice for Lifeline's own
    requests ("Expected JSON like {"messages": ...}"), which says nothing of the custom_id."""
    from service import openai_batch

    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
    line = {"custom_id": "x" * 257, "url": openai_batch.URL, "body": body}
    with pytest.raises(ValueError, match="its custom_id is 257 characters long: a job's id is at"):
        openai_batch.to_request(line, None)
    request, ignored = openai_batch.to_request({**line, "custom_id": "x" * 256}, None)
    assert (request.id, request.route, ignored) == ("x" * 256, "default", [])
    # Azure OpenAI's batch files name the endpoint without its version
    azure = {**line, "custom_id": "a", "url": "/chat/completions", "method": "POST"}
    assert openai_batch.to_request(azure, None)[0].id == "a"


def test_an_openai_batch_run_without_a_config_says_models_are_taken_for_routes(tmp_path):
    """Without the dispatcher's config a line's `model` can only go as its route (a route's
    name or an alias, which the dispatcher resolves): a target's or provider's name would come
    back unknown_route, unexplained."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    line = {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": body}
    (tmp_path / "input.jsonl").write_text(json.dumps(line) + "\n")
    port = free_port()  # nothing listens there
    ran = lifeline_in(tmp_path, "batch", "input.jsonl", "--nats-url", f"nats://127.0.0.1:{port}")
    assert ran.returncode == 1, ran
    assert ran.stderr.startswith(
        "lifeline: no --config: each line's `model` is sent as its route (a route's name or "
        "one of the dispatcher's [model_aliases]); give the dispatcher's config to name its "
        "targets and providers too, and to have each checked before anything is sent\n"
    ), ran.stderr


def test_an_openai_batch_result_line_is_the_gateway_s_answer_and_reads_back_for_a_rerun():
    """A job refused before it was sent (too large for NATS) and one answered: each an output
    line in the Batch API's shape, under the status the gateway gives it, and read back by id
    and outcome when the run is resumed."""
    from schemas.errors import PAYLOAD_TOO_LARGE
    from schemas.wire import ErrorInfo
    from service import openai_batch

    refused = CompletionReply("big", "error", error=ErrorInfo(PAYLOAD_TOO_LARGE, "too large"))
    line = json.loads(openai_batch.result_line(refused, "default", 1_700_000_000))
    assert (line["custom_id"], line["error"], line["response"]["status_code"]) == ("big", None, 413)
    assert line["response"]["body"]["error"]["message"] == "too large"
    answered = CompletionReply("ok-1", "ok", content="hi", model="fake-echo")
    body = json.loads(openai_batch.result_line(answered, "default", 1_700_000_000))["response"]
    assert (body["status_code"], body["body"]["choices"][0]["message"]["content"]) == (200, "hi")
    assert body["body"]["created"] == 1_700_000_000 and body["body"]["model"] == "fake-echo"
    for reply, ok in ((refused, False), (answered, True)):
        written = openai_batch.result_line(reply, "default", 0)
        assert openai_batch.read_result_line(written) == (reply.id, ok)
    assert openai_batch.read_result_line(b'{"custom_id": "x", "response": null}') is None
