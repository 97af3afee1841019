"""Logs operators can collect: one line per event, timestamped, levels and JSON from the
environment; and `lifeline --version`."""

from __future__ import annotations

import json
import logging
import re

import pytest
from helpers import run_lifeline

from service import logs
from workers.scrubbing import Scrubber

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
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
