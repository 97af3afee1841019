"""A worker replica that dies with attempts in flight costs those attempts, not its provider.

Two replicas of `slow` share its queue group. One dies abruptly: its subscription goes and the
attempts it was working on are never answered, which is what the rest of the system sees of a
SIGKILLed process. Those attempts time out, each at the timeout of the route that made it, while
the surviving replica answers everything sent since. The breaker must not keep the survivor
benched once those late timeouts come in (service/health.py weighs calls in the order they were
made): once it serves again, it serves every request sent since, through the second burst.
(How long a cooldown lasts is the breaker's own test, on a fake clock: tests/test_health.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from helpers import USER_HELLO, ask, config, fake, wait_for

from service.app import start_worker
from service.config import parse_config

COOLDOWN_S = 0.4
# The routes share one breaker (slow:fake-1) but not their timeouts, so the dead replica's
# attempts time out in two bursts, 1.6 s apart. The quick one leaves the survivor's calls
# (100 ms) 0.7 s to spare: a busy CI machine once kept three of them from answering in 0.4 s.
QUICK_TIMEOUT_S = 0.8
PATIENT_TIMEOUT_S = 2.4


def replica_config(latency_ms: float = 100) -> dict[str, Any]:
    return {
        "providers": {
            "slow": fake(reply="slow", latency_ms=latency_ms),
            "backup": fake(reply="backup"),
        },
        "breaker": {"consecutive_failures": 3, "cooldown_s": COOLDOWN_S},
        "routes": {
            "quick": {"targets": [{"provider": "slow", "timeout_s": QUICK_TIMEOUT_S}, "backup"]},
            "patient": {
                "targets": [{"provider": "slow", "timeout_s": PATIENT_TIMEOUT_S}, "backup"]
            },
        },
    }


async def die(runtime: Any) -> None:
    """Kill a replica abruptly: its interest goes and its attempts in flight are never answered."""
    sub, runtime._sub = runtime._sub, None
    await sub.unsubscribe()
    for task in list(runtime._tasks):
        task.cancel()
    await runtime.nc.flush()  # the server has dropped the subscription before the test goes on


async def steady(client: Any, log: list[tuple[float, float, Any]], done: Any) -> None:
    """One client sending requests one after another until `done()`: (sent, answered, reply),
    readings of one clock, for the order of things (never a duration)."""
    while not done():
        sent = time.monotonic()
        reply = await ask(client, {**USER_HELLO, "route": "quick"})
        log.append((sent, time.monotonic(), reply))


async def answered(asking: Any) -> tuple[float, Any]:
    reply = await asking
    return time.monotonic(), reply


async def test_a_dead_replica_costs_its_attempts_in_flight_not_its_provider(
    lifeline, client, nats_url, tracers
):
    await lifeline(replica_config(), workers=["backup"])
    # The replica that dies is busy with long calls, so its attempts are still in flight when it
    # goes; it is alone at first so that it takes the whole burst.
    doomed_component, doomed = await start_worker(
        parse_config(replica_config(5000)), "slow", nats_url, tracers
    )
    survivor_component = survivor = None
    log: list[tuple[float, float, Any]] = []
    try:
        burst = {
            route: [
                asyncio.create_task(
                    answered(ask(client, {**USER_HELLO, "route": route}, timeout_s=10))
                )
                for _ in range(6)
            ]
            for route in ["quick", "patient"]
        }
        every = [*burst["quick"], *burst["patient"]]
        await wait_for(
            lambda: doomed.in_flight >= len(every),
            timeout_s=5,
            what=lambda: (
                f"{doomed.in_flight} of the burst's {len(every)} calls reached the replica"
            ),
            interval_s=0.005,
        )
        survivor_component, survivor = await start_worker(
            parse_config(replica_config()), "slow", nats_url, tracers
        )
        await die(doomed)

        def enough() -> bool:
            """Both bursts of late timeouts are in, and ten requests sent after the last of
            them (and after the survivor served again) are answered."""
            if not all(task.done() for task in every):
                return False
            back = back_at(log, burst)
            last_timeout = max(task.result()[0] for task in every)
            return back is not None and sum(1 for x in log if x[0] > max(back, last_timeout)) >= 10

        async with asyncio.timeout(60):
            await asyncio.gather(*(steady(client, log, enough) for _ in range(3)))
    finally:
        if survivor_component is not None:
            await survivor_component.stop()
        await doomed_component.stop()

    # What the dead replica cost: its attempts in flight, each falling back after its timeout.
    burst_replies = [task.result()[1] for task in every]
    assert {tuple((a.target, a.outcome) for a in r.attempts) for r in burst_replies} == {
        (("slow", "timeout"), ("backup", "ok"))
    }
    # Once the survivor serves again after the first burst of timeouts, it serves every request
    # sent since, through the second burst: calls made before its answers are old news.
    back = back_at(log, burst)
    assert back is not None
    later = [[(a.target, a.outcome, a.reason) for a in r.attempts] for s, _, r in log if s > back]
    assert later
    # Should this fail, say whether the survivor dropped calls as already past their deadline
    # (its clock ahead of the dispatcher's, e.g. a clock step) or never saw them.
    seen = f"the survivor took {survivor.tally.requests} calls, dropped {survivor.expired} as late"
    assert [attempts for attempts in later if attempts != [("slow", "ok", None)]] == [], seen


def back_at(log: list[tuple[float, float, Any]], burst: dict[str, list[Any]]) -> float | None:
    """When the survivor first answered a request sent after the first burst of late timeouts
    (the quick route's) was in; None until then."""
    if not all(task.done() for task in burst["quick"]):
        return None
    quick_in = max(task.result()[0] for task in burst["quick"])
    served = [
        got
        for sent, got, reply in log
        if sent > quick_in and [(a.target, a.outcome) for a in reply.attempts] == [("slow", "ok")]
    ]
    return min(served, default=None)


async def test_a_worker_whose_client_stops_reading_stops_so_a_supervisor_restarts_it(
    nats_url, tracers, caplog
):
    """nats-py's read loop ends on an error it does not expect (a MemoryError under a memory
    limit, measured) with a log line, and the connection stays open and looks connected: the
    worker heard nothing more and never exited, and no supervisor restarts a live process."""
    component, _ = await start_worker(
        parse_config(config({"main": fake()})), "main", nats_url, tracers
    )
    try:
        parser = component.nc._ps

        async def out_of_memory(data: bytes = b"") -> None:
            raise MemoryError

        parser.parse = out_of_memory  # the next read the read loop parses (a PONG here)
        with contextlib.suppress(Exception):
            await component.nc.flush(timeout=0.5)
        assert component.nc.is_connected  # as nats-py sees it
        assert await asyncio.wait_for(component.watch.wait_lost(), 10) == "worker main"
        assert any("stopped reading" in r.getMessage() for r in caplog.records)
    finally:
        await component.stop(drain_timeout_s=1)
