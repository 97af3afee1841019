"""`python -m tests.bench.ab BASE [NEW]`: what a change buys, measured by loading two versions
of Lifeline at the same time.

On a shared machine the figures of one run drift by 10-20 % from minute to minute (other
tenants take the CPU, the caches, the memory bandwidth), more than most single changes to the
hot path are worth. Taking turns (the suite's interleaved rounds) spreads that drift over the
cases, but a case still meets the machine in a different minute than its baseline. Here both
versions run at once, each a dispatcher and a worker on a nats-server of its own with a load
generator of its own, closed-loop at the same number of requests in flight: whatever the
machine does to one it does to the other, and the two compete for the same cores, so the one
that costs less per request serves more. Competing also amplifies: the side that gets ahead
serves bigger batches, each cheaper, so single rounds swing by up to a quarter either way. Read
the medians of many rounds, and the CPU time per request beside the ratio: a version against
itself has given medians of 0.94 and 1.01 (runs of 8 and 4 rounds) on the 2-core machine of
the README's figures, so differences under about 10 % are not resolved.

BASE and NEW are git revisions (NEW defaults to the working tree as it is, uncommitted changes
included); each revision is checked out into a temporary git worktree, removed afterwards.
Printed per round and as medians: each side's requests per second, NEW/BASE, and the CPU time
per request of each side's dispatcher and worker (from /proc).

With --paired, latency instead of throughput: one client (this process) sends a request to
A, then one to B (B first every other time), one at a time, so both meet the same moments;
printed per round and as medians: each side's p50 and B's p50 minus A's. Run at 1 in flight,
this resolves a few hundredths of a millisecond where separate runs spread by tenths.

--route picks what each request does: `main` (default; one good call), `fail_ok` (a worker
answering 503, then the fallback to a good one: with --paired, what a fallback costs) or
`ghost_ok` (a provider without a worker, no responders, then the good one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from schemas import subjects
from service.embedded import EmbeddedNats
from tests.bench.cases import FULL, REQUEST_TIMEOUT_S, completion_request, fleet_specs
from tests.bench.harness import Fleet, cpu_snapshot

ROOT = Path(__file__).resolve().parents[2]
MEASURED = ("dispatcher-1", "worker-ok")  # whose CPU time is reported per request
SIDE = ("loadgen", *MEASURED)  # the processes of one side, and the route's other workers
ROUTE_WORKERS = {"main": (), "fail_ok": ("worker-fail",), "ghost_ok": ()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.ab",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("base", metavar="BASE", help="git revision to compare against")
    parser.add_argument(
        "new", metavar="NEW", nargs="?", help="git revision (default: the working tree)"
    )
    parser.add_argument("--rounds", type=int, default=10, help="rounds (default: 10)")
    parser.add_argument(
        "--duration", type=float, default=3.0, metavar="SECONDS", help="per round (default: 3)"
    )
    parser.add_argument(
        "--in-flight", type=int, default=64, metavar="N", help="requests in flight (default: 64)"
    )
    parser.add_argument(
        "--route",
        choices=sorted(ROUTE_WORKERS),
        default="main",
        help="main: one good call (default); fail_ok: a 503, then the fallback; ghost_ok: no "
        "responders, then the fallback",
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="p50 at 1 in flight, one client taking turns between A and B (not throughput)",
    )
    return parser.parse_args(argv)


@contextlib.contextmanager
def checkout(revision: str | None) -> Iterator[Path]:
    """The tree of `revision` in a temporary git worktree (None: this working tree)."""
    if revision is None:
        yield ROOT
        return
    with tempfile.TemporaryDirectory(prefix="lifeline-ab-") as scratch:
        tree = Path(scratch) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), revision],
            check=True,
        )
        try:
            yield tree
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False
            )


def spawn_side(tree: Path, server: EmbeddedNats, route: str = "main") -> Fleet:
    """A load generator, a dispatcher and the route's workers whose code comes from `tree`:
    spawned processes import from the parent's sys.path as it is when they start."""
    fleet = Fleet()
    side = (*SIDE, *ROUTE_WORKERS[route])
    sys.path.insert(0, str(tree))
    try:
        fleet.spawn(
            [_route_only(spec, route) for spec in fleet_specs(server.url, FULL) if spec[0] in side]
        )
    finally:
        sys.path.remove(str(tree))
    return fleet


def _route_only(
    spec: tuple[str, Any, dict[str, Any]], route: str
) -> tuple[str, Any, dict[str, Any]]:
    """A process's spec with a config of `route` and its providers alone: what either
    revision measures, and settings an older revision would refuse as unknown stay out."""
    name, setup, params = spec
    if "config" not in params:
        return spec
    config = params["config"]
    routes = {"main": config["routes"]["main"], route: config["routes"][route]}
    providers = {p: config["providers"][p] for r in routes.values() for p in r["targets"]}
    return name, setup, {**params, "config": {"providers": providers, "routes": routes}}


def measure(fleets: list[Fleet], spec: dict[str, Any]) -> list[dict[str, Any]]:
    """One round: both load generators run at once."""
    pids = [{name: fleet[name].pid for name in MEASURED} for fleet in fleets]
    before = [cpu_snapshot(p) for p in pids]
    for fleet in fleets:
        fleet["loadgen"].send("run", spec)
    results = [fleet["loadgen"].result(spec["duration_s"] + 60, "run") for fleet in fleets]
    after = [cpu_snapshot(p) for p in pids]
    for result, b, a in zip(results, before, after, strict=True):
        handled = max(1, result["handled"])
        result["cpu_us"] = {name: (a[name] - b[name]) / handled * 1e6 for name in MEASURED}
    return results


