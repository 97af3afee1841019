"""`python -m tests.bench [--quick] [--out DIR] [--check]`: run every benchmark case, print and
save the results, and compare the headline figures with the README's."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import time
from pathlib import Path

from tests.bench.cases import (
    FULL,
    HANG_TIMEOUT_S,
    HEDGE_AFTER_MS,
    QUICK,
    TAIL_DURATION_SHARE,
    TAIL_IN_FLIGHT,
    TAIL_SHARE,
    TICK_MS,
    run,
)
from tests.bench.regression import DEFAULT_TOLERANCE
from tests.bench.report import Report

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "bench-results"

# A backslash at the end of a line joins the next line to it: the help keeps its layout.
CASES_HELP = f"""\
cases (all on one embedded nats-server; every component and the load generator in its
own process; rounds interleaved round-robin, the median of the rounds reported):

  direct       the load generator does request/reply straight to an instant responder
               (a plain nats-py subscriber answering a fixed ProviderOk, one task per
               message): the cost of one NATS round trip, at 1 and 64 in flight.
  relay        client -> relay -> responder, the relay being plain nats-py (one task per
               message doing nc.request and publishing the answer): the baseline for a hop.
  lifeline     client -> real dispatcher -> real worker for an instant fake provider,
               with msgspec decoding, audit events and tracing on (SDK TracerProvider,
               default sampler, batch processor, exporter that drops the spans).
               Reported: req/s, p50/p99 latency, server-side CPU per request (from
               /proc), and lifeline/relay for req/s at 64 and p50 at 1 in flight; the
               p50 gap also from one client alternating a Lifeline and a relay request
               (`paired`), so both meet the same moments of the machine.
  fallback     time to fallback: p50 of [failing, ok] minus p50 of [ok], at 1 in flight,
               for a provider answering 503 at once and for a provider with no worker
               (no responders); and, at 64 in flight, a hung provider with a
               {HANG_TIMEOUT_S * 1000:g} ms timeout: how late after the timeout the next \
attempt starts.
  scaling      lifeline at 64 in flight with 1 and with 2 dispatcher processes.
  concurrency  lifeline with a {TICK_MS:g} ms provider at 1, 8 and 64 in flight: \
throughput must grow.
  hedging      p50/p99 at {TAIL_IN_FLIGHT} in flight with a slow primary: \
a weighted group of two fake
               providers, {TAIL_SHARE * 100:g} % of calls taking {FULL.tail_latency_ms:g} ms \
({QUICK.tail_latency_ms:g} with --quick), the rest
               instant; without hedging, hedged after {HEDGE_AFTER_MS:g} ms with budgets \
that never say no,
               and hedged with the default budgets (hedge 0.1, retry 0.2), with the share of
               requests hedged. Measured for {TAIL_DURATION_SHARE:g}x the --duration of \
the other cases.
  jobs         durable jobs through JetStream (publish, pull, result in KV, pushed back)
               at 1 and 64 in flight, against core request/reply on the same fleet.
  streaming    8 streams straight from a streaming worker and through llm.stream: time to
               first chunk, each chunk's latency, the dispatcher's CPU per relayed chunk.
  memory       dispatcher RSS growth per in-flight request with 10,000 requests (200 with
               --quick) waiting on a slow provider, and RSS after they drain.
  gateway      OpenAI's chat requests over HTTP from one httpx load generator (a connection
               per request in flight), at 1 and 64 in flight: through `lifeline gateway` to
               the dispatcher and worker of the lifeline case (whose NATS figures are the
               baseline), to the same HTTP server stack answering at once (the floor), and
               to LiteLLM's proxy answering with a mock response. LiteLLM is installed on
               first use into .venv-litellm (git-ignored), never in a --quick run; a case
               that cannot be installed or started is skipped, saying why.

targets (printed with PASS/FAIL next to the measured values):
  lifeline/relay req/s at 64 in flight >= 0.75 (goal 0.9); lifeline p50 at 1 in flight
  <= relay p50 + 0.1 ms (one client alternating their requests); a fast fallback (503, no responders) adds <= one round trip
  (direct p50 at 1 in flight) + 0.3 ms; after a hung provider's timeout the next attempt
  starts within 5 ms at p99; <= 10 KiB of dispatcher RSS per in-flight request, and at
  most 20 % of that growth still there after the drain; with the {TICK_MS:g} ms provider,
  req/s at 8 in flight >= 4x that at 1, and at 64 >= 1.2x that at 8; hedged after
  {HEDGE_AFTER_MS:g} ms, the slow primary's p99 <= {HEDGE_AFTER_MS:g} ms + its p50 without \
hedging (a fast
  call) + 5 ms.

Results are printed as Markdown tables with pass/fail against the targets and written
to DIR/results.json (every figure, every round, machine info) and DIR/results.md.

The run ends with a regression check: its lifeline/relay req/s ratio at 64 in flight,
fallback times (503, no responders, p99 after a hung provider's timeout) and RSS per
in-flight request against the figures README.md quotes, kept in tests/bench/reference.toml.
A figure regressed when it is worse than the README's by more than --tolerance (15 %) and
by more than its slack (in that file, for sub-millisecond figures). Ratios come from this
one run; times and memory compare loosely when this machine is not the README's.

Exit status: 1 when a request failed, or with --check when a figure regressed; else 0
(targets may still fail).
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description=(
            "Lifeline benchmark suite: overhead vs a plain NATS relay, "
            "fallback, memory, scaling, hedging."
        ),
        epilog=CASES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=(
            "tiny counts and short rounds (a few seconds): proves the suite works, "
            "figures are noise"
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"where results.json and results.md go (default: {DEFAULT_OUT}, git-ignored)",
    )
    parser.add_argument("--rounds", type=int, help="rounds per case (default: 5, quick: 2)")
    parser.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help="measured seconds per case and round (default: 2, quick: 0.2)",
    )
    parser.add_argument(
        "--no-litellm",
        action="store_true",
        help="skip the LiteLLM proxy case (a full run installs it into .venv-litellm first)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when a figure regressed against the README's beyond the tolerance "
        "(without it the comparison is only printed)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE * 100,
        metavar="PERCENT",
        help="how much worse than the README's a figure may be before it counts as regressed "
        f"(default: {DEFAULT_TOLERANCE * 100:g})",
    )
    return parser.parse_args(argv)


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so the `finally` blocks stop every child process


def log(*args: object, **kwargs: object) -> None:
    print(*args, **kwargs)  # type: ignore[call-overload]
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = QUICK if args.quick else FULL
    if args.rounds:
        profile = dataclasses.replace(profile, rounds=args.rounds)
    if args.duration:
        profile = dataclasses.replace(profile, duration_s=args.duration)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    report = Report(profile, log)
    started = time.monotonic()
    try:
        environment = run(
            profile,
            log,
            report.rounds_done,
            report.memory_done,
            with_litellm=not args.quick and not args.no_litellm,
            notes=report.notes,
        )
    except KeyboardInterrupt:
        log("\ninterrupted: every process was stopped; no results written")
        return 130
    ok = report.finish(args.out, environment, tolerance=args.tolerance / 100)
    log(f"done in {time.monotonic() - started:.0f} s")
    if args.check and report.regressed:
        log(f"--check: worse than the README beyond the tolerance: {', '.join(report.regressed)}")
    return exit_status(ok, report.regressed, args.check)


def exit_status(requests_ok: bool, regressed: list[str], check: bool) -> int:
    """1 for a broken run, or with --check for a regressed figure; else 0."""
    return 0 if requests_ok and not (check and regressed) else 1


if __name__ == "__main__":
    sys.exit(main())
