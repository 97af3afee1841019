"""The benchmark cases and how a run goes: one nats-server, one fleet, interleaved rounds.

A run starts one embedded nats-server and, each in its own process: the load generator,
the direct responder, the relay and its responder, two Lifeline dispatchers (the second
paused: it joins the queue group only for the scaling case) and one Lifeline worker per
fake provider. It then measures every case once per round, round-robin (case A round 1,
case B round 1, ..., case A round 2, ...), so slow drift of the machine spreads over all
cases instead of biasing one; a case's figure is the median of its rounds. The memory case
runs last, on the warm dispatcher.

Per measurement the server-side CPU time is read from /proc before and after and divided
by the requests handled (warm-up and drain included, so the division is exact).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from schemas import ChatMessage, ProviderRequest, subjects
from schemas.wire import encoder
from service.embedded import EmbeddedNats
from tests.bench import litellm, loadgen, servers
from tests.bench.harness import (
    Child,
    Fleet,
    Setup,
    cpu_seconds,
    cpu_snapshot,
    machine_busy_seconds,
    rss_bytes,
)

Log = Callable[..., None]


@dataclass(frozen=True)
class Profile:
    name: str
    rounds: int
    duration_s: float  # measured window per case and round
    warmup_s: float  # unmeasured load before each window
    memory_requests: int
    memory_loads: int  # bursts in a row (the later ones show whether memory keeps growing)
    slow_latency_ms: float  # the slow provider of the memory case
    settle_s: float  # wait after a drain before reading RSS
    tail_latency_ms: float  # the slow share of the hedging case's primary


FULL = Profile(
    "full",
    rounds=5,
    duration_s=2.0,
    warmup_s=0.3,
    memory_requests=10_000,
    memory_loads=2,
    slow_latency_ms=3000,
    settle_s=1.0,
    tail_latency_ms=200,
)
QUICK = Profile(
    "quick",
    rounds=2,
    duration_s=0.2,
    warmup_s=0.05,
    memory_requests=200,
    memory_loads=2,
    slow_latency_ms=300,
    settle_s=0.2,
    tail_latency_ms=100,
)

HANG_TIMEOUT_S = 0.1  # timeout_s of the hung provider
TICK_MS = 10.0  # latency of the provider of the concurrency check
REQUEST_TIMEOUT_S = 10.0  # client-side timeout of one request

# The hedging case: a primary whose calls are slow TAIL_SHARE of the time. The fake provider
# has one fixed latency, so the primary is a load-balanced group of two fakes: "ok" (instant)
# and "slowtail" (tail_latency_ms), picked by weight. A hedge of a slow call starts the other
# member; the first good answer wins and the slow call is cancelled at its worker.
TAIL_SHARE = 0.2  # twice the default hedge budget (0.1), so the budgeted route cannot hedge it all
HEDGE_AFTER_MS = 20.0
TAIL_IN_FLIGHT = 8
TAIL_DURATION_SHARE = (
    0.35  # these cases measure for this share of duration_s (keeps the suite short)
)

# The streaming cases: STREAM_IN_FLIGHT streams at once, each of (chunks, interval_ms), from the
# streamer straight to the load generator, and through a dispatcher's llm.stream.
STREAM_IN_FLIGHT = 8
STREAM_PACED = (40, 2.0)  # latency per chunk and time to first token
STREAM_FLOOD = (200, 0.0)  # the dispatcher's CPU per relayed chunk
STREAM_DURATION_SHARE = 0.5

# ---- subjects, payloads, Lifeline config ---------------------------------------------

DIRECT_SUBJECT = "bench.direct"
RELAY_SUBJECT = "bench.relay"
RELAY_UPSTREAM = "bench.relay.upstream"

# The HTTP cases' body: OpenAI's chat request, for the gateway (model = the route "main"), the
# HTTP floor and LiteLLM's proxy (model "main", a mock response).
CHAT_REQUEST = encoder.encode(
    {"model": litellm.MODEL, "messages": [{"role": "user", "content": "Hello"}]}
)
HTTP_IN_FLIGHT = (1, 64)

PROVIDER_REQUEST = encoder.encode(
    ProviderRequest(id="bench", messages=[ChatMessage("user", "Hello")])
)

# Route name -> the providers it tries, in order.
ROUTES = {
    "main": ["ok"],
    "fail_ok": ["fail", "ok"],
    "ghost_ok": ["ghost", "ok"],
    "hang_ok": ["hang", "ok"],
    "tick": ["tick"],
    "slow": ["slow"],
    "stream": [servers.STREAMER],
}
UNGUARDED = {"fail_ok", "hang_ok"}  # routes without circuit breakers (see lifeline_config)
WORKERS = [
    "ok",
    "fail",
    "hang",
    "tick",
    "slow",
    "slowtail",
]  # "ghost" is configured but has no worker


def tail_routes() -> dict[str, dict[str, Any]]:
    """The hedging case's routes: one primary with a slow tail, without hedging, hedged with
    budgets that never say no, and hedged with the default budgets (hedge 0.1, retry 0.2)."""
    primary = [
        {
            "group": [
                {"provider": "ok", "weight": 1 - TAIL_SHARE},
                {"provider": "slowtail", "weight": TAIL_SHARE},
            ]
        }
    ]
    return {
        "tail": {"targets": primary},
        "tail_hedged": {
            "targets": primary,
            "hedge_after_ms": HEDGE_AFTER_MS,
            "hedge_budget": 1.0,
            "retry_budget": 10.0,
        },
        "tail_budget": {"targets": primary, "hedge_after_ms": HEDGE_AFTER_MS},
    }


def completion_request(route: str) -> bytes:
    return encoder.encode({"messages": [{"role": "user", "content": "Hello"}], "route": route})


def fake(**settings: Any) -> dict[str, Any]:
    return {"kind": "fake", **settings}


def lifeline_config(profile: Profile) -> dict[str, Any]:
    """The config dict every dispatcher and worker parses (service.config.parse_config)."""
    return {
        "providers": {
            "ok": fake(),
            "fail": fake(fail_status=503),
            "hang": fake(hang=True, timeout_s=HANG_TIMEOUT_S),
            "ghost": fake(),
            "tick": fake(latency_ms=TICK_MS),
            "slow": fake(
                latency_ms=profile.slow_latency_ms,
                timeout_s=profile.slow_latency_ms / 1000 + 120,
                # the memory case's requests all wait at its worker at once
                max_in_flight=profile.memory_requests + 1000,
            ),
            "slowtail": fake(latency_ms=profile.tail_latency_ms),
            servers.STREAMER: fake(),  # served by the streamer process, not a Lifeline worker
        },
        # The fallback cases measure the fallback itself, on every request: with its breaker on,
        # an always-failing provider would be skipped after five failures instead.
        "routes": {
            name: {
                "targets": targets,
                **({"breaker": {"enabled": False}} if name in UNGUARDED else {}),
            }
            for name, targets in ROUTES.items()
        }
        | tail_routes(),
        # The memory case holds memory_requests in flight at once: admission must not refuse them.
        "dispatcher": {
            "default_timeout_s": profile.slow_latency_ms / 1000 + 120,
            "max_in_flight": profile.memory_requests + 1000,
        },
    }


# ---- the fleet -----------------------------------------------------------------------

# Whose CPU time counts as "server side" for each system.
SERVER_PROCESSES = {
    "direct": ["responder-direct"],
    "relay": ["relay", "responder-relay"],
    "lifeline": ["dispatcher-1", "dispatcher-2", *(f"worker-{name}" for name in WORKERS)],
    "stream-direct": ["streamer"],
    "stream-lifeline": ["dispatcher-1", "streamer"],
    "gateway": ["gateway", "dispatcher-1", "worker-ok"],
    "canned": ["canned"],
    "litellm": ["litellm"],
}


def fleet_specs(url: str, profile: Profile) -> list[tuple[str, Setup, dict[str, Any]]]:
    config = lifeline_config(profile)
    return [
        ("loadgen", loadgen.setup, {"url": url}),
        ("responder-direct", servers.responder, {"url": url, "subject": DIRECT_SUBJECT}),
        ("responder-relay", servers.responder, {"url": url, "subject": RELAY_UPSTREAM}),
        (
            "relay",
            servers.relay,
            {"url": url, "subject": RELAY_SUBJECT, "upstream": RELAY_UPSTREAM},
        ),
        ("streamer", servers.streamer, {"url": url}),
        (
            "gateway",
            servers.gateway,
            {"url": url, "routes": list(ROUTES), "keys": [litellm.API_KEY]},
        ),
        ("canned", servers.canned, {}),
        ("dispatcher-1", servers.dispatcher, {"url": url, "config": config}),
        ("dispatcher-2", servers.dispatcher, {"url": url, "config": config, "paused": True}),
        *(
            (f"worker-{name}", servers.worker, {"url": url, "config": config, "provider": name})
            for name in WORKERS
        ),
    ]


# ---- cases ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    key: str  # unique id, also the key in results.json
    section: str  # overhead | fallback | scaling | concurrency | hedging
    label: str  # what the progress lines say
    system: str  # direct | relay | lifeline: whose CPU counts
    subject: str
    payload: bytes
    in_flight: int
    decode: str  # "provider" (ProviderReply) or "lifeline" (CompletionReply)
    lateness_of_ms: float | None = None  # hung case: report attempts[0].latency_ms - this
    dispatchers: int = 1
    count_hedged: bool = False  # count the replies with a hedged attempt (reads reply.attempts)
    duration_share: float = 1.0  # measured window = this × the profile's duration_s
    stream: tuple[int, float] | None = None  # streams of (chunks, interval_ms) instead of requests
    jobs: bool = False  # durable jobs through JetStream instead of core requests
    http: str | None = None  # OpenAI's chat requests over HTTP to this process's URL
    # (subject, payload, decode) of another system's request: one client alternates one of
    # each, so both meet the same moments of a noisy machine (a paired comparison)
    pair: tuple[str, bytes, str] | None = None


def _lifeline(key: str, section: str, label: str, route: str, in_flight: int, **kw: Any) -> Case:
    return Case(
        key,
        section,
        label,
        "lifeline",
        subjects.COMPLETE,
        completion_request(route),
        in_flight,
        "lifeline",
        **kw,
    )


def http_cases(with_litellm: bool) -> list[Case]:
    """OpenAI's chat requests over HTTP, one load generator for all: through Lifeline's gateway
    (to the NATS path of lifeline@N), to the same HTTP stack answering at once (the floor),
    and to LiteLLM's proxy answering with a mock response."""
    systems = [
        ("gateway", "HTTP gateway -> Lifeline"),
        ("canned", "HTTP floor (canned answer)"),
    ] + ([("litellm", "LiteLLM proxy (mock_response)")] if with_litellm else [])
    return [
        Case(
            f"{system}@{n}",
            "gateway",
            label,
            system,
            "",
            CHAT_REQUEST,
            n,
            "http",
            http=system,
        )
        for n in HTTP_IN_FLIGHT
        for system, label in systems
    ]


