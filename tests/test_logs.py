"""Logs operators can collect: one line per event, timestamped, levels and JSON from the
environment; and `lifeline --version`."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, SECRET_KEY, cli_env, free_port, run_lifeline, spawn_lifeline

from service import logs
from service.embedded import EmbeddedNats
from workers.scrubbing import Scrubber

EXAMPLE = str(ROOT / "lifeline.example.toml")
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    logs.setup(environ={})  # Python's own lines back to Python, JSON off
    root.handlers[:], root.level = handlers, level


def _fail_loudly() -> None:
    try:
        raise RuntimeError("provider exploded\nwith a second line")
    except RuntimeError:
        logging.getLogger("lifeline.test").exception("a bug while answering")


def test_json_lines_carry_time_level_logger_message_and_the_traceback(restore_logging, capsys):
    logs.setup(environ={logs.FORMAT_ENV: "json"})
    _fail_loudly()
    [line] = capsys.readouterr().err.splitlines()
    event = json.loads(line)
    assert re.fullmatch(STAMP, event["ts"])
    assert (event["level"], event["logger"], event["message"]) == (
        "ERROR",
        "lifeline.test",
        "a bug while answering",
    )
    assert "RuntimeError: provider exploded" in event["exc"]


def test_text_keeps_each_event_on_one_timestamped_line(restore_logging, capsys):
    logs.setup(environ={logs.LEVEL_ENV: "warning"})
    logging.getLogger("lifeline.test").info("not shown at WARNING")
    _fail_loudly()
    [line] = capsys.readouterr().err.splitlines()
    assert re.match(STAMP + r" ERROR lifeline\.test a bug while answering \| Traceback", line)
    assert "provider exploded | with a second line" in line


@pytest.mark.parametrize("form", logs.FORMATS)
def test_a_workers_key_is_scrubbed_from_every_line_a_library_logs(
    restore_logging, capsys, monkeypatch, form
):
    monkeypatch.setattr(logs, "_scrubbers", [])
    logs.hide(Scrubber(["sk-live/9"]))
    logs.hide(Scrubber([]))  # a provider without a key adds nothing
    assert len(logs._scrubbers) == 1
    logs.setup(verbose=True, environ={logs.FORMAT_ENV: form})
    logging.getLogger("httpx").debug('HTTP Request: POST x "HTTP/1.1 500 denied sk-live/9"')
    escaped = 'body {"key": "sk-live\\/9"}'  # as PHP writes it
    try:
        raise ValueError(escaped)
    except ValueError:
        logging.getLogger("lifeline.worker").exception("provider said sk-live/9")
    out = capsys.readouterr().err
    assert "sk-live" not in out and out.count("***") == 3, out


@pytest.mark.parametrize("form", logs.FORMATS)
def test_a_secret_of_many_lines_is_scrubbed_from_a_traceback_too(
    restore_logging, capsys, monkeypatch, form
):
    """A plug-in's `secrets` may be any string: a PEM key has line breaks and an escape may be
    in a token. In text, a traceback was cut into its lines (joined by " | ") and escaped
    before it was scrubbed, so neither the secret nor its JSON form was found in it."""
    pem = (
        "-----BEGIN PRIVATE KEY-----\nMIIEvQ-pem-body-1\nYJ7r-pem-body-2\n-----END PRIVATE KEY-----"
    )
    odd = "tok\x1ben-with-an-escape"
    monkeypatch.setattr(logs, "_scrubbers", [])
    logs.hide(Scrubber([pem, odd]))
    logs.setup(environ={logs.FORMAT_ENV: form})
    try:
        raise RuntimeError(f"could not sign with {pem} or {odd}")
    except RuntimeError:
        logging.getLogger("lifeline.worker").exception("signing failed for %s", odd)
    out = capsys.readouterr().err
    assert "pem-body" not in out and "en-with-an-escape" not in out, out
    assert out.count("***") == 3, out


FORGED = "bad id\n2026-01-01T00:00:00.000Z ERROR lifeline forged\x1b]0;pwned\x07\u009b2J\u2028"


@pytest.mark.parametrize("form", logs.FORMATS)
def test_what_a_client_wrote_can_neither_forge_a_line_nor_act_on_the_terminal(
    restore_logging, capsys, form
):
    """An id or a provider's error text reached the log as it was: a line break started a
    line of the writer's choosing, and ESC and C1 sequences (raw in JSON too) set the
    terminal's title or cleared its screen."""
    logs.setup(environ={logs.FORMAT_ENV: form})
    logging.getLogger("lifeline.test").warning("refused %s", FORGED)
    try:
        raise ValueError(FORGED)
    except ValueError:
        logging.getLogger("lifeline.test").exception("provider failed")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    for line in lines:
        assert line.isprintable(), repr(line)
        shown = (
            json.loads(line)["message"] + json.loads(line).get("exc", "")
            if form == "json"
            else line
        )
        assert "forged" in shown


