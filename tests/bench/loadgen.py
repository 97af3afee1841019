"""The load generator: a child process that drives request/reply load over one connection.

Two commands:

    run    closed loop: `in_flight` client coroutines, each sending its next request when
           the reply to its previous one arrives. Requests run for `warmup_s` unmeasured,
           then for `duration_s` measured: throughput counts the replies that arrive in the
           measured window, latency is taken from those replies. After the window the
           coroutines stop sending and the outstanding requests are awaited, so nothing
           spills into the next measurement.
    burst  open burst: `count` requests sent at once, all awaited (for the memory case).

Every reply is decoded (ProviderReply for direct/relay, CompletionReply for Lifeline) and
anything but a success counts as an error. For the hung-provider case, `lateness_of_ms`
asks for the lateness of the first attempt's timeout: attempts[0].latency_ms minus it.
For the hedging case, `count_hedged` counts the measured replies with a hedged attempt
(and those a hedge won); other cases never look at the attempts.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import nats

from schemas import ProviderOk
from schemas.wire import provider_reply_decoder, reply_decoder
from tests.bench.harness import Served


async def _quiet(exc: Exception) -> None:
    """Connection trouble shows up as failed requests; no need to log it too."""


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..1); NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def _check(kind: str, data: bytes) -> tuple[bool, Any]:
    """(success, decoded reply) for a reply body."""
    if kind == "lifeline":
        reply = reply_decoder.decode(data)
        return reply.status == "ok", reply
    reply = provider_reply_decoder.decode(data)
    return isinstance(reply, ProviderOk), reply


def _describe_error(reply: Any) -> str:
    error = getattr(reply, "error", None) or reply
    return repr(error)[:300]


class _Tally:
    """What one measurement collects."""

    def __init__(self, count_hedged: bool = False) -> None:
        self.count_hedged = count_hedged
        self.hedged = 0  # measured replies with an attempt started as a hedge
        self.hedge_won = 0  # ... whose answer came from that hedge
        self.latencies_ms: list[float] = []
        self.lateness_ms: list[float] = []
        self.errors = 0
        self.handled = 0  # every reply or failure, measured or not (CPU per request uses it)
        self.first_error = ""

    def error(self, text: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or text

    def hedges(self, attempts: Any) -> None:
        hedges = [a for a in attempts if a.hedge]
        if hedges:
            self.hedged += 1
            self.hedge_won += any(a.outcome == "ok" for a in hedges)

    def summary(self, window_s: float) -> dict[str, Any]:
        latencies = sorted(self.latencies_ms)
        lateness = sorted(self.lateness_ms)
        counted = self.count_hedged and bool(latencies)
        return {
            "completed": len(latencies),
            "handled": self.handled,
            "errors": self.errors,
            "first_error": self.first_error,
            "window_s": window_s,
            "rps": len(latencies) / window_s if window_s > 0 else math.nan,
            "p50_ms": percentile(latencies, 0.50),
            "p99_ms": percentile(latencies, 0.99),
            "lateness_p50_ms": percentile(lateness, 0.50),
            "lateness_p99_ms": percentile(lateness, 0.99),
            "hedged_share": self.hedged / len(latencies) if counted else math.nan,
            "hedge_won_share": self.hedge_won / len(latencies) if counted else math.nan,
        }


class LoadGen:
    def __init__(self, nc: nats.NATS) -> None:
        self.nc = nc

    async def _one(self, spec: dict[str, Any], tally: _Tally, counts: Any) -> None:
        """One request; `counts(t_sent, t_done)` says whether it is measured."""
        sent = time.perf_counter()
        try:
            msg = await self.nc.request(spec["subject"], spec["payload"], timeout=spec["timeout_s"])
            ok, reply = _check(spec["decode"], msg.data)
        except Exception as exc:
            ok, reply = False, exc
        done = time.perf_counter()
        tally.handled += 1
        if not counts(sent, done):
            return
        if not ok:
            tally.error(_describe_error(reply))
            return
        tally.latencies_ms.append((done - sent) * 1000)
        late_of = spec.get("lateness_of_ms")
        if late_of is not None and len(reply.attempts) > 1:
            tally.lateness_ms.append(reply.attempts[0].latency_ms - late_of)
        if tally.count_hedged:
            tally.hedges(reply.attempts)

    async def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        tally = _Tally(spec.get("count_hedged", False))
        begin = time.perf_counter() + spec["warmup_s"]
        end = begin + spec["duration_s"]

        def in_window(_sent: float, done: float) -> bool:
            return begin <= done <= end

        async def client() -> None:
            while time.perf_counter() < end:
                await self._one(spec, tally, in_window)

        await self._bounded(
            asyncio.gather(*(client() for _ in range(spec["in_flight"]))),
            spec["warmup_s"] + spec["duration_s"] + spec["timeout_s"],
        )
        return tally.summary(spec["duration_s"])

    async def _bounded(self, work: Any, limit_s: float) -> None:
        """Fail loudly instead of hanging when requests never finish (e.g. nats-server died)."""
        try:
            async with asyncio.timeout(limit_s + 5):
                await work
        except TimeoutError:
            raise RuntimeError(
                f"requests still unfinished after {limit_s + 5:g} s; is nats-server alive?"
            ) from None

    async def burst(self, spec: dict[str, Any]) -> dict[str, Any]:
        tally = _Tally()
        started = time.perf_counter()
        await self._bounded(
            asyncio.gather(
                *(self._one(spec, tally, lambda s, d: True) for _ in range(spec["count"]))
            ),
            spec["timeout_s"],
        )
        return tally.summary(time.perf_counter() - started)


async def setup(params: dict[str, Any]) -> Served:
    nc = await nats.connect(params["url"], name=params["name"], error_cb=_quiet)
    gen = LoadGen(nc)
    return Served({"run": gen.run, "burst": gen.burst}, stop=nc.close)