def all_cases(with_litellm: bool = False) -> list[Case]:
    """Every round-robin case, in the order each round runs them."""
    cases: list[Case] = []
    for n in (1, 64):
        cases += [
            Case(
                f"direct@{n}",
                "overhead",
                "direct",
                "direct",
                DIRECT_SUBJECT,
                PROVIDER_REQUEST,
                n,
                "provider",
            ),
            Case(
                f"relay@{n}",
                "overhead",
                "relay",
                "relay",
                RELAY_SUBJECT,
                PROVIDER_REQUEST,
                n,
                "provider",
            ),
            _lifeline(f"lifeline@{n}", "overhead", "lifeline", "main", n),
        ]
    # p50 at 1 in flight, Lifeline against the relay, their requests taking turns on one client
    cases.append(
        _lifeline(
            "paired@1",
            "overhead",
            "lifeline and relay taking turns",
            "main",
            1,
            pair=(RELAY_SUBJECT, PROVIDER_REQUEST, "provider"),
        )
    )
    cases += [
        _lifeline("fallback-503@1", "fallback", "lifeline [fail 503, ok]", "fail_ok", 1),
        _lifeline("fallback-noresp@1", "fallback", "lifeline [no responders, ok]", "ghost_ok", 1),
        _lifeline(
            "fallback-hang@64",
            "fallback",
            "lifeline [hung 100 ms, ok]",
            "hang_ok",
            64,
            lateness_of_ms=HANG_TIMEOUT_S * 1000,
        ),
        _lifeline("scaling-2@64", "scaling", "lifeline, 2 dispatchers", "main", 64, dispatchers=2),
    ]
    cases += [
        _lifeline(f"tick@{n}", "concurrency", f"lifeline, {TICK_MS:g} ms provider", "tick", n)
        for n in (1, 8, 64)
    ]
    for key, (chunks, interval_ms), what in (
        ("stream", STREAM_PACED, f"{STREAM_PACED[0]} chunks {STREAM_PACED[1]:g} ms apart"),
        ("stream-flood", STREAM_FLOOD, f"{STREAM_FLOOD[0]} chunks at once"),
    ):
        for system, subject in (
            ("direct", servers.STREAM_DIRECT_SUBJECT),
            ("lifeline", subjects.STREAM),
        ):
            cases.append(
                Case(
                    f"{key}-{system}@{STREAM_IN_FLIGHT}",
                    "streaming",
                    f"{system} stream, {what}",
                    f"stream-{system}",
                    subject,
                    b"",
                    STREAM_IN_FLIGHT,
                    system,
                    stream=(chunks, interval_ms),
                    duration_share=STREAM_DURATION_SHARE,
                )
            )
    cases += [
        Case(
            f"jobs@{n}",
            "jobs",
            "lifeline jobs (JetStream)",
            "lifeline",
            subjects.JOBS_SUBMIT,
            b"",
            n,
            "lifeline",
            jobs=True,
        )
        for n in (1, 64)
    ]
    tail = f"lifeline, {TAIL_SHARE * 100:g} % slow primary"
    cases += [
        _lifeline(
            key,
            "hedging",
            f"{tail}, {how}",
            route,
            TAIL_IN_FLIGHT,
            count_hedged=True,
            duration_share=TAIL_DURATION_SHARE,
        )
        for key, how, route in (
            ("tail@8", "no hedging", "tail"),
            ("tail-hedged@8", f"hedge after {HEDGE_AFTER_MS:g} ms", "tail_hedged"),
            ("tail-budget@8", f"hedge after {HEDGE_AFTER_MS:g} ms, default budget", "tail_budget"),
        )
    ]
    return cases + http_cases(with_litellm)