def test_a_line_written_per_request_is_written_a_few_times_and_then_counted(
    restore_logging, capsys
):
    """A flood of bad requests (or a provider failing every call) made a warning per request:
    10,000 lines for 10,000 requests. One place in the code writes a few per window; the next
    line it writes after that says how many it left out."""
    logs.setup(environ={})
    [repeats] = logging.getLogger().handlers[0].filters
    now = [0.0]
    repeats.clock = lambda: now[0]
    log = logging.getLogger("lifeline.test")

    def refuse(n: int) -> None:
        log.warning("request %d refused", n)  # one place in the code

    for n in range(1000):
        refuse(n)
    log.warning("another place")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 3)[3] for line in lines] == [
        *(f"request {n} refused" for n in range(logs.REPEATS_BURST)),
        "another place",
    ]
    now[0] += logs.REPEATS_WINDOW_S
    for n in range(2):
        refuse(n)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith(
        f"request 0 refused ({1000 - logs.REPEATS_BURST} more like this left out before it)"
    )
    assert lines[1].endswith("request 1 refused")
    logs.setup(verbose=True, environ={})  # debugging: every line
    for _ in range(20):
        log.warning("again")
    assert len(capsys.readouterr().err.splitlines()) == 20


def test_a_log_call_whose_arguments_do_not_fit_its_format_never_raises_in_its_caller(
    restore_logging, capsys
):
    """The first line let through after a window that left some out was formatted by the
    Repeats filter itself, outside logging's guard: a call whose arguments did not fit its
    format (a plug-in's, a library's) raised TypeError in the code that logged it."""
    logs.setup(environ={logs.FORMAT_ENV: "json"})
    [repeats] = logging.getLogger().handlers[0].filters
    now = [0.0]
    repeats.clock = lambda: now[0]

    def misfit() -> None:
        logging.getLogger("lifeline.test").warning("%d weights", "some")  # one place

    for _ in range(logs.REPEATS_BURST + 2):
        misfit()
    now[0] += logs.REPEATS_WINDOW_S
    misfit()
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert len(records) == logs.REPEATS_BURST + 1
    assert all("could not be written: '%d weights" in r["message"] for r in records), records
    assert "(2 more like this left out before it)" in records[-1]["message"]


def test_httpxs_line_per_request_shows_at_debug_only(restore_logging):
    logs.setup(environ={})
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
    logs.setup(verbose=True, environ={})
    assert logging.getLogger("httpx").isEnabledFor(logging.DEBUG)


def test_a_bad_level_or_format_is_refused_naming_the_variable():
    result = run_lifeline("status", env={**_env(), logs.LEVEL_ENV: "loud"})
    assert result.returncode == 2
    assert "LIFELINE_LOG_LEVEL='LOUD': expected one of DEBUG, INFO, WARNING, ERROR" in result.stderr
    result = run_lifeline("status", env={**_env(), logs.FORMAT_ENV: "xml"})
    assert result.returncode == 2 and "LIFELINE_LOG_FORMAT='xml'" in result.stderr


def test_version():
    result = run_lifeline("--version")
    assert result.returncode == 0 and re.fullmatch(r"lifeline \d+\.\d+\.\d+\n", result.stdout)


def _env() -> dict[str, str]:
    from helpers import cli_env

    return cli_env()


# ---- a serving command's stderr under JSON logs: every line a record -------------------------


def _records(stderr: str) -> list[dict[str, str]]:
    """Every line of a process's stderr as the JSON record each must be."""
    records = []
    for line in stderr.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"a line that is not JSON: {line!r}\nin:\n{stderr}")
        assert {"ts", "level", "logger", "message"} <= record.keys(), line
        assert re.fullmatch(STAMP, record["ts"]), line
        records.append(record)
    return records


def _said(records: list[dict[str, str]], level: str, text: str) -> dict[str, str]:
    found = [r for r in records if r["level"] == level and text in r["message"]]
    assert found, f"no {level} record saying {text!r} in {records}"
    return found[0]


