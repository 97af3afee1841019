"""The fault suite's tools: real `lifeline` processes, a misbehaving provider, and a ledger
that counts, per request id, the replies a client got and the audit events Lifeline sent.

The contract under test: for every request, exactly one reply (when it has a reply subject
that may be answered on) and exactly one audit event, whatever was sent or killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas import subjects
from schemas.wire import CompletionReply, audit_decoder, reply_decoder
from service.natsio import ensure_subscribed

ROOT = Path(__file__).resolve().parent.parent
SECRET_KEY = "sk-contract-0123456789abcdefSECRET"  # the API key the workers under test send


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """A config dict as TOML tables (one level of [section.name] nesting, as Lifeline's)."""
    lines: list[str] = []
    for section, body in config.items():
        flat = {k: v for k, v in body.items() if not isinstance(v, dict)}
        if flat:
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in flat.items()]
        for name, table in body.items():
            if isinstance(table, dict):
                lines.append(f"[{section}.{name}]")
                lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class LifelineProcess:
    """One `lifeline ...` command as a real process, its log in a file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "OTEL_"))}
        environment.update({"PYTHONPATH": str(ROOT), "OPENAI_API_KEY": SECRET_KEY, **(env or {})})
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args],
            cwd=ROOT,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if re.search(pattern, self.log()):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"never logged {pattern!r} (exit {self.proc.poll()}); log:\n{self.log()[-3000:]}"
        )

    def memory_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) from /proc, in KiB."""
        figures = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                figures[key] = int(value.split()[0])
        return figures

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class Ledger:
    """Sends requests on one inbox subscription and counts every reply and audit event per id.

    Each request gets its own reply subject `<inbox>.<n>`, so a second reply to the same
    request is seen (nc.request would drop it)."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.inbox = nc.new_inbox()
        self.ids: dict[str, str] = {}  # reply token -> request id
        self.sent_at: dict[str, float] = {}
        self.replies: Counter[str] = Counter()
        self.reply_of: dict[str, CompletionReply] = {}
        self.reply_after_s: dict[str, float] = {}
        self.audits: Counter[str] = Counter()
        self.audit_types: dict[str, str | None] = {}
        self.audit_events = 0
        self.audit_bytes: list[bytes] = []
        self.unheard: set[str] = set()  # requests the server answered "no responders" to
        self._n = 0

    async def start(self) -> "Ledger":
        await self.nc.subscribe(self.inbox + ".*", cb=self._on_reply, pending_msgs_limit=-1)
        await self.nc.subscribe(subjects.AUDIT_ALL, cb=self._on_audit, pending_msgs_limit=-1)
        await ensure_subscribed(self.nc)
        return self

    async def _on_reply(self, msg: Msg) -> None:
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            # The server's "no responders": no dispatcher was subscribed, Lifeline never saw it.
            self.unheard.add(self.ids.get(msg.subject.rsplit(".", 1)[1], "?"))
            return
        request_id = self.ids.get(msg.subject.rsplit(".", 1)[1], "?")
        self.replies[request_id] += 1
        self.reply_after_s[request_id] = time.monotonic() - self.sent_at.get(
            request_id, time.monotonic()
        )
        self.reply_of[request_id] = reply_decoder.decode(msg.data)

    async def _on_audit(self, msg: Msg) -> None:
        self.audit_events += 1
        self.audit_bytes.append(msg.data)
        event = audit_decoder.decode(msg.data)
        self.audits[event.id] += 1
        self.audit_types[event.id] = event.error_type

    async def send(
        self,
        request_id: str,
        payload: bytes,
        reply: str | None = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Publish `payload` as request `request_id`; reply="" means the ledger's own inbox."""
        self._n += 1
        token = str(self._n)
        self.ids[token] = request_id
        self.sent_at[request_id] = time.monotonic()
        if reply == "":
            reply = f"{self.inbox}.{token}"
        await self.nc.publish(subjects.COMPLETE, payload, reply=reply or "", headers=headers)

    async def settle(
        self, replies: int, audits: int, timeout_s: float = 30, quiet_s: float = 0.3
    ) -> None:
        """Wait for at least this many replies and audit events, then a quiet spell in which
        nothing more arrives (a duplicate would show up in it)."""
        deadline = time.monotonic() + timeout_s
        while sum(self.replies.values()) < replies or self.audit_events < audits:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"got {sum(self.replies.values())}/{replies} replies and {self.audit_events}/{audits} audit events"
                )
            await asyncio.sleep(0.02)
        await asyncio.sleep(quiet_s)

    def assert_exactly_once(self, ids: list[str], replied: bool = True) -> None:
        """Every id: one reply (when `replied`) and one audit event, and nothing for any other id."""
        for request_id in ids:
            assert self.audits[request_id] == 1, (
                f"{request_id[:60]!r}: {self.audits[request_id]} audit events"
            )
            assert self.replies[request_id] == (1 if replied else 0), (
                f"{request_id[:60]!r}: {self.replies[request_id]} replies"
            )
        assert sum(self.audits.values()) == len(ids), (
            f"audit events for unknown ids: {set(self.audits) - set(ids)}"
        )


