"""Turn raw rounds into medians, Markdown tables, pass/fail against the targets, and files.

A case's figure is the median over its rounds of each per-round figure (req/s, p50, p99,
CPU per request, ...); comparisons (ratios, deltas) are computed from those medians, so
they match the tables. Tables are printed as soon as their section is complete, and
written at the end to results.md (tables) and results.json (every figure, every round,
the targets and the machine).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from service.embedded import EmbeddedNatsError, server_binary
from service.loop import loop_name
from tests.bench import regression
from tests.bench.cases import (
    HANG_TIMEOUT_S,
    HEDGE_AFTER_MS,
    STREAM_FLOOD,
    STREAM_IN_FLIGHT,
    STREAM_PACED,
    TAIL_IN_FLIGHT,
    TAIL_SHARE,
    TICK_MS,
    Case,
    Profile,
)
from tests.bench.regression import DEFAULT_TOLERANCE

Log = Callable[..., None]

_MEDIAN_KEYS = (
    "rps",
    "p50_ms",
    "p99_ms",
    "lateness_p50_ms",
    "lateness_p99_ms",
    "server_cpu_us_per_req",
    "nats_cpu_us_per_req",
    "client_cpu_us_per_req",
    "hedged_share",
    "hedge_won_share",
    # the paired case only: its pair's p50, and its own minus that, from the same rounds
    "pair_p50_ms",
    "paired_gap_p50_ms",
    # streaming cases only (NaN elsewhere)
    "ttft_p50_ms",
    "ttft_p99_ms",
    "chunk_p50_ms",
    "chunk_p99_ms",
)

# ---- numbers -------------------------------------------------------------------------


def _median(values: list[Any]) -> float:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over a case's rounds; errors are summed."""
    summary = {key: _median([r.get(key, math.nan) for r in rounds]) for key in _MEDIAN_KEYS}
    if "cpu_us_per_chunk" in rounds[0]:
        names = sorted({name for r in rounds for name in r["cpu_us_per_chunk"]})
        summary["cpu_us_per_chunk"] = {
            n: _median([r["cpu_us_per_chunk"].get(n, 0.0) for r in rounds]) for n in names
        }
    names = sorted({name for r in rounds for name in r["cpu_us_per_req"]})
    summary["cpu_us_per_req"] = {
        n: _median([r["cpu_us_per_req"].get(n, 0.0) for r in rounds]) for n in names
    }
    summary["errors"] = sum(r["errors"] for r in rounds)
    summary["first_error"] = next((r["first_error"] for r in rounds if r["first_error"]), "")
    summary["completed_per_round"] = [r["completed"] for r in rounds]
    return summary


