"""How Lifeline's processes log: one line per event, a timestamp on every line, the level
from the environment, and JSON for log collectors.

    LIFELINE_LOG_LEVEL   DEBUG, INFO (default), WARNING or ERROR; -v on the command line is DEBUG
    LIFELINE_LOG_FORMAT  text (default) or json: {"ts", "level", "logger", "message"[, "exc"]}

A traceback stays on its event's line (in text, its lines joined by " | "; in JSON, the
"exc" field), so a collector that splits on newlines never tears an event apart. What a client
or a provider wrote (an id, an error text) may hold a line break or a terminal's escape
sequence: every character that is not printable is written as its escape (`\n`, `\x1b`,
`\x9b`), so no such text forges a line or acts on the terminal, in text and in JSON. Every
line passes through the scrubbers of the process's workers and its CLI command (`hide`; a
library may log what a provider sent back, and a provider may have echoed its key), and a
URL's user info is hidden whatever it holds. httpx's one line per HTTP request
shows at DEBUG only. What a command writes on stderr itself (`say`, `warn`, `say_bug`: a
start-up mistake, why it stops, a traceback) is a record too under JSON, and so is what
Python writes itself (a warning, an exception ignored or ending a thread, logging's report of
a line it could not write), so that a collector that parses a JSON object per line finds
nothing else.

Hostile traffic must not turn into a line per request (a disk filled, CPU spent on logging):
above DEBUG, one place in the code writes at most REPEATS_BURST warnings or errors in
REPEATS_WINDOW_S; the next line it writes after such a window says how many were left out.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

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
    provider's Scrubber, workers/scrubbing.py) from now on; a false one (nothing to hide) is left
    out."""
    if scrub:
        _scrubbers.append(scrub)


def hidden(text: str) -> str:
    """`text` as this process may write it anywhere (a log line, the CLI's stderr): without
    any credential its scrubbers know, nor the user info of any URL in it (a config's
    base_url quoted in an error, nats://alice:pw@host), whoever wrote the URL."""
    for scrub in _scrubbers:
        text = scrub(text)
    if "@" in text:
        text = _USER_INFO.sub(r"\1***@", text)
    return text


