"""`python -m tests.bench.profile [REV] [--seconds S] [--in-flight N]` (or `make bench-profile`):
where the dispatcher's and the worker's time goes at 64 in flight, by py-spy.

The benchmark's Lifeline side (a load generator, a dispatcher and a worker for the instant
`fake` provider, on an embedded nats-server of its own, as `make bench` and `make bench-ab`
start them) is loaded closed-loop while `py-spy record --native` samples each of the two
processes (200 times a second; only the busy time of their threads, their waits in `epoll`
left out). Each sample is counted where its deepest Python frame is, time in C and in the
kernel under the Python that called it, but for socket writes and msgspec, counted apart
(their native frames): the table the README's "What is left" shows. Writes
bench-results/profile.md and each process's collapsed stacks (profile-<process>.txt, for
flame graph tools or grep).

Run it on a quiet machine: py-spy counts a thread that waits for a core as busy where it
stopped, and on loopback a sender is often stopped in its write while the receiver it woke
runs, so with other work on the cores socket writes swell (three other CPU-bound processes
here made them 76 % of the dispatcher and 86 % of the worker). py-spy needs the right to
trace the processes (root, or `kernel.yama.ptrace_scope = 0`). Takes about half a minute.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import time
from pathlib import Path

from schemas import subjects
from service.embedded import EmbeddedNats
from tests.bench.ab import checkout, spawn_side, unknown_revision
from tests.bench.cases import REQUEST_TIMEOUT_S, completion_request

RESULTS = Path(__file__).resolve().parents[2] / "bench-results"
PROCESSES = ("dispatcher-1", "worker-ok")
RATE = 200  # samples a second

# Where a sample goes, by its deepest Python frame's file (the first pattern that matches), or,
# for the two counted apart, by a native frame below it. In the order of the README's table.
CATEGORIES: list[tuple[str, str]] = [
    ("fallback", r"service/(policy|health|budgets|shared_health)\.py"),
    ("natsio", r"service/natsio\.py"),
    ("loop", r"(/asyncio/|uvloop|service/loop\.py)"),
    ("spans", r"(/opentelemetry/|service/telemetry\.py)"),
    ("fake", r"workers/fake\.py"),
    ("own", r"/(service|schemas|workers)/[^/]+\.py$"),
]
LABELS = {
    "own": "Lifeline's own code (the engine, the plan, the front end, the transport, ids; the "
    "worker runtime)",
    "natsio": "the fast path: parsing reads, formatting publishes (`natsio`)",
    "writes": "socket writes, in the kernel",
    "loop": "the event loop and tasks (asyncio, uvloop, `service/loop.py`)",
    "fallback": "the fallback loop, health records, budgets",
    "spans": "spans (OpenTelemetry, `service/telemetry.py`)",
    "msgspec": "msgspec (C)",
    "fake": "the fake provider's own work",
    "rest": "the rest",
}
_WRITES = re.compile(r"^(__)?(libc_)?(send|sendmsg|sendto|write|writev)(64)? ")
_MSGSPEC = re.compile(r"\(\S*msgspec/")
_PYTHON_FRAME = re.compile(r"\((\S+\.py)(?::\d+)?\)$")
_IDLE = re.compile(r"^(epoll_p?wait) ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.profile",
        description="Where the dispatcher's and the worker's time goes under the benchmark's "
        "load, by py-spy: a table by category (bench-results/profile.md) and each process's "
        "collapsed stacks (bench-results/profile-<process>.txt).",
        epilog="Example: python -m tests.bench.profile HEAD~1 --seconds 20",
    )
    parser.add_argument("revision", nargs="?", help="a git revision (default: the working tree)")
    parser.add_argument("--seconds", type=float, default=12.0, help="sampled (default 12)")
    parser.add_argument("--in-flight", type=int, default=64, help="requests (default 64)")
    args = parser.parse_args(argv)
    if args.revision and unknown_revision(args.revision):
        print(f"bench-profile: {args.revision!r} is no commit of this repository", file=sys.stderr)
        return 2
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        print(
            "bench-profile: py-spy is not installed (make install puts it in .venv)",
            file=sys.stderr,
        )
        return 2
    RESULTS.mkdir(exist_ok=True)
    spec = {
        "subject": subjects.COMPLETE,
        "payload": completion_request("main"),
        "in_flight": args.in_flight,
        "decode": "lifeline",
        "warmup_s": 2.0,
        "duration_s": args.seconds + 2.0,
        "timeout_s": REQUEST_TIMEOUT_S,
        "lateness_of_ms": None,
        "count_hedged": False,
    }
    server = EmbeddedNats(port=-1)
    fleet = None
    try:
        with checkout(args.revision) as tree:
            server.start()
            fleet = spawn_side(tree, server)
            fleet["loadgen"].send("run", spec)
            time.sleep(spec["warmup_s"] + 1.0)
            print(f"sampling the dispatcher and the worker for {args.seconds:g} s ...", flush=True)
            spies = {
                name: subprocess.Popen(
                    [
                        str(spy),
                        "record",
                        "--native",
                        "--full-filenames",
                        "--format",
                        "raw",
                        "--rate",
                        str(RATE),
                        "--duration",
                        str(round(args.seconds)),
                        "--pid",
                        str(fleet[name].pid),
                        "--output",
                        str(RESULTS / f"profile-{name}.txt"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for name in PROCESSES
            }
            for name, proc in spies.items():
                _, err = proc.communicate(timeout=args.seconds + 60)
                if proc.returncode != 0:
                    print(f"bench-profile: py-spy on {name} failed: {err.strip()}", file=sys.stderr)
                    return 1
            result = fleet["loadgen"].result(spec["duration_s"] + 60, "run")
    finally:
        if fleet is not None:
            fleet.stop_all()
        server.stop()
    shares = {name: shares_of(RESULTS / f"profile-{name}.txt") for name in PROCESSES}
    table = render(shares, result["rps"], args)
    (RESULTS / "profile.md").write_text(table)
    print(table)
    return 0


def shares_of(collapsed: Path) -> dict[str, float]:
    """Each category's share of a process's busy event-loop thread, from py-spy's collapsed
    stacks (`frame;frame;... count` per line, outermost first): the samples of its main thread
    (the bench child's `child_main`; the span exporter's thread left out) that were not
    waiting in `epoll`."""
    counts: collections.Counter[str] = collections.Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if "child_main (" not in stack or any(_IDLE.match(frame) for frame in frames[-4:]):
            continue
        counts[category(frames)] += int(count)
    total = sum(counts.values()) or 1
    return {key: counts[key] / total for key in LABELS}


def category(frames: list[str]) -> str:
    """Where one sample goes: a socket write or msgspec by the native frames below the deepest
    Python frame, else that Python frame's file."""
    for frame in reversed(frames):
        python = _PYTHON_FRAME.search(frame)
        if python is None:  # native: the two counted apart
            if _WRITES.match(frame):
                return "writes"
            if _MSGSPEC.search(frame):
                return "msgspec"
            continue
        path = python.group(1)
        for key, pattern in CATEGORIES:
            if re.search(pattern, path):
                return key
        return "rest"
    return "rest"


def render(shares: dict[str, dict[str, float]], rps: float, args: argparse.Namespace) -> str:
    where = args.revision or "the working tree"
    lines = [
        (
            f"py-spy, {where}: {args.seconds:g} s at {args.in_flight} in flight "
            f"({rps:,.0f} req/s, the benchmark's Lifeline side alone), {RATE} samples a second"
        ),
        "",
        "| where the time goes | dispatcher | worker |",
        "|---|---|---|",
    ]
    order = sorted(LABELS, key=lambda k: -(shares["dispatcher-1"][k] + shares["worker-ok"][k]))
    for key in order:
        d, w = shares["dispatcher-1"][key], shares["worker-ok"][key]
        lines.append(f"| {LABELS[key]} | {d:.0%} | {w:.0%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