async def paired_round(urls: list[str], payload: bytes, duration_s: float) -> list[float]:
    """One round of --paired: the p50 (ms) of A's and of B's requests, taking turns."""
    import nats

    clients = [await nats.connect(url) for url in urls]
    times: list[list[float]] = [[], []]
    try:
        for client in clients:  # warm up: connections, caches, the first plan
            for _ in range(50):
                await client.request(subjects.COMPLETE, payload, timeout=REQUEST_TIMEOUT_S)
        end, turn = time.monotonic() + duration_s, 0
        while time.monotonic() < end:
            for side in (turn % 2, 1 - turn % 2):
                start = time.perf_counter()
                await clients[side].request(subjects.COMPLETE, payload, timeout=REQUEST_TIMEOUT_S)
                times[side].append((time.perf_counter() - start) * 1000)
            turn += 1
    finally:
        for client in clients:
            await client.close()
    return [statistics.median(side) for side in times]


def paired(servers: list[EmbeddedNats], payload: bytes, rounds: int, duration_s: float) -> None:
    results = []
    for r in range(1, rounds + 1):
        a, b = asyncio.run(paired_round([server.url for server in servers], payload, duration_s))
        results.append((a, b))
        print(
            f"round {r}/{rounds}: p50 A {a:.3f} ms, B {b:.3f} ms, B-A {b - a:+.3f} ms", flush=True
        )
    gaps = [b - a for a, b in results]
    print(
        f"p50: A {statistics.median(a for a, _ in results):.3f} ms, "
        f"B {statistics.median(b for _, b in results):.3f} ms; B-A median {statistics.median(gaps):+.3f} ms "
        f"(rounds {min(gaps):+.3f} to {max(gaps):+.3f})"
    )


def unknown_revision(revision: str | None) -> bool:
    if revision is None:
        return False
    found = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
        capture_output=True,
        check=False,
    )
    return found.returncode != 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for revision in (args.base, args.new):
        if unknown_revision(revision):
            print(
                f"bench-ab: {revision!r} is no commit of this repository: name a commit, a "
                "branch or a tag (git log --oneline lists them)",
                file=sys.stderr,
            )
            return 2
    spec = {
        "subject": subjects.COMPLETE,
        "payload": completion_request(args.route),
        "in_flight": args.in_flight,
        "decode": "lifeline",
        "warmup_s": 0.3,
        "duration_s": args.duration,
        "timeout_s": REQUEST_TIMEOUT_S,
        "lateness_of_ms": None,
        "count_hedged": False,
    }
    names = (args.base, args.new or "working tree")
    servers = [EmbeddedNats(port=-1), EmbeddedNats(port=-1)]
    fleets: list[Fleet] = []
    rounds: list[list[dict[str, Any]]] = []
    try:
        with checkout(args.base) as base_tree, checkout(args.new) as new_tree:
            for server, tree in zip(servers, (base_tree, new_tree), strict=True):
                server.start()
                fleets.append(spawn_side(tree, server, args.route))
            if args.paired:
                print(
                    f"A = {names[0]}, B = {names[1]}; route {args.route}, one request at a "
                    "time, taking turns"
                )
                paired(servers, spec["payload"], args.rounds, args.duration)
                return 0
            print(
                f"A = {names[0]}, B = {names[1]}; route {args.route}, {args.in_flight} in "
                "flight, both at once"
            )
            for r in range(1, args.rounds + 1):
                a, b = measure(fleets, spec)
                rounds.append([a, b])
                print(
                    f"round {r}/{args.rounds}: A {a['rps']:,.0f} req/s, B {b['rps']:,.0f} req/s, "
                    f"B/A {b['rps'] / a['rps']:.3f}",
                    flush=True,
                )
                if a["errors"] or b["errors"]:
                    print(f"errors: A {a['errors']}, B {b['errors']}")
                    return 1
    finally:
        for fleet in fleets:
            fleet.stop_all()
        for server in servers:
            server.stop()
    report(rounds, names)
    return 0


def report(rounds: list[list[dict[str, Any]]], names: tuple[str, str]) -> None:
    def median(side: int, figure: str, name: str | None = None) -> float:
        values = [r[side]["cpu_us"][name] if name else r[side][figure] for r in rounds]
        return statistics.median(values)

    for side, label in enumerate("AB"):
        cpu = ", ".join(f"{name} {median(side, 'cpu_us', name):.0f}" for name in MEASURED)
        print(
            f"{label} ({names[side]}): {median(side, 'rps'):,.0f} req/s, p50 "
            f"{median(side, 'p50_ms'):.2f} ms; CPU µs/req: {cpu}"
        )
    ratios = [b["rps"] / a["rps"] for a, b in rounds]
    print(
        f"B/A req/s: median {statistics.median(ratios):.3f} "
        f"(rounds {min(ratios):.3f} to {max(ratios):.3f})"
    )


if __name__ == "__main__":
    # Spawned children would import this module again by name, and BASE may predate it; they
    # need nothing of it (their code is tests.bench.harness and the tree's own modules).
    __spec__ = None
    del __file__
    sys.exit(main())
