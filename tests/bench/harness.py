"""Process plumbing for the benchmark: spawn children, talk to them, always reap them.

Every component under test (responder, relay, dispatcher, worker) and the load generator
runs in its own OS process, started with multiprocessing's 'spawn' context so no event
loop, thread or lock is inherited from the parent. Each child runs one asyncio loop and
obeys commands sent over a multiprocessing Pipe: ("stop", None) and whatever handlers its
setup function returned (e.g. "pause", "run", "stats"). A child whose pipe closes (the
parent died) stops by itself; children ignore SIGINT, so Ctrl-C reaches only the parent,
which stops them all in a `finally` (stop command, then SIGTERM, then SIGKILL).

Also here: CPU time and RSS of a process, read from /proc (psutil is not installed).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from service import loop

_CTX = multiprocessing.get_context("spawn")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_STOP_TIMEOUT_S = 5.0

Handler = Callable[[Any], Awaitable[Any]]


@dataclass
class Served:
    """What a child's setup function returns: its command handlers and how to stop it."""

    handlers: dict[str, Handler] = field(default_factory=dict)
    stop: Callable[[], Awaitable[None]] | None = None
    info: dict[str, Any] = field(default_factory=dict)


Setup = Callable[[dict[str, Any]], Awaitable[Served]]


class ChildFailed(RuntimeError):
    """A child process did not start, died, or answered a command with an exception."""


# ---- child side ----------------------------------------------------------------------


def child_main(conn: Connection, setup: Setup, params: dict[str, Any]) -> None:
    """Entry point of every child process (runs after spawn)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    logging.basicConfig(
        level=logging.WARNING,
        format=f"[{params.get('name', 'child')}] %(levelname)s %(name)s: %(message)s",
    )
    try:
        loop.run(_serve(conn, setup, params))  # every process on the loop Lifeline's run on
    finally:
        conn.close()


async def _serve(conn: Connection, setup: Setup, params: dict[str, Any]) -> None:
    try:
        served = await setup(params)
    except Exception:  # noqa: BLE001 - whatever failed, the parent gets its traceback
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", served.info))
    stop_requested = await _obey(conn, served.handlers)
    if served.stop is not None:
        try:  # bounded: with nats-server gone, a drain could wait for reconnects forever
            await asyncio.wait_for(served.stop(), _STOP_TIMEOUT_S)
        except TimeoutError:
            pass
    if stop_requested:
        conn.send(("ok", None))


async def _obey(conn: Connection, handlers: dict[str, Handler]) -> bool:
    """Run commands from the pipe until "stop" (True) or the pipe closes (False)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bool] = loop.create_future()
    running: set[asyncio.Task[None]] = set()

    async def run(command: str, arg: Any) -> None:
        try:
            conn.send(("ok", await handlers[command](arg)))
        except Exception:  # noqa: BLE001 - whatever failed, the parent gets its traceback
            conn.send(("error", traceback.format_exc()))

    def on_readable() -> None:
        try:
            command, arg = conn.recv()
        except (EOFError, OSError):
            command, arg = None, None
        if command in (None, "stop"):
            loop.remove_reader(conn.fileno())
            if not done.done():
                done.set_result(command == "stop")
            return
        task = asyncio.create_task(run(command, arg))
        running.add(task)
        task.add_done_callback(running.discard)

    loop.add_reader(conn.fileno(), on_readable)
    return await done


# ---- parent side ---------------------------------------------------------------------


class Child:
    """One spawned process running `setup(params)`, driven through a pipe."""

    def __init__(self, name: str, setup: Setup, params: dict[str, Any]) -> None:
        self.name = name
        self.conn, child_conn = _CTX.Pipe()
        self.process = _CTX.Process(
            target=child_main,
            args=(child_conn, setup, {"name": name, **params}),
            name=name,
            daemon=True,
        )
        self._child_conn = child_conn
        self.info: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        assert self.process.pid is not None, f"{self.name} was not started"
        return self.process.pid

    def start(self) -> None:
        self.process.start()
        self._child_conn.close()  # only the child keeps its end, so its death shows as EOF here

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        status, payload = self._receive(timeout_s, "start")
        if status != "ready":
            raise ChildFailed(f"{self.name} failed to start:\n{payload}")
        self.info = payload

    def send(self, command: str, arg: Any = None) -> None:
        self.conn.send((command, arg))

    def poll(self, timeout_s: float) -> bool:
        return self.conn.poll(timeout_s)

    def result(self, timeout_s: float, what: str = "command") -> Any:
        status, payload = self._receive(timeout_s, what)
        if status != "ok":
            raise ChildFailed(f"{self.name}: {what} failed:\n{payload}")
        return payload

    def call(self, command: str, arg: Any = None, timeout_s: float = 60.0) -> Any:
        self.send(command, arg)
        return self.result(timeout_s, command)

    def _receive(self, timeout_s: float, what: str) -> tuple[str, Any]:
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(0.1):
            if not self.process.is_alive():
                raise ChildFailed(
                    f"{self.name} died (exit code {self.process.exitcode}) during {what}"
                )
            if time.monotonic() > deadline:
                raise ChildFailed(f"{self.name} did not answer {what} within {timeout_s:g} s")
        try:
            return self.conn.recv()
        except EOFError:
            raise ChildFailed(f"{self.name} closed its pipe during {what}") from None

    def request_stop(self) -> None:
        """Send the stop command, if the child is still there to read it."""
        if self.process.pid is not None and self.process.is_alive():
            try:
                self.send("stop")
            except (BrokenPipeError, OSError):
                pass

    def kill(self) -> None:
        """SIGTERM, then SIGKILL if that was not enough. Safe to call more than once."""
        if self.process.pid is None:
            return
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class Fleet:
    """All the children of a run, by name; `stop_all()` reaps every one of them."""

    def __init__(self) -> None:
        self.children: dict[str, Child] = {}
        # Processes started otherwise (LiteLLM's proxy), by name: each has .pid and .url.
        self.external: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Child:
        return self.children[name]

    def spawn(
        self, specs: list[tuple[str, Setup, dict[str, Any]]], timeout_s: float = 90.0
    ) -> None:
        """Start the children together (spawn is slow), then wait for each to be ready."""
        started = []
        for name, setup, params in specs:
            child = Child(name, setup, params)
            self.children[name] = child
            child.start()
            started.append(child)
        for child in started:
            child.wait_ready(timeout_s)

    def stop_all(self, grace_s: float = _STOP_TIMEOUT_S + 1) -> None:
        """Ask every child to stop, give them `grace_s` together, then kill what is left."""
        children = list(self.children.values())
        for child in children:
            child.request_stop()
        deadline = time.monotonic() + grace_s
        for child in children:
            if child.process.pid is not None:
                child.process.join(max(0.0, deadline - time.monotonic()))
        for child in children:
            try:
                child.kill()
            except Exception as exc:  # noqa: BLE001 - keep reaping the others
                print(f"warning: stopping {child.name}: {exc}")
        self.children.clear()


# ---- /proc readers -------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (not counting its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # after "pid (comm)": state is field 3, utime field 14, stime field 15 (1-based)
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def machine_busy_seconds() -> float:
    """CPU time all cores spent on anything but idle/iowait since boot (first line of /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}
