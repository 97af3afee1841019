"""`python -m tests.soak [--minutes M] [--burst N]` (or `make soak`): the contract under a flood.

Real processes on an embedded nats-server: one dispatcher (dispatcher.max_in_flight = 1000)
and a worker for a fake provider that takes 2 s per call. Then:

  1. a burst of --burst requests (default 60,000) published at once, each with timeout_s = 5;
  2. steady traffic under the in-flight bound for the rest of --minutes;
  3. the same burst again, to show memory does not ratchet up.

For every request it counts replies and audit events (exactly one of each), how late each
reply came relative to the request's deadline, the outcomes, and the dispatcher's peak and
after-drain RSS. Prints a table and writes bench-results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import nats

from schemas.wire import encoder
from service.embedded import EmbeddedNats
from tests.helpers import Ledger, LifelineProcess, write_config

TIMEOUT_S = 5.0
SLACK_S = 1.0
PROVIDER_LATENCY_MS = 2000
MAX_IN_FLIGHT = 1000
OUT = Path(__file__).resolve().parents[1] / "bench-results" / "soak.json"


class RssSampler(threading.Thread):
    """The dispatcher's RSS every 100 ms, for the peak of a phase."""

    def __init__(self, proc: LifelineProcess) -> None:
        super().__init__(daemon=True)
        self.proc, self.peak_kib, self.running = proc, 0, True

    def run(self) -> None:
        while self.running:
            self.peak_kib = max(self.peak_kib, self.proc.memory_kib()["VmRSS"])
            time.sleep(0.1)


def request(request_id: str) -> bytes:
    return encoder.encode(
        {
            "id": request_id,
            "route": "slow",
            "timeout_s": TIMEOUT_S,
            "messages": [{"role": "user", "content": "soak"}],
        }
    )


async def burst(
    ledger: Ledger, dispatcher: LifelineProcess, prefix: str, count: int
) -> dict[str, Any]:
    sampler = RssSampler(dispatcher)
    sampler.start()
    ids = [f"{prefix}-{n}" for n in range(count)]
    started = time.monotonic()
    replies0, audits0 = sum(ledger.replies.values()), ledger.audit_events
    for request_id in ids:
        await ledger.send(request_id, request(request_id))
    sent_s = time.monotonic() - started
    await _wait(ledger, replies0 + count, audits0 + count, TIMEOUT_S + 120, f"{prefix}: ")
    drained_s = time.monotonic() - started
    await asyncio.sleep(3)  # the dispatcher trims its memory a moment after the drain
    sampler.running = False
    return _figures(
        ledger, ids, sent_s, drained_s, sampler.peak_kib, dispatcher.memory_kib()["VmRSS"]
    )


