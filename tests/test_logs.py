"""Logs operators can collect: one line per event, timestamped, levels and JSON from the
environment; and `lifeline --version`."""

from __future__ import annotations

import json
import logging
import re

import pytest
from helpers import run_lifeline

from service import logs
from workers.base import Scrubber

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