def measure(fleet: Fleet, case: Case, profile: Profile, nats_pid: int | None) -> dict[str, Any]:
    """One closed-loop measurement of one case, with the CPU time it cost each server process."""
    pids = {name: _pid(fleet, name) for name in SERVER_PROCESSES[case.system]} | {
        "loadgen": fleet["loadgen"].pid
    }
    duration_s = profile.duration_s * case.duration_share
    if case.stream is not None:  # a window a few paced streams long, or none may end in it
        chunks, interval_ms = case.stream
        duration_s = max(duration_s, 4 * chunks * interval_ms / 1000)
    spec = {
        "subject": case.subject,
        "payload": case.payload,
        "in_flight": case.in_flight,
        "decode": case.decode,
        "warmup_s": profile.warmup_s,
        "duration_s": duration_s,
        "timeout_s": REQUEST_TIMEOUT_S,
        "lateness_of_ms": case.lateness_of_ms,
        "count_hedged": case.count_hedged,
    }
    if case.pair is not None:
        spec["pair"] = dict(zip(("subject", "payload", "decode"), case.pair, strict=True))
    command = "run"
    if case.http is not None:
        command = "http"
        spec["url"] = _url(fleet, case.http)
        spec["api_key"] = litellm.API_KEY
    if case.jobs:
        command = "jobs"
        spec["route"] = "main"
    if case.stream is not None:
        command = "stream"
        spec |= {"mode": case.decode, "chunks": case.stream[0], "interval_ms": case.stream[1]}
        spec["route"] = "stream"
    if case.dispatchers == 2:
        fleet["dispatcher-2"].call("resume")
    try:
        cpu_before = cpu_snapshot(pids)
        nats_before = cpu_seconds(nats_pid) if nats_pid else 0.0
        result = fleet["loadgen"].call(command, spec, timeout_s=profile.warmup_s + duration_s + 60)
        cpu_after = cpu_snapshot(pids)
        nats_after = cpu_seconds(nats_pid) if nats_pid else 0.0
    finally:
        if case.dispatchers == 2:
            fleet["dispatcher-2"].call("pause")
    handled = max(1, result["handled"])
    per_process = {name: (cpu_after[name] - cpu_before[name]) / handled * 1e6 for name in pids}
    result["client_cpu_us_per_req"] = per_process.pop("loadgen")
    result["cpu_us_per_req"] = {name: us for name, us in per_process.items() if us > 0}
    result["server_cpu_us_per_req"] = sum(per_process.values())
    result["nats_cpu_us_per_req"] = (nats_after - nats_before) / handled * 1e6 if nats_pid else None
    if case.stream is not None:
        chunks = max(1, result["chunks_handled"])
        result["cpu_us_per_chunk"] = {
            name: (cpu_after[name] - cpu_before[name]) / chunks * 1e6 for name in pids
        }
    return result