def _serve(tmp_path: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    """A serving command under JSON logs, its stdout in tmp_path/out, its stderr in err."""
    with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:
        return spawn_lifeline(
            *args,
            env=cli_env(OPENAI_API_KEY=SECRET_KEY, LIFELINE_LOG_FORMAT="json", **env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )


def _wait_for(proc: subprocess.Popen[str], path: Path, pattern: str) -> None:
    deadline = time.monotonic() + 30
    while not re.search(pattern, path.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, (
            f"never wrote {pattern!r} (exit {proc.poll()}):\n{path.read_text()}"
        )
        time.sleep(0.05)


def _stopped(proc: subprocess.Popen[str]) -> int:
    try:
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def port_8080_taken() -> Iterator[None]:
    """`lifeline run`'s default gateway port, taken (here, or already by someone else)."""
    with socket.socket() as taken:
        try:
            taken.bind(("127.0.0.1", 8080))
            taken.listen()
        except OSError as exc:
            assert exc.errno == errno.EADDRINUSE
        yield


def test_run_under_json_logs_says_its_gateway_was_not_started_and_why_it_stops_as_records(
    tmp_path, port_8080_taken
):
    """ "gateway not started: ..." and "the embedded nats-server exited ... stopping
    everything" were plain lines among the JSON ones: a log pipeline that parses a JSON object
    per line broke on them, or dropped them."""
    run = _serve(tmp_path, "run", "--port", "-1")
    try:
        _wait_for(run, tmp_path / "out", "dispatcher ready")
        children = Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()
        [server] = [c for c in children if "nats-server" in Path(f"/proc/{c}/cmdline").read_text()]
        os.kill(int(server), signal.SIGKILL)
    finally:
        code = _stopped(run)
    assert code == 1
    records = _records((tmp_path / "err").read_text())
    _said(records, "WARNING", "gateway not started: cannot listen on 127.0.0.1:8080")
    stopping = _said(records, "ERROR", "the embedded nats-server exited (-9)")
    assert stopping["message"].endswith("\nstopping everything"), stopping


TOKEN = "s3cret-token-0123456789"


def test_the_gateway_under_json_logs_says_it_lost_its_nats_connection_as_a_record(tmp_path):
    """Among uvicorn's own lines, which are records too (it has no handler of its own)."""
    conf = f'authorization {{ token: "{TOKEN}" }}\n'
    with EmbeddedNats(port=free_port(), conf=conf) as server:
        url = f"nats://{TOKEN}@{server.host}:{server.port}"
        gateway = _serve(tmp_path, "gateway", "--port", "0", "--nats-url", url)
        try:
            _wait_for(gateway, tmp_path / "out", "OpenAI-compatible gateway on")
            port = re.search(r"http://127\.0\.0\.1:(\d+)/v1", (tmp_path / "out").read_text())
            assert port is not None
            with socket.create_connection(("127.0.0.1", int(port[1])), timeout=10) as sock:
                sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")  # uvicorn's parser logs it
                assert sock.recv(65536).startswith(b"HTTP/1.1 400")
            # The server's token changed and its config reloaded: it closes the connection,
            # and refuses the old token on every reconnect.
            assert server.store_dir is not None and server.pid is not None
            path = Path(server.store_dir) / "nats.conf"
            path.write_text(path.read_text().replace(TOKEN, "another-token"))
            os.kill(server.pid, signal.SIGHUP)
        finally:
            code = _stopped(gateway)
    assert code == 1
    stderr = (tmp_path / "err").read_text()
    records = _records(stderr)
    _said(records, "ERROR", "gateway lost its NATS connection for good: stopping")
    assert _said(records, "WARNING", "Invalid HTTP request")["logger"] == "uvicorn.error"
    assert TOKEN not in stderr


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (("worker", "nosuch", "--config", EXAMPLE), {}, "no [providers.nosuch] table"),
        (("dispatcher",), {logs.LEVEL_ENV: "loud"}, "LIFELINE_LOG_LEVEL='LOUD'"),
        (("gateway",), {"LIFELINE_EVENT_LOOP": "trio"}, "LIFELINE_EVENT_LOOP='trio'"),
    ],
    ids=["config", "log-level", "event-loop"],
)
def test_a_serving_command_that_cannot_start_says_why_as_a_json_record(args, env, says):
    """ "lifeline: ..." (exit 2) was the one plain line a mistake in the config or the
    environment wrote, whatever LIFELINE_LOG_FORMAT said."""
    result = run_lifeline(*args, env=cli_env(LIFELINE_LOG_FORMAT="json", **env))
    assert result.returncode == 2, result.stderr
    [record] = _records(result.stderr)
    assert record["level"] == "ERROR" and says in record["message"], record


@pytest.mark.parametrize("command", ["run", "dispatcher", "worker", "gateway"])
@pytest.mark.parametrize(("flag", "variable"), [("json", "xml"), ("text", "json")])
def test_a_serving_commands_log_format_flag_wins_over_the_variable(command, flag, variable):
    """A service's unit or compose file says how it logs on its command line, whatever the
    environment it inherits (a bad value there included: it is not read)."""
    args = ["nosuch"] if command == "worker" else []
    result = run_lifeline(
        command,
        *args,
        "--config",
        "no-such.toml",
        "--log-format",
        flag,
        env=cli_env(LIFELINE_LOG_FORMAT=variable),
    )
    assert result.returncode == 2, result.stderr
    if flag == "json":
        [record] = _records(result.stderr)
        assert record["level"] == "ERROR" and "no-such.toml" in record["message"], record
    else:
        assert result.stderr.startswith("lifeline: ") and "no-such.toml" in result.stderr


def test_a_bug_under_json_logs_is_one_record_holding_its_traceback():
    """Python's traceback, a dozen plain lines, each of them a record to a log pipeline."""
    bug = (
        "import sys\n"
        "from service import cli\n"
        "async def failing(args):\n"
        "    raise RuntimeError('unexpected')\n"
        "cli.cmd_dispatcher = failing\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", bug, "dispatcher", "--config", EXAMPLE],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=cli_env(LIFELINE_LOG_FORMAT="json"),
        check=False,
    )
    assert ran.returncode == 1, ran.stderr
    [record] = _records(ran.stderr)
    assert (record["level"], record["message"]) == ("ERROR", "RuntimeError: unexpected")
    assert "Traceback" in record["exc"] and "in failing" in record["exc"], record


