"""How Lifeline's processes log: one line per event, a timestamp on every line, the level
from the environment, and JSON for log collectors.

    LIFELINE_LOG_LEVEL   DEBUG, INFO (default), WARNING or ERROR; -v on the command line is DEBUG
    LIFELINE_LOG_FORMAT  text (default) or json: {"ts", "level", "logger", "message"[, "exc"]}

A traceback stays on its event's line (in text, its lines joined by " | "; in JSON, the
"exc" field), so a collector that splits on newlines never tears an event apart.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping

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


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name} {record.getMessage()}"
        if record.exc_info:
            line += " | " + self.formatException(record.exc_info)
        return line.replace("\r", "").replace("\n", " | ")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
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