def _pid(fleet: Fleet, name: str) -> int:
    return fleet.external[name].pid if name in fleet.external else fleet[name].pid


def _url(fleet: Fleet, name: str) -> str:
    return fleet.external[name].url if name in fleet.external else fleet[name].info["url"]


def run_rounds(
    fleet: Fleet, cases: list[Case], profile: Profile, nats_pid: int | None, log: Log
) -> dict[str, list[dict]]:
    rounds: dict[str, list[dict]] = {case.key: [] for case in cases}
    for r in range(1, profile.rounds + 1):
        for case in cases:
            log(
                f"round {r}/{profile.rounds}: {case.label} @{case.in_flight} ...",
                end=" ",
                flush=True,
            )
            result = measure(fleet, case, profile, nats_pid)
            rounds[case.key].append(result)
            log(_progress(result))
    return rounds


def _progress(result: dict[str, Any]) -> str:
    text = (
        f"{result['rps']:,.0f} req/s, p50 {result['p50_ms']:.2f} ms, "
        f"p99 {result['p99_ms']:.2f} ms, server CPU {result['server_cpu_us_per_req']:.0f} µs/req"
    )
    if "chunk_p50_ms" in result:
        text += (
            f", first chunk p50 {result['ttft_p50_ms']:.2f} ms, chunk p50 "
            f"{result['chunk_p50_ms']:.2f} ms p99 {result['chunk_p99_ms']:.2f} ms"
        )
    if not math.isnan(result["hedged_share"]):
        text += f", {result['hedged_share'] * 100:.1f} % hedged"
    if result["errors"]:
        text += f", {result['errors']} ERRORS (first: {result['first_error']})"
    return text