# A plug-in model that makes Python itself write on stderr as it is made: a warning, an
# exception ignored in a __del__, and one that ends a thread.
NOISY_MODEL = """
import logging
import threading
import warnings

from workers.plugin import Model


class Dropped:
    def __del__(self):
        raise RuntimeError("noisy: raised in __del__")


class Noisy(Model):
    def __init__(self):
        super().__init__()
        warnings.warn("noisy: these weights are old", UserWarning)
        Dropped()
        loader = threading.Thread(target=self.load, name="noisy-loader")
        loader.start()
        loader.join()
        logging.getLogger("noisy").warning("%d weights", "some")  # its format does not fit

    def load(self):
        raise RuntimeError("noisy: its loader thread failed")

    def call(self, request):
        return "noisy"
"""


def test_what_python_itself_writes_under_json_logs_is_a_record_too(tmp_path, nats_url):
    """A plug-in's (or a library's) warning, an exception ignored in a __del__, one that
    ended a thread, and a log call whose arguments do not fit its format: Python writes each
    as plain lines of its own, a traceback among them."""
    (tmp_path / "noisy_model.py").write_text(NOISY_MODEL)
    cfg = tmp_path / "noisy.toml"
    cfg.write_text('[providers.noisy]\nkind = "python"\nclass = "noisy_model:Noisy"\n')
    path = f"{tmp_path}:{ROOT}"
    worker = _serve(
        tmp_path, "worker", "noisy", "--config", str(cfg), "--nats-url", nats_url, PYTHONPATH=path
    )
    try:
        _wait_for(worker, tmp_path / "err", "worker noisy serving")
        worker.terminate()
    finally:
        code = _stopped(worker)
    assert code == 0
    records = _records((tmp_path / "err").read_text())
    assert (
        "UserWarning: noisy: these weights are old"
        in _said(records, "WARNING", "weights are old")["message"]
    )
    ignored = _said(records, "ERROR", "Exception ignored in")
    assert "noisy: raised in __del__" in ignored["exc"], ignored
    ended = _said(records, "ERROR", "exception in thread noisy-loader")
    assert "noisy: its loader thread failed" in ended["exc"], ended
    unwritten = _said(records, "ERROR", "a log line could not be written: '%d weights'")
    assert "TypeError" in unwritten["exc"], unwritten