def _f(value: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if value is None or math.isnan(value) else fmt.format(value)


def _rps(value: float) -> str:
    return _f(value, "{:,.0f}")


def _us(value: float | None) -> str:
    return _f(value, "{:.0f}")


def _pct(share: float | None) -> str:
    return "n/a" if share is None or math.isnan(share) else f"{share * 100:.1f} %"


def _kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---- sections ------------------------------------------------------------------------


def _breakdown(cpu: dict[str, float]) -> str:
    parts = [
        f"{name} {us:.0f}" for name, us in sorted(cpu.items(), key=lambda kv: -kv[1]) if us >= 1
    ]
    return ", ".join(parts) or "-"


def overhead_section(s: dict[str, dict], comparisons: dict[str, float]) -> str:
    rows = []
    for n in (1, 64):
        for system in ("direct", "relay", "lifeline"):
            c = s[f"{system}@{n}"]
            rows.append(
                [
                    system,
                    str(n),
                    _rps(c["rps"]),
                    _f(c["p50_ms"]),
                    _f(c["p99_ms"]),
                    _us(c["server_cpu_us_per_req"]),
                    _breakdown(c["cpu_us_per_req"]),
                    _us(c["nats_cpu_us_per_req"]),
                    _us(c["client_cpu_us_per_req"]),
                    _cores(c),
                    str(c["errors"]),
                ]
            )
    main = table(
        [
            "system",
            "in flight",
            "req/s",
            "p50 ms",
            "p99 ms",
            "server CPU µs/req",
            "by process (µs/req)",
            "nats-server CPU µs/req",
            "client CPU µs/req",
            "cores busy",
            "errors",
        ],
        rows,
    )
    note = (
        "Server CPU is the relay and its responder, or the dispatcher and worker(s); the client is "
        "the load generator. Cores busy = (server + nats-server + client CPU per request) × "
        f"req/s, out of this machine's {os.cpu_count()}: the closer to {os.cpu_count()}, the more "
        "req/s at 64 in flight is bounded by the total CPU cost per request of all processes "
        "rather than by one of them."
    )
    ratio_rows = [
        ["lifeline / relay, req/s at 64 in flight", _f(comparisons["rps_ratio_64"], "{:.2f}")],
        ["lifeline / relay, req/s at 1 in flight", _f(comparisons["rps_ratio_1"], "{:.2f}")],
        ["lifeline − relay, p50 at 1 in flight", _f(comparisons["p50_delta_1_ms"], "{:+.2f} ms")],
        [
            (
                "lifeline − relay, p50 at 1 in flight, their requests taking turns "
                f"(lifeline {_f(comparisons['paired_lifeline_p50_ms'])} ms, "
                f"relay {_f(comparisons['paired_relay_p50_ms'])} ms)"
            ),
            _f(comparisons["p50_paired_gap_1_ms"], "{:+.2f} ms"),
        ],
        [
            "lifeline − direct, p50 at 1 in flight",
            _f(comparisons["p50_vs_direct_1_ms"], "{:+.2f} ms"),
        ],
        [
            "lifeline / relay, server CPU per request at 64 in flight",
            _f(comparisons["cpu_ratio_64"], "{:.2f}"),
        ],
    ]
    return (
        "### Overhead: direct vs relay vs Lifeline (instant provider)\n\n"
        + main
        + "\n\n"
        + note
        + "\n\n"
        + table(["comparison", "value"], ratio_rows)
    )


def _cores(c: dict[str, Any]) -> str:
    """CPU cores the whole set-up kept busy: every process's CPU per request times req/s."""
    parts = (
        c["server_cpu_us_per_req"],
        c["nats_cpu_us_per_req"] or 0.0,
        c["client_cpu_us_per_req"],
    )
    return _f(sum(parts) * c["rps"] / 1e6, "{:.2f}")


def fallback_section(s: dict[str, dict], comparisons: dict[str, float]) -> str:
    base = s["lifeline@1"]["p50_ms"]
    rows = [
        ["[ok]", _f(base), _f(s["lifeline@1"]["p99_ms"]), "-", str(s["lifeline@1"]["errors"])],
        [
            "[fail 503, ok]",
            _f(s["fallback-503@1"]["p50_ms"]),
            _f(s["fallback-503@1"]["p99_ms"]),
            _f(comparisons["fallback_503_added_ms"], "{:+.2f} ms"),
            str(s["fallback-503@1"]["errors"]),
        ],
        [
            "[no responders, ok]",
            _f(s["fallback-noresp@1"]["p50_ms"]),
            _f(s["fallback-noresp@1"]["p99_ms"]),
            _f(comparisons["fallback_noresp_added_ms"], "{:+.2f} ms"),
            str(s["fallback-noresp@1"]["errors"]),
        ],
    ]
    fast = table(
        ["chain, 1 in flight", "p50 ms", "p99 ms", "time to fallback (p50 − [ok] p50)", "errors"],
        rows,
    )
    h = s["fallback-hang@64"]
    hung = table(
        [
            "chain, 64 in flight",
            "req/s",
            "p50 ms",
            "p99 ms",
            "timeout lateness p50",
            "timeout lateness p99",
            "errors",
        ],
        [
            [
                f"[hung, timeout {HANG_TIMEOUT_S * 1000:g} ms, ok]",
                _rps(h["rps"]),
                _f(h["p50_ms"]),
                _f(h["p99_ms"]),
                _f(h["lateness_p50_ms"], "{:.2f} ms"),
                _f(h["lateness_p99_ms"], "{:.2f} ms"),
                str(h["errors"]),
            ]
        ],
    )
    note = (
        "Timeout lateness = attempts[0].latency_ms − the 100 ms timeout: how long after the "
        "timeout the next attempt starts."
    )
    return "### Time to fallback\n\n" + fast + "\n\n" + hung + "\n\n" + note


def scaling_section(s: dict[str, dict], comparisons: dict[str, float]) -> str:
    rows = []
    for n, key in ((1, "lifeline@64"), (2, "scaling-2@64")):
        c = s[key]
        speedup = "1.00" if n == 1 else _f(comparisons["scaling_speedup"])
        rows.append(
            [
                str(n),
                _rps(c["rps"]),
                _f(c["p50_ms"]),
                _f(c["p99_ms"]),
                _us(c["server_cpu_us_per_req"]),
                speedup,
                str(c["errors"]),
            ]
        )
    note = (
        "The 1-dispatcher row is the lifeline @64 case. All processes share this machine's "
        f"{os.cpu_count()} cores (load generator, nats-server, worker and dispatchers), so this "
        "shows whether a second dispatcher helps here, not the ceiling of a bigger machine."
    )
    return (
        "### Scaling: dispatcher processes in one queue group (64 in flight)\n\n"
        + table(
            ["dispatchers", "req/s", "p50 ms", "p99 ms", "server CPU µs/req", "speedup", "errors"],
            rows,
        )
        + "\n\n"
        + note
    )


def concurrency_section(s: dict[str, dict]) -> str:
    rows, previous = [], None
    for n in (1, 8, 64):
        c = s[f"tick@{n}"]
        growth = "-" if previous is None else _f(c["rps"] / previous, "{:.1f}×")
        ideal = 1000 / TICK_MS * n
        rows.append(
            [
                str(n),
                _rps(c["rps"]),
                _rps(ideal),
                _f(c["p50_ms"]),
                _f(c["p99_ms"]),
                growth,
                str(c["errors"]),
            ]
        )
        previous = c["rps"]
    return f"### Concurrency check: provider with {TICK_MS:g} ms latency\n\n" + table(
        ["in flight", "req/s", "ideal req/s", "p50 ms", "p99 ms", "× previous row", "errors"], rows
    )


def streaming_section(s: dict[str, dict], c: dict[str, float]) -> str:
    rows = []
    for key in ("stream", "stream-flood"):
        for system in ("direct", "lifeline"):
            r = s[f"{key}-{system}@{STREAM_IN_FLIGHT}"]
            dispatcher = r.get("cpu_us_per_chunk", {}).get("dispatcher-1")
            rows.append(
                [
                    f"{system}, {_stream_what(key)}",
                    _f(r["rps"], "{:,.0f}"),
                    _f(r["ttft_p50_ms"]),
                    _f(r["ttft_p99_ms"]),
                    _f(r["chunk_p50_ms"]),
                    _f(r["chunk_p99_ms"]),
                    _f(dispatcher, "{:.1f}") if dispatcher is not None else "-",
                    str(r["errors"]),
                ]
            )
    return (
        f"### Streaming: {STREAM_IN_FLIGHT} streams in flight, straight from a streaming worker "
        "and through llm.stream\n\n"
        + table(
            [
                "path",
                "streams/s",
                "first chunk p50 ms",
                "p99 ms",
                "chunk latency p50 ms",
                "p99 ms",
                "dispatcher CPU µs/chunk",
                "errors",
            ],
            rows,
        )
        + "\n\n"
        + f"Through Lifeline, at {STREAM_PACED[0]} chunks {STREAM_PACED[1]:g} ms apart: "
        f"time to first chunk +{_f(c['stream_ttft_added_p50_ms'])} ms at p50 "
        f"(+{_f(c['stream_ttft_added_p99_ms'])} at p99); each chunk "
        f"+{_f(c['stream_chunk_added_p50_ms'])} ms at p50 "
        f"(+{_f(c['stream_chunk_added_p99_ms'])} at p99). With {STREAM_FLOOD[0]} chunks sent "
        f"at once the dispatcher spends {_f(c['stream_cpu_us_per_chunk'], '{:.1f}')} µs of CPU "
        "per relayed chunk (its per-request cost included, spread over the chunks)."
    )


def jobs_section(s: dict[str, dict], c: dict[str, float]) -> str:
    rows = []
    for n in (1, 64):
        for key, path in ((f"lifeline@{n}", "core request/reply"), (f"jobs@{n}", "durable job")):
            r = s[key]
            rows.append(
                [
                    path,
                    str(n),
                    _rps(r["rps"]),
                    _f(r["p50_ms"]),
                    _f(r["p99_ms"]),
                    _us(r["server_cpu_us_per_req"]),
                    _us(r["nats_cpu_us_per_req"]),
                    str(r["errors"]),
                ]
            )
    return (
        "### Durable jobs against core requests (instant provider)\n\n"
        + table(
            [
                "path",
                "in flight",
                "req/s",
                "p50 ms",
                "p99 ms",
                "server CPU µs/req",
                "nats-server CPU µs/req",
                "errors",
            ],
            rows,
        )
        + "\n\n"
        + "A job's latency runs from its JetStream publish to its result pushed on its "
        "Lifeline-Notify subject: the publish and its PubAck, the pull, the request through "
        "the engine, the result stored in the KV bucket, the push and the ack. At 64 in "
        f"flight jobs run at {_f(c['jobs_rps_ratio_64'])} of core requests' rate."
    )


_HTTP_PATHS = (
    ("lifeline", "NATS: llm.complete, nats-py client"),
    ("gateway", "HTTP: lifeline gateway -> llm.complete"),
    ("canned", "HTTP: the same server stack, canned answer (floor)"),
    ("litellm", "HTTP: LiteLLM proxy, mock_response"),
)


def gateway_section(s: dict[str, dict], c: dict[str, float], notes: dict[str, str]) -> str:
    rows = []
    for n in (1, 64):
        for system, path in _HTTP_PATHS:
            r = s.get(f"{system}@{n}")
            if r is None:
                rows.append([path, str(n), notes.get(system, "not measured"), *[""] * 6])
                continue
            rows.append(
                [
                    path,
                    str(n),
                    _rps(r["rps"]),
                    _f(r["p50_ms"]),
                    _f(r["p99_ms"]),
                    _us(r["server_cpu_us_per_req"]),
                    _breakdown(r["cpu_us_per_req"]),
                    _us(r["client_cpu_us_per_req"]),
                    str(r["errors"]),
                ]
            )
    main = table(
        [
            "path",
            "in flight",
            "req/s",
            "p50 ms",
            "p99 ms",
            "server CPU µs/req",
            "by process (µs/req)",
            "client CPU µs/req",
            "errors",
        ],
        rows,
    )
    ratios = table(
        ["comparison", "value"],
        [
            [
                "gateway − NATS path, p50 at 1 in flight",
                _f(c["gateway_p50_added_ms"], "{:+.2f} ms"),
            ],
            [
                "gateway − HTTP floor, p50 at 1 in flight",
                _f(c["gateway_over_floor_p50_ms"], "{:+.2f} ms"),
            ],
            ["gateway / NATS path, req/s at 64 in flight", _f(c["gateway_rps_ratio_64"])],
            [
                "LiteLLM − gateway, p50 at 1 in flight",
                _f(c["litellm_minus_gateway_p50_ms"], "{:+.2f} ms"),
            ],
            ["gateway / LiteLLM, req/s at 64 in flight", _f(c["gateway_vs_litellm_rps_64"])],
        ],
    )
    version = notes.get("litellm_version")
    note = (
        "One httpx.AsyncClient load generator (a connection per request in flight) for every "
        "HTTP path; the NATS rows are the lifeline cases (the same dispatcher and worker). "
        "The gateway's server CPU counts the gateway, the dispatcher and the worker; the floor "
        "is Starlette on uvicorn (httptools) reading the body and answering a fixed "
        "chat.completion; LiteLLM "
        + (f"{version} " if version else "")
        + "runs one worker, answering every call with a mock_response, access log off."
    )
    return (
        "### HTTP gateway: OpenAI's Chat Completions over HTTP (instant provider)\n\n"
        + main
        + "\n\n"
        + ratios
        + "\n\n"
        + note
    )


def _gateway_comparisons(s: dict[str, dict]) -> dict[str, float]:
    def fig(key: str, name: str) -> float:
        return s[key][name] if key in s else math.nan

    return {
        "gateway_p50_added_ms": fig("gateway@1", "p50_ms") - fig("lifeline@1", "p50_ms"),
        "gateway_over_floor_p50_ms": fig("gateway@1", "p50_ms") - fig("canned@1", "p50_ms"),
        "gateway_rps_ratio_64": fig("gateway@64", "rps") / fig("lifeline@64", "rps"),
        "litellm_minus_gateway_p50_ms": fig("litellm@1", "p50_ms") - fig("gateway@1", "p50_ms"),
        "gateway_vs_litellm_rps_64": fig("gateway@64", "rps") / fig("litellm@64", "rps"),
    }


def _stream_what(key: str) -> str:
    chunks, interval_ms = STREAM_PACED if key == "stream" else STREAM_FLOOD
    return f"{chunks} chunks {interval_ms:g} ms apart" if interval_ms else f"{chunks} at once"


def hedging_section(s: dict[str, dict], profile: Profile) -> str:
    rows = []
    for key, hedging, budget in (
        ("tail@8", "no", "-"),
        (
            "tail-hedged@8",
            f"after {HEDGE_AFTER_MS:g} ms",
            "never says no (hedge_budget 1, retry_budget 10)",
        ),
        (
            "tail-budget@8",
            f"after {HEDGE_AFTER_MS:g} ms",
            "default (hedge_budget 0.1, retry_budget 0.2)",
        ),
    ):
        c = s[key]
        rows.append(
            [
                hedging,
                budget,
                _rps(c["rps"]),
                _f(c["p50_ms"]),
                _f(c["p99_ms"]),
                _pct(c["hedged_share"]),
                _pct(c["hedge_won_share"]),
                str(c["errors"]),
            ]
        )
    main = table(
        [
            "hedging",
            "budget",
            "req/s",
            "p50 ms",
            "p99 ms",
            "requests hedged",
            "answered by the hedge",
            "errors",
        ],
        rows,
    )
    slow = f"{profile.tail_latency_ms:g} ms"
    note = (
        f"{TAIL_IN_FLIGHT} in flight. The primary has a slow tail: it is a load-balanced group of "
        f"two fake providers picked by weight, so {(1 - TAIL_SHARE) * 100:g} % of calls answer at "
        f"once and {TAIL_SHARE * 100:g} % take {slow} (the fake provider has one fixed latency, so "
        f"the tail is this mix). Hedged, a call still running after {HEDGE_AFTER_MS:g} ms starts "
        "the group's other member too; the first good answer wins and the slow call is cancelled "
        f"at its worker. Without hedging, p99 is the slow call ({slow}). With budgets that never "
        f"say no, every slow call is hedged and p99 falls to about {HEDGE_AFTER_MS:g} ms plus one "
        "fast call. With the default budget, at most 10 % of a route's requests (over the last "
        f"10 s, plus a reserve of 3) may hedge; this tail is {TAIL_SHARE * 100:g} %, so about half "
        f"of the slow calls are not hedged and p99 stays at {slow} (in a very short run the "
        "reserve of 3 is a bigger share and hedges more). That is the budget's point: it caps the "
        "extra load hedging can put on providers (at most +10 % calls), so a tail fatter than the "
        "budget is only partly cut. Raise hedge_budget (and retry_budget, which hedges spend too) "
        "to cover such a tail; a tail under the budget fits in it."
    )
    return "### Hedging: p99 with a slow primary\n\n" + main + "\n\n" + note


def memory_section(m: dict[str, Any]) -> str:
    rows = [
        [
            "requests waiting at once",
            f"{m['requests']:,} (provider latency {m['provider_latency_ms']:g} ms)",
        ],
        ["dispatcher RSS before", _mib(m["baseline_rss_bytes"])],
        ["peak RSS / peak in flight", f"{_mib(m['peak_rss_bytes'])} / {m['peak_in_flight']:,}"],
        ["RSS growth per in-flight request", _kib(m["bytes_per_in_flight"])],
    ]
    for i, load in enumerate(m["loads"], 1):
        rows.append(
            [f"RSS after drain, load {i}", f"{_mib(load['after_drain'])} ({load['errors']} errors)"]
        )
    rows.append(
        ["retained after the last drain / growth", _f(m["retained_share"] * 100, "{:.0f} %")]
    )
    rows.append(
        [
            "RSS after gc.collect() + malloc_trim(0) (diagnostic)",
            _mib(m["after_collect_and_trim_rss_bytes"]),
        ]
    )
    rows.append(
        [
            "live GC-tracked objects: before / after drain / after collect",
            (
                f"{m['gc_objects_before']:,} / {m['gc_objects_after_drain']:,} / "
                f"{m['gc_objects_after_collect']:,}"
            ),
        ]
    )
    return "### Memory: dispatcher RSS with requests waiting on a slow provider\n\n" + table(
        ["figure", "value"], rows
    )


# ---- comparisons and targets ---------------------------------------------------------


def comparisons_of(s: dict[str, dict]) -> dict[str, float]:
    life1, life64, relay1, relay64 = s["lifeline@1"], s["lifeline@64"], s["relay@1"], s["relay@64"]
    return {
        "rps_ratio_64": life64["rps"] / relay64["rps"],
        "rps_ratio_1": life1["rps"] / relay1["rps"],
        "p50_delta_1_ms": life1["p50_ms"] - relay1["p50_ms"],
        # The same gap with one client alternating a Lifeline and a relay request: both meet
        # the same moments of the machine, so drift between rounds cannot open or close it.
        "p50_paired_gap_1_ms": s["paired@1"]["paired_gap_p50_ms"],
        "paired_lifeline_p50_ms": s["paired@1"]["p50_ms"],
        "paired_relay_p50_ms": s["paired@1"]["pair_p50_ms"],
        "p50_vs_direct_1_ms": life1["p50_ms"] - s["direct@1"]["p50_ms"],
        "cpu_ratio_64": life64["server_cpu_us_per_req"] / relay64["server_cpu_us_per_req"],
        "round_trip_ms": s["direct@1"]["p50_ms"],
        "fallback_503_added_ms": s["fallback-503@1"]["p50_ms"] - life1["p50_ms"],
        "fallback_noresp_added_ms": s["fallback-noresp@1"]["p50_ms"] - life1["p50_ms"],
        "hang_lateness_p50_ms": s["fallback-hang@64"]["lateness_p50_ms"],
        "hang_lateness_p99_ms": s["fallback-hang@64"]["lateness_p99_ms"],
        "scaling_speedup": s["scaling-2@64"]["rps"] / life64["rps"],
        "tick_growth_1_to_8": s["tick@8"]["rps"] / s["tick@1"]["rps"],
        "tick_growth_8_to_64": s["tick@64"]["rps"] / s["tick@8"]["rps"],
        "tail_p50_ms": s["tail@8"]["p50_ms"],
        "tail_p99_ms": s["tail@8"]["p99_ms"],
        "tail_hedged_p99_ms": s["tail-hedged@8"]["p99_ms"],
        "tail_hedged_share": s["tail-hedged@8"]["hedged_share"],
        "tail_budget_p99_ms": s["tail-budget@8"]["p99_ms"],
        "tail_budget_hedged_share": s["tail-budget@8"]["hedged_share"],
        **_stream_comparisons(s),
        "jobs_rps_ratio_64": s["jobs@64"]["rps"] / life64["rps"],
        "jobs_p50_added_1_ms": s["jobs@1"]["p50_ms"] - life1["p50_ms"],
        **_gateway_comparisons(s),
    }


def _stream_comparisons(s: dict[str, dict]) -> dict[str, float]:
    direct, life = s[f"stream-direct@{STREAM_IN_FLIGHT}"], s[f"stream-lifeline@{STREAM_IN_FLIGHT}"]
    flood = s[f"stream-flood-lifeline@{STREAM_IN_FLIGHT}"]
    return {
        "stream_ttft_added_p50_ms": life["ttft_p50_ms"] - direct["ttft_p50_ms"],
        "stream_ttft_added_p99_ms": life["ttft_p99_ms"] - direct["ttft_p99_ms"],
        "stream_chunk_added_p50_ms": life["chunk_p50_ms"] - direct["chunk_p50_ms"],
        "stream_chunk_added_p99_ms": life["chunk_p99_ms"] - direct["chunk_p99_ms"],
        "stream_cpu_us_per_chunk": flood.get("cpu_us_per_chunk", {}).get("dispatcher-1", math.nan),
    }


def _target(name: str, rule: str, measured: str, passed: bool, note: str = "") -> dict[str, Any]:
    return {"target": name, "rule": rule, "measured": measured, "pass": bool(passed), "note": note}


def targets_of(c: dict[str, float], m: dict[str, Any]) -> list[dict[str, Any]]:
    rtt = c["round_trip_ms"]
    ratio = c["rps_ratio_64"]
    fast_limit = rtt + 0.3
    return [
        _target(
            "throughput vs relay",
            "lifeline/relay req/s at 64 in flight ≥ 0.75 (goal 0.9)",
            f"{ratio:.2f}",
            ratio >= 0.75,
            "goal met" if ratio >= 0.9 else "goal not met",
        ),
        _target(
            "latency vs relay",
            "lifeline p50 ≤ relay p50 + 0.1 ms at 1 in flight (their requests taking turns)",
            f"{c['p50_paired_gap_1_ms']:+.2f} ms (separate rounds: {c['p50_delta_1_ms']:+.2f} ms)",
            c["p50_paired_gap_1_ms"] <= 0.1,
        ),
        _target(
            "fallback on an error",
            f"[fail 503, ok] p50 − [ok] p50 ≤ round trip ({rtt:.2f} ms, direct p50 @1) + 0.3 ms",
            f"{c['fallback_503_added_ms']:+.2f} ms",
            c["fallback_503_added_ms"] <= fast_limit,
        ),
        _target(
            "fallback on no responders",
            f"[no responders, ok] p50 − [ok] p50 ≤ round trip ({rtt:.2f} ms) + 0.3 ms",
            f"{c['fallback_noresp_added_ms']:+.2f} ms",
            c["fallback_noresp_added_ms"] <= fast_limit,
        ),
        _target(
            "hung provider",
            "next attempt starts ≤ timeout + 5 ms at p99 (64 in flight)",
            f"+{c['hang_lateness_p99_ms']:.2f} ms (p50 +{c['hang_lateness_p50_ms']:.2f} ms)",
            c["hang_lateness_p99_ms"] <= 5.0,
        ),
        _target(
            "memory per in-flight request",
            "dispatcher RSS growth / peak in flight ≤ 10 KiB",
            _kib(m["bytes_per_in_flight"]),
            m["bytes_per_in_flight"] <= 10 * 1024,
        ),
        _target(
            "memory returns after drain",
            "RSS after the last drain − RSS before ≤ 20 % of the peak growth",
            f"{m['retained_share'] * 100:.0f} % ({_mib(m['retained_bytes'])})",
            m["retained_share"] <= 0.2,
        ),
        _target(
            "handles requests concurrently",
            f"{TICK_MS:g} ms provider: req/s @8 ≥ 4× @1 and @64 ≥ 1.2× @8",
            f"{c['tick_growth_1_to_8']:.1f}× then {c['tick_growth_8_to_64']:.1f}×",
            c["tick_growth_1_to_8"] >= 4 and c["tick_growth_8_to_64"] >= 1.2,
        ),
        _target(
            "hedging cuts the tail",
            f"slow primary hedged after {HEDGE_AFTER_MS:g} ms (budget never says no): "
            f"p99 ≤ {HEDGE_AFTER_MS:g} ms + p50 without hedging "
            f"({c['tail_p50_ms']:.2f} ms, a fast call) + 5 ms, {TAIL_IN_FLIGHT} in flight",
            f"{c['tail_hedged_p99_ms']:.2f} ms (without hedging {c['tail_p99_ms']:.2f} ms)",
            c["tail_hedged_p99_ms"] <= HEDGE_AFTER_MS + c["tail_p50_ms"] + 5.0,
        ),
    ]


def targets_section(targets: list[dict[str, Any]], profile: Profile) -> str:
    rows = [
        [
            t["target"],
            t["rule"],
            t["measured"],
            ("PASS" if t["pass"] else "FAIL") + (f" ({t['note']})" if t["note"] else ""),
        ]
        for t in targets
    ]
    text = "### Targets\n\n" + table(["target", "rule", "measured", "result"], rows)
    if profile.name == "quick":
        text += (
            "\n\n(quick run: tiny counts, so these figures only prove the suite works; "
            "do not quote them)"
        )
    return text


# ---- machine -------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nats_server_version() -> str:
    try:
        out = subprocess.run(
            [server_binary(), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
        version = out.stdout.strip().removeprefix("nats-server: ") or out.stderr.strip()
        return version.removeprefix("v")  # "v2.15.1": as the README writes it
    except (EmbeddedNatsError, OSError, subprocess.SubprocessError) as exc:  # none, or it hung
        return f"unknown ({exc})"


def machine_info() -> dict[str, Any]:
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "nats_server": _nats_server_version(),
        "nats_py": _version("nats-py"),
        "msgspec": _version("msgspec"),
        "opentelemetry_sdk": _version("opentelemetry-sdk"),
        "event_loop": loop_name(),  # every process of the suite runs on it (service.loop)
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def machine_section(machine: dict[str, Any], profile: Profile) -> str:
    return (
        f"Machine: {machine['cpu_model']}, {machine['cores']} cores, {machine['platform']}; "
        f"Python {machine['python']}, nats-server {machine['nats_server']}, "
        f"nats-py {machine['nats_py']}, msgspec {machine['msgspec']}, "
        f"opentelemetry-sdk {machine['opentelemetry_sdk']}, {machine['event_loop']}; "
        f"{machine['date']}. "
        f"Profile {profile.name}: {profile.rounds} interleaved rounds of {profile.duration_s:g} s "
        f"per case (after {profile.warmup_s:g} s warm-up), medians shown. "
        f"Other processes used {machine['other_cpu_cores']:.2f} cores on average "
        "during the measurements."
    )


def this_run(machine: dict[str, Any], profile: Profile) -> str:
    return (
        f"{machine['cpu_model']}, {machine['cores']} cores, Python {machine['python']}, "
        f"nats-server {machine['nats_server']}, nats-py {machine['nats_py']}, "
        f"{machine['event_loop']}; "
        f"{profile.rounds} rounds of {profile.duration_s:g} s"
    )


# ---- the report ----------------------------------------------------------------------


class Report:
    """Collects sections as the run produces them; prints each at once; writes files at the end."""

    def __init__(self, profile: Profile, log: Log) -> None:
        self.profile = profile
        self.log = log
        self.sections: list[str] = []
        self.data: dict[str, Any] = {"profile": asdict(profile)}
        self.regressed: list[str] = []
        self.notes: dict[str, str] = {}  # what the run says about cases it could not measure

    def _emit(self, section: str) -> None:
        self.sections.append(section)
        self.log("\n" + section + "\n")

    def rounds_done(self, cases: list[Case], rounds: dict[str, list[dict]]) -> None:
        summaries = {case.key: summarize(rounds[case.key]) for case in cases}
        comparisons = comparisons_of(summaries)
        self.data["cases"] = {
            case.key: {
                "label": case.label,
                "section": case.section,
                "in_flight": case.in_flight,
                "median": summaries[case.key],
                "rounds": rounds[case.key],
            }
            for case in cases
        }
        self.data["comparisons"] = comparisons
        self._emit(overhead_section(summaries, comparisons))
        self._emit(fallback_section(summaries, comparisons))
        self._emit(scaling_section(summaries, comparisons))
        self._emit(concurrency_section(summaries))
        self._emit(hedging_section(summaries, self.profile))
        self._emit(streaming_section(summaries, comparisons))
        self._emit(jobs_section(summaries, comparisons))
        if "gateway@1" in summaries:
            self._emit(gateway_section(summaries, comparisons, self.notes))

    def memory_done(self, memory: dict[str, Any]) -> None:
        self.data["memory"] = memory
        self._emit(memory_section(memory))

    def finish(
        self, out_dir: Path, environment: dict[str, Any], tolerance: float = DEFAULT_TOLERANCE
    ) -> bool:
        """Targets, machine info, files, and last the figures against the README's. Returns
        False when any request failed (a broken run); sets `regressed` (the figures' keys)."""
        self.data["targets"] = targets_of(self.data["comparisons"], self.data["memory"])
        self.data["machine"] = machine_info() | environment
        self.data["notes"] = self.notes
        self._emit(targets_section(self.data["targets"], self.profile))
        errors = sum(c["median"]["errors"] for c in self.data["cases"].values())
        errors += sum(load["errors"] for load in self.data["memory"]["loads"])
        self.data["request_errors"] = errors
        reference = regression.load_reference()
        rows = regression.compare(reference, regression.figures_of(self.data), tolerance)
        self.regressed = [row.figure.key for row in rows if row.verdict == "regressed"]
        self.data["against_readme"] = regression.as_data(rows, reference, tolerance)
        against = regression.section(
            rows,
            reference,
            tolerance,
            this_run(self.data["machine"], self.profile),
            quick=self.profile.name == "quick",
        )
        self.sections.append(against)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(
            json.dumps(_jsonable(self.data), indent=2, allow_nan=False) + "\n"
        )
        header = "## Benchmark results\n\n" + machine_section(self.data["machine"], self.profile)
        (out_dir / "results.md").write_text("\n\n".join([header, *self.sections]) + "\n")
        self.log(machine_section(self.data["machine"], self.profile))
        self.log(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
        self.log("\n" + against + "\n")
        if errors:
            self.log(f"ERROR: {errors} requests failed; the figures above are not trustworthy")
        return errors == 0


def _jsonable(value: Any) -> Any:
    """Strict JSON: NaN becomes null, bytes become text."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _jsonable(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value