# ---- memory --------------------------------------------------------------------------


def measure_memory(fleet: Fleet, profile: Profile, log: Log) -> dict[str, Any]:
    """RSS of dispatcher-1 with `memory_requests` requests waiting on the slow provider, and
    after."""
    dispatcher, gen = fleet["dispatcher-1"], fleet["loadgen"]
    pid = dispatcher.pid
    spec = {
        "subject": subjects.COMPLETE,
        "payload": completion_request("slow"),
        "count": profile.memory_requests,
        "decode": "lifeline",
        "timeout_s": profile.slow_latency_ms / 1000 + 60,
    }
    objects_before = dispatcher.call("heap", False)["gc_objects"]
    baseline = rss_bytes(pid)
    loads = []
    for i in range(1, profile.memory_loads + 1):
        log(
            f"memory load {i}/{profile.memory_loads}: {profile.memory_requests:,} requests on a "
            f"{profile.slow_latency_ms:g} ms provider ...",
            end=" ",
            flush=True,
        )
        load = _memory_load(dispatcher, gen, spec, profile)
        loads.append(load)
        log(
            f"peak {load['peak_in_flight']:,} in flight, "
            f"RSS {_mib(load['before'])} -> {_mib(load['peak'])} "
            f"-> {_mib(load['after_drain'])} after drain, {load['errors']} errors"
        )
    first, last = loads[0], loads[-1]
    growth = first["peak"] - baseline
    objects_after = dispatcher.call("heap", False)["gc_objects"]
    objects_collected = dispatcher.call("heap", True)["gc_objects"]
    return {
        "requests": profile.memory_requests,
        "provider_latency_ms": profile.slow_latency_ms,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": first["peak"],
        "peak_in_flight": first["peak_in_flight"],
        "growth_bytes": growth,
        "bytes_per_in_flight": growth / max(1, first["peak_in_flight"]),
        "after_drain_rss_bytes": last["after_drain"],
        "retained_bytes": last["after_drain"] - baseline,
        "retained_share": (last["after_drain"] - baseline) / growth if growth > 0 else 0.0,
        "loads": loads,
        # diagnostics: live objects vs allocator slack
        "gc_objects_before": objects_before,
        "gc_objects_after_drain": objects_after,
        "gc_objects_after_collect": objects_collected,
        "after_collect_and_trim_rss_bytes": rss_bytes(pid),
    }