# scheme://user:password@ or scheme://token@, up to the last "@" before a space, a quote or
# the next URL of a list (a password may hold "@", "/", "#" or ","): too much hidden rather
# than too little.
_USER_INFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)(?:(?!://)[^\s'\"<>])*@")


def printable(text: str) -> str:
    """`text` with every character that is not printable (line breaks, C0 and C1 controls,
    DEL, U+2028) written as its escape, as repr() writes it: one line, inert on a terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # Scrubbed as written, before it is escaped and a traceback cut into its lines: a
        # secret with a line break (a plug-in's PEM key) or an escape in it was found in
        # neither form after, as JsonFormatter finds it.
        line = (
            f"{_timestamp(record)} {record.levelname} {record.name} "
            f"{printable(hidden(record.getMessage()))}"
        )
        if record.exc_info:
            trace = hidden(self.formatException(record.exc_info))
            line += " | " + " | ".join(
                printable(part) for part in trace.replace("\r", "").split("\n")
            )
        return hidden(line)


def _json_escaped(text: str) -> str:
    """JSON as json.dumps writes it without ensure_ascii, but with the characters it leaves
    raw that a terminal acts on or a reader takes for a line break (C1 controls, DEL, U+2028)
    escaped too."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": hidden(record.getMessage()),
        }
        if record.exc_info:
            event["exc"] = hidden(self.formatException(record.exc_info))
        return _json_escaped(json.dumps(event, ensure_ascii=False))


REPEATS_BURST = 5  # lines one place in the code may write in a window ...
REPEATS_WINDOW_S = 10.0  # ... of this many seconds, at WARNING and above


class Repeats(logging.Filter):
    """Lets through at most `burst` warnings and errors from one place in the code (its file
    and line) per `window_s`; the first let through after a window that left some out says
    how many. Lines below WARNING pass untouched (none of them is written per request)."""

    def __init__(
        self,
        burst: int = REPEATS_BURST,
        window_s: float = REPEATS_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst, self.window_s, self.clock = burst, window_s, clock
        # (file, line) -> [window's start, lines let through in it, lines left out in it]
        self._places: dict[tuple[str, int], list[Any]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        place, now = (record.pathname, record.lineno), self.clock()
        seen = self._places.get(place)
        if seen is None or now - seen[0] >= self.window_s:
            left_out = seen[2] if seen is not None else 0
            self._places[place] = [now, 1, 0]
            if left_out:  # its arguments formatted later, by the handler, under its guard
                record.msg = f"{record.msg} ({left_out} more like this left out before it)"
            return True
        if seen[1] < self.burst:
            seen[1] += 1
            return True
        seen[2] += 1
        return False


_json = False  # LIFELINE_LOG_FORMAT=json, as setup() found it


def say(line: str, level: int = logging.ERROR, message: str | None = None) -> None:
    """A line a command writes on stderr itself, whatever the level (a start-up mistake, a
    warning that must be seen, why it stops): `line` as it is, or under JSON logs a record of
    `level` whose message is `message` (else `line` without its blank lines around it), so
    that a log shipper parses it as every other line. Not a log line: the Repeats filter
    would drop the sixth of a config's warnings, all said from one place."""
    if _json:
        shown = line.strip("\n") if message is None else message
        line = _record(level, shown, None)
    print(line, file=sys.stderr, flush=True)


def warn(text: str) -> None:
    """A warning a command says as it starts (what a config holds that will never act):
    "warning: <text>", or a WARNING record."""
    say(f"warning: {text}", logging.WARNING, text)


def say_bug(exc: BaseException) -> None:
    """An exception nothing caught (a bug): Python's traceback, or one ERROR record holding it
    under JSON logs."""
    if not _json:
        traceback.print_exception(exc)
        return
    message = traceback.format_exception_only(exc)[-1].strip()
    print(_record(logging.ERROR, message, exc), file=sys.stderr, flush=True)


def _record(level: int, message: str, exc: BaseException | None) -> str:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    record = logging.LogRecord("lifeline", level, __file__, 0, message, None, exc_info)
    return JsonFormatter().format(record)


def setup(
    verbose: bool = False, environ: Mapping[str, str] = os.environ, form: str | None = None
) -> None:
    """Configure the root logger from the environment, `form` (a serving command's
    --log-format) before LIFELINE_LOG_FORMAT; raises ValueError on a bad value."""
    form = form or environ.get(FORMAT_ENV, "").strip().lower() or "text"
    if form not in FORMATS:
        raise ValueError(f"{FORMAT_ENV}={form!r}: expected one of {', '.join(FORMATS)}")
    global _json
    _json = form == "json"  # first: a bad level is then said as a JSON record
    _log_pythons_own_lines(_json)
    level = environ.get(LEVEL_ENV, "").strip().upper() or "INFO"
    if level not in LEVELS:
        raise ValueError(f"{LEVEL_ENV}={level!r}: expected one of {', '.join(LEVELS)}")
    handler = _Handler()
    handler.setFormatter(JsonFormatter() if _json else TextFormatter())
    if not verbose and level != "DEBUG":  # debugging wants every line
        handler.addFilter(Repeats())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else getattr(logging, level))
    # httpx logs each request at INFO: a line per provider call, quoting the provider's status
    # line. Shown with the rest of DEBUG.
    debug = root.level <= logging.DEBUG
    logging.getLogger("httpx").setLevel(logging.NOTSET if debug else logging.WARNING)
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.removeFilter(_tls_eof_noise)
    if not debug:
        asyncio_log.addFilter(_tls_eof_noise)


def _tls_eof_noise(record: logging.LogRecord) -> bool:
    """False for asyncio's warning at each close of a NATS connection over TLS: nats-py
    upgrades it with start_tls, which never tells its stream protocol that it is over TLS, so
    that protocol asks to stay half-open, which TLS ignores. Harmless: shown only with -v."""
    return record.msg != "returning true from eof_received() has no effect when using ssl"


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    def handleError(self, record: logging.LogRecord) -> None:
        """A line that could not be written (a call whose arguments do not fit its format):
        under JSON, one record saying so, where logging writes a dozen plain lines."""
        if not _json:
            super().handleError(record)
            return
        if not logging.raiseExceptions:
            return
        message = f"a log line could not be written: {record.msg!r} with {record.args!r}"
        try:
            print(_record(logging.ERROR, message, sys.exc_info()[1]), file=sys.stderr, flush=True)
        except (OSError, ValueError):  # stderr itself is gone: as logging's own, nothing to say
            pass


_hooks_replaced: tuple[Any, Any] | None = None  # Python's own, while ours log in their place


def _log_pythons_own_lines(on: bool) -> None:
    """Under JSON logs, what Python itself writes on stderr becomes a record too: a warning (a
    plug-in's or a library's), an exception ignored in a __del__ or a weakref callback, one
    that ended a thread. In text its own lines stay, as ever."""
    global _hooks_replaced
    logging.captureWarnings(on)
    if on and _hooks_replaced is None:
        _hooks_replaced = (sys.unraisablehook, threading.excepthook)
        sys.unraisablehook, threading.excepthook = _unraisable, _thread_ended
    elif not on and _hooks_replaced is not None:
        sys.unraisablehook, threading.excepthook = _hooks_replaced
        _hooks_replaced = None


def _unraisable(unraisable: Any) -> None:
    try:
        logging.getLogger("lifeline").error(
            "%s: %r",
            unraisable.err_msg or "Exception ignored in",
            unraisable.object,
            exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback),
        )
    except Exception:  # noqa: BLE001 - at the interpreter's exit, logging may be gone
        sys.__unraisablehook__(unraisable)


def _thread_ended(ended: Any) -> None:
    if issubclass(ended.exc_type, SystemExit):  # as Python's own hook: not an error
        return
    name = ended.thread.name if ended.thread is not None else "?"
    logging.getLogger("lifeline").error(
        "exception in thread %s",
        name,
        exc_info=(ended.exc_type, ended.exc_value, ended.exc_traceback),
    )