# ---- a provider that misbehaves on request ----------------------------------------------


def _completion(content: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "gpt-test",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    """OpenAI's chat completions; the last user message says how to misbehave:
    "size N" answers with N characters, "echo key" answers 401 echoing the Authorization header
    in the error, "shape key" answers 200 with an unexpected body that echoes it, "bomb N"
    answers a gzip body that expands to N bytes; anything else is echoed."""

    exported: list[bytes] = []  # OTLP bodies (traces, metrics) posted to this server
    bombs: dict[int, bytes] = {}

    def log_message(self, *args: Any) -> None:  # keep pytest's output clean
        pass

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["content-length"]))
        if self.path.startswith("/v1/") and not self.path.endswith("/chat/completions"):
            self.exported.append(raw)  # an OTLP export: kept so tests can search it for secrets
            self._send(200, b"", {"content-type": "application/x-protobuf"})
            return
        body = json.loads(raw)
        command = body["messages"][-1]["content"]
        key = self.headers.get("authorization", "")
        verb, _, arg = command.partition(" ")
        if verb == "size":
            self._send(200, _completion("x" * int(arg)))
        elif command == "echo key":
            error = {
                "error": {
                    "message": {"detail": f"bad key {key}", "got": key},
                    "type": "invalid_request_error",
                }
            }
            self._send(401, json.dumps(error).encode())
        elif command == "shape key":
            self._send(
                200,
                json.dumps(
                    {"choices": [{"message": {"content": {"echo": key}}}], "debug": key}
                ).encode(),
            )
        elif verb == "bomb":
            self._send(200, _bomb(int(arg)), {"Content-Encoding": "gzip"})
        else:
            self._send(200, _completion(command))

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        if "content-type" not in (headers or {}):
            self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


def _bomb(size: int) -> bytes:
    """A gzip body that expands to `size` bytes of JSON-ish spaces (built in chunks, kept)."""
    if size not in _Handler.bombs:
        packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip framing
        chunk = b" " * (1 << 20)
        parts = [packer.compress(chunk) for _ in range(size >> 20)]
        _Handler.bombs[size] = b"".join(parts) + packer.flush()
    return _Handler.bombs[size]


class _Server(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: a burst of connections from a worker would
    # be refused by the kernel, and the test would measure the harness, not Lifeline.
    request_queue_size = 256


class MisbehavingProvider:
    """A real local HTTP server speaking OpenAI's shapes, in a thread."""

    def __enter__(self) -> "MisbehavingProvider":
        _Handler.exported.clear()
        self.exported = _Handler.exported
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def iter_sizes(top: int, span: int, step: int) -> Iterator[int]:
    """top-span .. top, every `step` bytes, and top itself."""
    yield from range(top - span, top, step)
    yield top