def _memory_load(
    dispatcher: Child, gen: Child, spec: dict[str, Any], profile: Profile
) -> dict[str, Any]:
    before = rss_bytes(dispatcher.pid)
    peak, peak_in_flight = before, 0
    gen.send("burst", spec)
    while not gen.poll(0.05):
        in_flight = dispatcher.call("stats")["in_flight"]
        peak, peak_in_flight = max(peak, rss_bytes(dispatcher.pid)), max(peak_in_flight, in_flight)
    burst = gen.result(timeout_s=spec["timeout_s"] + 60, what="burst")
    _wait_drained(dispatcher)
    time.sleep(profile.settle_s)
    return {
        "before": before,
        "peak": peak,
        "peak_in_flight": peak_in_flight,
        "after_drain": rss_bytes(dispatcher.pid),
        "errors": burst["errors"],
        "first_error": burst["first_error"],
        "p50_ms": burst["p50_ms"],
        "burst_s": burst["window_s"],
    }


def _wait_drained(dispatcher: Child, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while dispatcher.call("stats")["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# ---- a whole run ---------------------------------------------------------------------


def run(
    profile: Profile,
    log: Log,
    on_rounds: Callable[[list[Case], dict[str, list[dict]]], None],
    on_memory: Callable[[dict[str, Any]], None],
    with_litellm: bool = False,
    notes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Start everything, measure, hand each finished section to its callback, stop everything.

    Returns how busy the machine was with other work meanwhile (figures are only as good
    as the machine was quiet).
    """
    server, fleet = EmbeddedNats(port=-1), Fleet()
    try:
        server.start()
        specs = fleet_specs(server.url, profile)
        log(f"nats-server on {server.url}; starting {len(specs)} processes ...")
        started = time.monotonic()
        fleet.spawn(specs)
        log(f"all processes ready in {time.monotonic() - started:.1f} s")
        notes = notes if notes is not None else {}
        if with_litellm:
            proxy, why = litellm.start(log)
            if proxy is None:
                log(f"the LiteLLM case is skipped: {why}")
                notes["litellm"] = f"not measured: {why}"
            else:
                fleet.external["litellm"] = proxy
                notes["litellm_version"] = proxy.version
        if "litellm" not in fleet.external:
            notes.setdefault("litellm", "not measured: --no-litellm, or a --quick run")
        ours = {child.name: child.pid for child in fleet.children.values()} | {"bench": os.getpid()}
        if (nats_pid := server.pid) is not None:
            ours["nats-server"] = nats_pid
        before = _busy(ours)
        cases = all_cases(with_litellm="litellm" in fleet.external)
        on_rounds(cases, run_rounds(fleet, cases, profile, nats_pid, log))
        on_memory(measure_memory(fleet, profile, log))
        return _other_load(before, _busy(ours))
    finally:
        for external in fleet.external.values():
            external.stop()
        fleet.stop_all()
        server.stop()


def _busy(ours: dict[str, int]) -> tuple[float, float, float]:
    """(wall clock, machine busy CPU, our processes' CPU), in seconds."""
    return time.monotonic(), machine_busy_seconds(), sum(cpu_snapshot(ours).values())


def _other_load(
    before: tuple[float, float, float], after: tuple[float, float, float]
) -> dict[str, Any]:
    wall = after[0] - before[0]
    other = (after[1] - before[1]) - (after[2] - before[2])
    return {
        "measured_wall_s": wall,
        "other_cpu_cores": max(0.0, other / wall),
        "loadavg": os.getloadavg(),
    }
