"""How Lifeline's processes log: one line per event, a timestamp on every line, the level
from the environment, and JSON for log collectors.

    LIFELINE_LOG_LEVEL   DEBUG, INFO (default), WARNING or ERROR; -v on the command line is DEBUG
    LIFELINE_LOG_FORMAT  text (default) or json: {"ts", "level", "logger", "message"[, "exc"]}

A traceback stays on its event's line (in text, its lines joined by " | "; in JSON, the
"exc" field), so a collector that splits on newlines never tears an event apart. Every line
passes through the scrubbers of the process's workers (`hide`): a library may log what a
provider sent back, and a provider may have echoed its key. httpx's one line per HTTP request
shows at DEBUG only.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping

LEVEL_ENV = "LIFELINE_LOG_LEVEL"
FORMAT_ENV = "LIFELINE_LOG_FORMAT"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")


def iso_time(unix_s: float) -> str:
    """ISO 8601 in UTC with milliseconds: 2026-11-30T15:04:05.123Z."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(unix_s))
    return f"{seconds}.{int(unix_s * 1000) % 1000:03d}Z"


def _timestamp(record: logging.LogRecord) -> str:
    return iso_time(record.created)


_scrubbers: list[Callable[[str], str]] = []


def hide(scrub: Callable[[str], str]) -> None:
    """Pass every log line of this process through `scrub` (a worker's credentials: its
    provider's Scrubber, workers/base.py) from now on; a false one (nothing to hide) is left
    out."""
    if scrub:
        _scrubbers.append(scrub)


def _hidden(text: str) -> str:
    for scrub in _scrubbers:
        text = scrub(text)
    return text


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name} {record.getMessage()}"
        if record.exc_info:
            line += " | " + self.formatException(record.exc_info)
        return _hidden(line.replace("\r", "").replace("\n", " | "))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": _hidden(record.getMessage()),
        }
        if record.exc_info:
            event["exc"] = _hidden(self.formatException(record.exc_info))
        return json.dumps(event, ensure_ascii=False)


def setup(verbose: bool = False, environ: Mapping[str, str] = os.environ) -> None:
    """Configure the root logger from the environment; raises ValueError on a bad value."""
    level = environ.get(LEVEL_ENV, "").strip().upper() or "INFO"
    if level not in LEVELS:
        raise ValueError(f"{LEVEL_ENV}={level!r}: expected one of {', '.join(LEVELS)}")
    form = environ.get(FORMAT_ENV, "").strip().lower() or "text"
    if form not in FORMATS:
        raise ValueError(f"{FORMAT_ENV}={form!r}: expected one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if form == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else getattr(logging, level))
    # httpx logs each request at INFO: a line per provider call, quoting the provider's status
    # line. Shown with the rest of DEBUG.
    debug = root.level <= logging.DEBUG
    logging.getLogger("httpx").setLevel(logging.NOTSET if debug else logging.WARNING)