async def steady(
    ledger: Ledger, dispatcher: LifelineProcess, seconds: float, rate_per_s: int
) -> dict[str, Any]:
    sampler = RssSampler(dispatcher)
    sampler.start()
    ids: list[str] = []
    started = time.monotonic()
    replies0, audits0 = sum(ledger.replies.values()), ledger.audit_events
    while time.monotonic() - started < seconds:
        tick = time.monotonic()
        for _ in range(rate_per_s // 10):
            ids.append(f"steady-{len(ids)}")
            await ledger.send(ids[-1], request(ids[-1]))
        await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
    sent_s = time.monotonic() - started
    await _wait(ledger, replies0 + len(ids), audits0 + len(ids), TIMEOUT_S + 60, "steady: ")
    drained_s = time.monotonic() - started
    await asyncio.sleep(3)
    sampler.running = False
    return _figures(
        ledger, ids, sent_s, drained_s, sampler.peak_kib, dispatcher.memory_kib()["VmRSS"]
    )


async def _wait(ledger: Ledger, replies: int, audits: int, timeout_s: float, label: str) -> None:
    deadline, shown = time.monotonic() + timeout_s, 0.0
    while sum(ledger.replies.values()) < replies or ledger.audit_events < audits:
        if time.monotonic() > deadline:
            break  # the figures will show what is missing
        if time.monotonic() - shown > 5:
            print(
                f"  {label}{sum(ledger.replies.values()):,}/{replies:,} replies, "
                f"{ledger.audit_events:,}/{audits:,} audit events",
                flush=True,
            )
            shown = time.monotonic()
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # a duplicate would arrive in this spell


def _figures(
    ledger: Ledger, ids: list[str], sent_s: float, drained_s: float, peak_kib: int, after_kib: int
) -> dict:
    outcomes = Counter(
        (ledger.reply_of[i].error.type if ledger.reply_of[i].error else "ok")
        if i in ledger.reply_of
        else "no reply"
        for i in ids
    )
    after = sorted(ledger.reply_after_s.get(i, float("inf")) for i in ids)
    return {
        "requests": len(ids),
        "exactly_one_reply": sum(ledger.replies[i] == 1 for i in ids),
        "exactly_one_audit": sum(ledger.audits[i] == 1 for i in ids),
        "outcomes": dict(outcomes),
        "reply_p50_s": round(after[len(after) // 2], 3),
        "reply_p99_s": round(after[int(len(after) * 0.99)], 3),
        "reply_max_s": round(after[-1], 3),
        "late": sum(a > TIMEOUT_S + SLACK_S for a in after),
        "sent_s": round(sent_s, 2),
        "drained_s": round(drained_s, 2),
        "rss_peak_mib": round(peak_kib / 1024, 1),
        "rss_after_drain_mib": round(after_kib / 1024, 1),
    }


def _print(name: str, f: dict[str, Any]) -> None:
    print(
        f"\n{name}: {f['requests']:,} requests sent in {f['sent_s']} s, "
        f"all answered after {f['drained_s']} s"
    )
    print(
        f"  exactly one reply: {f['exactly_one_reply']:,}   "
        f"exactly one audit event: {f['exactly_one_audit']:,}"
    )
    print(f"  outcomes: {', '.join(f'{k} {v:,}' for k, v in sorted(f['outcomes'].items()))}")
    print(
        f"  reply after p50 {f['reply_p50_s']} s, p99 {f['reply_p99_s']} s, "
        f"max {f['reply_max_s']} s; later than timeout_s + {SLACK_S:g} s: {f['late']}"
    )
    print(
        f"  dispatcher RSS: peak {f['rss_peak_mib']} MiB, "
        f"{f['rss_after_drain_mib']} MiB after the drain"
    )


async def main(minutes: float, count: int, rate_per_s: int) -> int:
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(port=-1) as server:
        config = write_config(
            Path(tmp) / "soak.toml",
            {
                "dispatcher": {"max_in_flight": MAX_IN_FLIGHT},
                "providers": {"slow": {"kind": "fake", "latency_ms": PROVIDER_LATENCY_MS}},
                "routes": {"slow": {"targets": ["slow"]}},
            },
        )
        common = ["--config", str(config), "--nats-url", server.url]
        worker = LifelineProcess(["worker", "slow", *common], Path(tmp) / "worker.log")
        dispatcher = LifelineProcess(["dispatcher", *common], Path(tmp) / "dispatcher.log")
        try:
            worker.wait_for_log("worker slow serving")
            dispatcher.wait_for_log("dispatcher serving")
            idle_kib = dispatcher.memory_kib()["VmRSS"]
            print(
                f"dispatcher idle RSS {idle_kib / 1024:.1f} MiB; max_in_flight {MAX_IN_FLIGHT}, "
                f"provider {PROVIDER_LATENCY_MS} ms, timeout_s {TIMEOUT_S:g}",
                flush=True,
            )
            nc = await nats.connect(server.url, pending_size=256 * 1024 * 1024)
            ledger = await Ledger(nc).start()
            started = time.monotonic()
            results = {"idle_rss_mib": round(idle_kib / 1024, 1)}
            print(f"burst 1: {count:,} requests at once", flush=True)
            results["burst_1"] = await burst(ledger, dispatcher, "burst1", count)
            _print("burst 1", results["burst_1"])
            left_s = minutes * 60 - (time.monotonic() - started) - 30
            if left_s > 5:
                print(f"\nsteady: {rate_per_s}/s for {left_s:.0f} s", flush=True)
                results["steady"] = await steady(ledger, dispatcher, left_s, rate_per_s)
                _print("steady", results["steady"])
            print(f"\nburst 2: {count:,} requests at once", flush=True)
            results["burst_2"] = await burst(ledger, dispatcher, "burst2", count)
            _print("burst 2", results["burst_2"])
            await nc.close()
        finally:
            dispatcher.stop()
            worker.stop()
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {OUT}")
    phases = [v for v in results.values() if isinstance(v, dict)]
    kept = all(
        p["exactly_one_reply"] == p["exactly_one_audit"] == p["requests"] and not p["late"]
        for p in phases
    )
    print("contract held" if kept else "CONTRACT BROKEN: see the figures above")
    return 0 if kept else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=3.0, help="total length (default: 3)")
    parser.add_argument(
        "--burst", type=int, default=60_000, help="requests per burst (default: 60000)"
    )
    parser.add_argument(
        "--rate", type=int, default=300, help="steady requests per second (default: 300)"
    )
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.minutes, args.burst, args.rate)))
