"""Target health, in one place: circuit breakers and the recent figures behind them.

Pure: no NATS. The dispatcher's policy asks `admit(target)` before each call and tells
`record(...)` what happened after it. A Health takes a store (HealthStore, below): it announces
every state change it makes to the store and asks the store before it sends a half-open probe.
LocalStore, the default, keeps the breakers to this dispatcher; service/shared_health.py's
BucketStore shares them with every replica through a JetStream key-value bucket.

A breaker is kept per target (provider + model; the models the config does not name share
one per provider, ADHOC_MODEL). Its settings come from the target, the route and [breaker],
in that order, and are read when a call is recorded:

    closed      calls go through. It opens after `consecutive_failures` counted failures in
                a row, or when counted failures are at least `failure_rate` of the calls in the
                last `window_s` (once there were `min_requests` of them). Counted failures are
                the kinds in `trip_on`: by default those that say the provider is unwell
                (rate_limit, server_error, timeout, connection) or unusable (quota), never the
                request's own fault.
    open        the target is skipped (reason circuit_open) for `cooldown_s`, unless it is the
                last target a request has left; then it is called anyway, as a probe.
    half_open   after the cooldown one call goes through as a probe; the others still skip it.
                A probe that succeeds (or gets an answer that is the request's fault) closes
                the breaker; one that fails opens it for another cooldown.

Outcomes are weighed in the order their calls were made, not the order they end: a timeout
arrives `timeout_s` after its call started, long after calls made later have answered. So a
failed call made before the breaker last closed counts for nothing (the probe that closed it
is newer evidence), and a failed call made before one that has since answered well does not
extend a run of consecutive failures. Without this, a replica that dies with attempts in flight
benches its provider: its attempts time out in a burst while the surviving replica answers,
and the ones that time out after a probe closed the breaker open it again, for as long as
they keep coming in.

Alongside the breaker, each target keeps 1-second slots of outcomes (the last 5 minutes) and
the recent latencies of its good answers, for the failure rate, `lifeline status`, the
OpenTelemetry gauges and hedge = "p95"; and, apart, its streams' times to their first chunk:
a streamed call's race is settled by its first chunk, so its hedge waits for their p95.

Beside other gateways (the README's words until 2026-12-04): LiteLLM's defaults are similar: it
benches a deployment on a 429, or on more than 50% failures in a minute, for 5 s; it needs
Redis to share that state, where Lifeline uses the NATS it runs on. LiteLLM can only race all
models at once; the other gateways do not hedge.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Annotated, Any, Final, Literal, NamedTuple, Protocol

from msgspec import Meta, Struct

from schemas.errors import DEFAULT_TRIP_ON

log = logging.getLogger("lifeline.health")

CLOSED: Final = "closed"
HALF_OPEN: Final = "half_open"
OPEN: Final = "open"
State = Literal["closed", "half_open", "open"]

# What admit() answers.
CALL, PROBE, SKIP = 0, 1, 2

# The model key shared, per provider, by every model the config does not name (service/routing.py
# maps them to it). A request may name any model of a provider without a `models` allowlist; one
# entry per name would grow without limit (about 12 KiB each), and a cap would have to evict
# configured targets' breakers. Sharing keeps every configured target's breaker exact and bounds
# the entries by the config. The breaker semantics stay sensible: a provider that rate-limits,
# errs or hangs for one made-up name usually does so for all of them, and a name the provider
# does not know fails as bad_request, which never counts, so no name can bench the others.
ADHOC_MODEL = "*"

# A target's calls are counted in 1-second slots (int(now)): a window_s shorter than one slot
# would count the current slot only, so the config refuses it (service/config.py).
SLOT_S = 1.0
_RING_S = 300  # 1-second outcome slots kept: the longest window_s
_RECENT_S = 60  # what "recent" means in status and metrics
_LATENCY_EPOCH_S = 30.0  # a latency histogram covers the last 30 to 60 seconds
_GROWTH = 1.15  # latency buckets: each 15% wider than the one before (an estimate within 15%)
_BUCKETS = 100  # up to 1.15**100 ms, about 20 minutes
_LOG_GROWTH = math.log(_GROWTH)
MIN_SAMPLES = 20  # good answers needed before a p95 is trusted (hedge = "p95" waits for them)
# Beyond this many entries, breaker states other dispatchers write are no longer adopted for
# targets never seen here: a peer (or keys an older version left in the bucket) cannot grow us.
MAX_ADOPTED = 1000
_PROBE_OUT = "cooldown over: one probe is out"
# The longest cooldown_s a config may set: no open breaker, here or at another replica, lasts
# longer.
COOLDOWN_MAX_S = 3600.0
# After a store refused a claim and nobody has told us who holds the probe, when to ask again.
_RECLAIM_AFTER_S = 1.0


class BreakerSettings(Struct, frozen=True, forbid_unknown_fields=True):
    """One target's circuit breaker ([breaker], a route's `breaker`, a target's `breaker`)."""

    enabled: bool = True
    consecutive_failures: Annotated[int, Meta(ge=1)] = 5
    failure_rate: Annotated[float, Meta(gt=0, le=1)] = 0.5
    min_requests: Annotated[int, Meta(ge=1)] = 10
    window_s: Annotated[float, Meta(gt=0, le=_RING_S)] = 60.0
    cooldown_s: Annotated[float, Meta(gt=0, le=COOLDOWN_MAX_S)] = 5.0
    trip_on: frozenset[str | int] = DEFAULT_TRIP_ON  # the kinds schemas.errors marks as tripping


def trips(settings: BreakerSettings, kind: str, status_code: int | None) -> bool:
    return kind in settings.trip_on or (status_code is not None and status_code in settings.trip_on)


def bucket_of(latency_ms: float) -> int:
    if latency_ms < _GROWTH:
        return 0
    # Every answer of a real provider (1.15 ms or more) comes here: a comparison and
    # math.trunc, not min() and int() (3,570 against 2,020 instructions, counted).
    bucket = math.trunc(math.log(latency_ms) / _LOG_GROWTH)
    if bucket < _BUCKETS - 1:
        return bucket
    return _BUCKETS - 1


def bucket_ms(bucket: int) -> float:
    """The upper edge of a latency bucket, in ms (a bucket past the last, as another
    dispatcher's stats may claim, is the last: 1.15 ** 100001 overflowed)."""
    return _GROWTH ** (min(max(bucket, -1), _BUCKETS - 1) + 1)


def percentile_ms(histogram: dict[int, int] | list[int], q: float) -> float | None:
    """The q-quantile (0..1) of a histogram (bucket -> count), as its bucket's upper edge."""
    items = sorted(histogram.items()) if isinstance(histogram, dict) else list(enumerate(histogram))
    total = sum(count for _, count in items)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for bucket, count in items:
        seen += count
        if seen >= rank and count:
            return bucket_ms(bucket)
    return bucket_ms(items[-1][0])


def percentiles(
    latency: dict[int, int], first_chunk_latency: dict[int, int]
) -> dict[str, float | None]:
    """The p50 and p95 of a target's good answers and of its streams' first chunks, from their
    histograms (one dispatcher's, or several's summed: `lifeline status`); None without any."""
    return {
        "p50_ms": percentile_ms(latency, 0.5),
        "p95_ms": percentile_ms(latency, 0.95),
        "first_chunk_p50_ms": percentile_ms(first_chunk_latency, 0.5),
        "first_chunk_p95_ms": percentile_ms(first_chunk_latency, 0.95),
    }


class Latencies:
    """Recent latencies of one kind: two 30-second histograms (the last 30 to 60 s), and
    their p95, recomputed at most 4 times a second."""

    __slots__ = ("counts", "epoch", "p95_at", "p95_ms", "previous")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.previous = [0] * _BUCKETS
        self.epoch = -1
        self.p95_ms: float | None = None
        self.p95_at = -1.0

    def add(self, now: float, latency_ms: float) -> None:
        epoch = int(now // _LATENCY_EPOCH_S)
        if epoch != self.epoch:
            self.previous = self.counts if epoch == self.epoch + 1 else [0] * _BUCKETS
            self.counts = [0] * _BUCKETS
            self.epoch = epoch
        self.counts[bucket_of(latency_ms)] += 1

    def histogram(self, now: float) -> dict[int, int]:
        """Bucket -> count (sparse, for the shared snapshot)."""
        epoch = int(now // _LATENCY_EPOCH_S)
        parts: tuple[list[int], ...]
        if epoch == self.epoch:
            parts = (self.counts, self.previous)
        elif epoch == self.epoch + 1:
            parts = (self.counts,)
        else:
            return {}
        merged: dict[int, int] = {}
        for part in parts:
            for bucket, count in enumerate(part):
                if count:
                    merged[bucket] = merged.get(bucket, 0) + count
        return merged

    def p95(self, now: float) -> float | None:
        """The p95 in ms, None until MIN_SAMPLES."""
        if now - self.p95_at >= 0.25:
            histogram = self.histogram(now)
            self.p95_ms = (
                percentile_ms(histogram, 0.95) if sum(histogram.values()) >= MIN_SAMPLES else None
            )
            self.p95_at = now
        return self.p95_ms


class Counts(NamedTuple):
    """A target's calls in a window, by how they ended (TargetHealth.counts)."""

    ok: int
    failed: int  # counted (trip_on) failures
    other: int  # failures that do not count
    cancelled: int  # cancelled before they answered


class TargetHealth:
    """Breaker state and recent figures of one target (provider + model)."""

    __slots__ = (
        "cancelled",
        "changed",
        "cleared_s",
        "closed_at",
        "consecutive",
        "epochs",
        "failed",
        "first_chunks",
        "latencies",
        "model",
        "ok",
        "ok_started",
        "open_until",
        "other",
        "probe_until",
        "provider",
        "reason",
        "since_unix_ms",
        "skipped",
        "state",
    )

    def __init__(self, provider: str, model: str, since_unix_ms: int = 0) -> None:
        self.provider = provider
        self.model = model
        self.state: State = CLOSED
        self.open_until = 0.0  # monotonic
        self.probe_until = 0.0  # monotonic: when a probe in flight counts as lost
        self.consecutive = 0
        self.reason = ""
        self.since_unix_ms = since_unix_ms  # when the breaker took its state
        # Monotonic: when it last closed; failed calls made before count for nothing.
        self.closed_at = -math.inf
        self.ok_started = -math.inf  # monotonic: when the latest call that answered well was made
        self.epochs = [-1] * _RING_S
        self.ok = [0] * _RING_S
        self.failed = [0] * _RING_S  # counted (trip_on) failures
        # Failures that do not count: the request's fault, or outdated by a close.
        self.other = [0] * _RING_S
        # Calls cancelled before they answered (a hedge lost, a request aborted or cut short by
        # a shutdown): made, maybe paid for, but no sign of the target's health either way.
        self.cancelled = [0] * _RING_S
        # Slots up to this second are ignored by the failure rate (set on close).
        self.cleared_s = -1
        self.latencies = Latencies()  # of its good answers, whole
        self.first_chunks: Latencies | None = None  # of its streams, once one streams
        self.skipped = 0  # calls passed over because the breaker was open (since start)
        self.changed = True  # since the last snapshot

    @property
    def label(self) -> str:
        return f"{self.provider}:{self.model}" if self.model else self.provider

    def _slot(self, now: float) -> int:
        # math.trunc is int() of a float in 330 instructions rather than 820 on 3.11 (counted:
        # int() is a call of the type); five per good request, with the latency epoch below,
        # the retry budget's second, the attempt's deadline header and the audit event's time.
        second = math.trunc(now)
        i = second % _RING_S
        if self.epochs[i] != second:
            self.epochs[i] = second
            self.ok[i] = self.failed[i] = self.other[i] = self.cancelled[i] = 0
        return i

    def counts(self, now: float, window_s: float, since_s: int = -1) -> Counts:
        """The calls that ended in the last window_s seconds (after since_s), by outcome."""
        first = max(int(now) - math.ceil(window_s) + 1, since_s + 1)
        ok = failed = other = cancelled = 0
        for i, epoch in enumerate(self.epochs):
            if epoch >= first:
                ok += self.ok[i]
                failed += self.failed[i]
                other += self.other[i]
                cancelled += self.cancelled[i]
        return Counts(ok, failed, other, cancelled)

    def tally(self, now: float, ok: bool, counted: bool, latency_ms: float, started: float) -> None:
        """One finished call in this second's slot: a good answer (and its latency, and when it
        was made), a counted failure, or a failure that does not count."""
        if ok:
            self.answered(now, latency_ms, started)
            return
        i = self._slot(now)
        self.changed = True
        if counted:
            self.failed[i] += 1
        else:
            self.other[i] += 1

    def answered(self, now: float, latency_ms: float, started: float) -> None:
        """tally(now, True, False, latency_ms, started) in one call: every good answer's."""
        self.changed = True
        # _slot's common case inline (a call of it is about 700 instructions): this second's
        # slot, already in use.
        second = math.trunc(now)
        i = second % _RING_S
        if self.epochs[i] != second:
            i = self._slot(now)
        self.ok[i] += 1
        # max() spelled out: on 3.11 a call of the builtin costs about 1,300 instructions.
        if started > self.ok_started:  # noqa: PLR1730
            self.ok_started = started
        latencies = self.latencies  # Latencies.add, its common case inline
        if math.trunc(now // _LATENCY_EPOCH_S) != latencies.epoch:
            latencies.add(now, latency_ms)
            return
        latencies.counts[0 if latency_ms < _GROWTH else bucket_of(latency_ms)] += 1

    def histogram(self, now: float) -> dict[int, int]:
        """Recent good answers' latencies, bucket -> count (sparse, for the shared snapshot)."""
        return self.latencies.histogram(now)


# A wall-clock time in milliseconds, as another replica (or any client of the shared bucket)
# writes it: at most an int64. msgspec decodes a JSON integer of any length whole, and one past
# a float's range raised OverflowError in Health.apply, which ended the store's watch for good.
UnixMs = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]


class BreakerState(Struct, frozen=True):
    """One breaker's state as a store keeps it: what another dispatcher needs to adopt it."""

    provider: str
    model: str
    state: State
    # When an open breaker's cooldown or a half-open probe's lease ends, on the wall clock
    # (0: none).
    until_unix_ms: UnixMs
    reason: str = ""
    since_unix_ms: UnixMs = 0  # when the breaker took this state


def newer(state: State, since_unix_ms: int, than: State, than_since_unix_ms: int) -> bool:
    """Whether a breaker's `state` taken at `since_unix_ms` replaces the one it finds (`than`,
    taken at `than_since_unix_ms`): the one ordering of states between replicas, for what a
    replica adopts (Health.apply) and what it writes over in the shared store. The later one
    wins; in the same millisecond an open or half-open wins over a close (the safer guess, and
    a probe settles it)."""
    if since_unix_ms != than_since_unix_ms:
        return since_unix_ms > than_since_unix_ms
    return than == CLOSED and state != CLOSED


class HealthStore(Protocol):
    """Where a Health's breaker changes go and who may send a half-open probe. A store serves one
    Health, from start() to stop(); it may tell that Health what others decided (Health.apply)."""

    @property
    def shared(self) -> bool:
        """True while breaker state is shared with other dispatchers."""
        ...

    async def start(self, health: Health) -> None: ...

    async def stop(self) -> None: ...

    def announce(self, breaker: BreakerState) -> None:
        """A breaker changed here. Called on a request's path: it must not block."""
        ...

    async def claim(self, breaker: BreakerState) -> bool | None:
        """Ask to send the half-open probe `breaker` describes. True: it is ours (the store has
        recorded the claim); False: another dispatcher holds it; None: the store has no say
        (local, or out of reach), so this dispatcher claims it on its own."""
        ...


class LocalStore:
    """This dispatcher's own view: nothing is shared, every probe is this dispatcher's to claim."""

    shared = False

    async def start(self, health: Health) -> None:
        pass

    async def stop(self) -> None:
        pass

    def announce(self, breaker: BreakerState) -> None:
        pass

    async def claim(self, breaker: BreakerState) -> bool | None:
        return None


# What a call fails with when the caller's own NATS connection drops: not its provider's doing.
_OUTAGE_KINDS = frozenset(("timeout", "no_responders", "connection"))


class Health:
    """Every target's breaker and figures, as this dispatcher sees them."""

    def __init__(
        self,
        store: HealthStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.store: HealthStore = LocalStore() if store is None else store
        self.clock = clock
        self.wall = wall
        self.targets: dict[tuple[str, str], TargetHealth] = {}
        # Whether this process's own NATS connection was down since a time on `clock` (the
        # dispatcher's NatsTransport.spanned_an_outage): a call it made then that timed out,
        # found no responders or could not be sent failed for that, not for its provider.
        self.own_outage: Callable[[float], bool] | None = None
        # The (provider, model) breakers the config names: adopted from the shared bucket
        # whatever their number (MAX_ADOPTED bounds only the others).
        self.configured: Callable[[str, str], bool] = lambda provider, model: False
        # The longest a half-open probe's lease lasts: its target's timeout_s and a second (the
        # dispatcher sets it from its config's max_timeout_s). An adopted lease is held to it.
        self.longest_lease_s = COOLDOWN_MAX_S

    @property
    def shared(self) -> bool:
        return self.store.shared

    async def start(self) -> None:
        await self.store.start(self)

    async def stop(self) -> None:
        await self.store.stop()

    def of(self, provider: str, model: str) -> TargetHealth:
        key = (provider, model)
        health = self.targets.get(key)
        if health is None:
            health = self.targets[key] = TargetHealth(provider, model, int(self.wall() * 1000))
        return health

    def admit(self, provider: str, model: str) -> int:
        """CALL, SKIP (open, or a probe is out), or PROBE: the cooldown is over; claim() the
        probe first."""
        health = self.targets.get((provider, model))
        if health is None or health.state == CLOSED:
            return CALL
        now = self.clock()
        if health.state == OPEN:
            return SKIP if now < health.open_until else PROBE
        # Half-open: a lost probe's lease runs out.
        return SKIP if now < health.probe_until else PROBE

    def skipped(self, provider: str, model: str) -> None:
        health = self.of(provider, model)
        health.skipped += 1
        health.changed = True

    async def claim(self, provider: str, model: str, lease_s: float) -> bool:
        """Take the half-open probe: True when this call is it. The store decides first."""
        health = self.of(provider, model)
        health.state, health.probe_until = HALF_OPEN, self.clock() + lease_s  # skip it while we ask
        asked_until = health.probe_until
        since = self._since(health)
        claimed = BreakerState(
            provider=provider,
            model=model,
            state=HALF_OPEN,
            until_unix_ms=self.until_unix_ms(health),
            reason=_PROBE_OUT,
            since_unix_ms=since,
        )
        won = await self.store.claim(claimed)
        if won is False:
            # Another dispatcher's claim reaches us through the store and sets the lease it holds.
            # But what beat us may be our own earlier write whose echo has not come back, and then
            # nothing would: ask again soon, not after our whole lease.
            if health.probe_until == asked_until:
                health.probe_until = self.clock() + _RECLAIM_AFTER_S
            return False
        self.claim_locally(provider, model, lease_s, announce=won is None, since_unix_ms=since)
        return True

    def claim_locally(
        self,
        provider: str,
        model: str,
        lease_s: float,
        announce: bool = True,
        since_unix_ms: int | None = None,
    ) -> None:
        """This dispatcher sends the probe; others (here and, via a shared store, elsewhere) keep
        skipping."""
        health = self.of(provider, model)
        health.state = HALF_OPEN
        health.probe_until = self.clock() + lease_s
        health.reason = _PROBE_OUT
        health.since_unix_ms = self._since(health) if since_unix_ms is None else since_unix_ms
        health.changed = True
        if announce:
            self._changed(health)

    def release(self, provider: str, model: str) -> None:
        """A probe that could not decide (its request's deadline cut it short, its request
        aborted or stopped): the next call probes, here and, told through the store, at every
        replica (a state of its own moment: the claim's, on a tie, would stay)."""
        health = self.of(provider, model)
        if health.state == HALF_OPEN:
            health.state = OPEN
            health.open_until = self.clock()
            health.reason = "the probe could not decide: the next call probes"
            health.since_unix_ms = self._since(health)
            health.changed = True
            self._changed(health)

    def record(
        self,
        provider: str,
        model: str,
        settings: BreakerSettings | None,
        ok: bool,
        kind: str | None = None,
        status_code: int | None = None,
        latency_ms: float = 0.0,
        probe: bool = False,
        started: float | None = None,
    ) -> None:
        """One finished call. `probe`: it was let through while the breaker was not closed.
        `started`: when the call was made, on this Health's clock (None: now)."""
        if ok:
            self.answered((provider, model), settings, latency_ms, probe, started)
            return
        health = self.targets.get((provider, model)) or self.of(provider, model)
        now = self.clock()
        started = now if started is None else started
        # Timed out or unsent while this dispatcher's own NATS connection was down: its answer
        # may have been lost with the connection, so it tells nothing of the provider.
        outage = kind in _OUTAGE_KINDS and self.own_outage is not None and self.own_outage(started)
        counted = (
            kind is not None
            and settings is not None
            and trips(settings, kind, status_code)
            and not outage
        )
        # Made before the breaker last closed: what closed it is newer.
        outdated = started < health.closed_at
        health.tally(
            now, ok=ok, counted=counted and not outdated, latency_ms=latency_ms, started=started
        )
        if settings is None or not settings.enabled or outdated:
            return
        if outage:  # counts for nothing: a probe's turn goes to the next call
            if probe:
                self.release(provider, model)
            return
        if not counted:
            health.consecutive = 0
            if probe and health.state != CLOSED:
                self._close(health, now, "a probe got an answer")
            return
        if health.state != CLOSED:
            if probe:
                self._open(health, settings, now, f"the probe failed ({kind})")
            return
        self._failed_while_closed(health, settings, now, started=started, kind=kind)

    def answered(
        self,
        key: tuple[str, str],
        settings: BreakerSettings | None,
        latency_ms: float,
        probe: bool = False,
        started: float | None = None,
    ) -> None:
        """`record(*key, settings, True, None, None, latency_ms, probe, started)`: a good
        answer, every good request's, taking its target's (provider, model) as the key it is
        kept under (a target's health_key), so no tuple is made for it."""
        health = self.targets.get(key) or self.of(*key)
        now = self.clock()
        if started is None:
            started = now
        outdated = started < health.closed_at
        health.answered(now, latency_ms, started)
        if settings is None or not settings.enabled or outdated:
            return
        health.consecutive = 0
        if probe and health.state != CLOSED:
            self._close(health, now, "a probe got an answer")

    def _failed_while_closed(
        self,
        health: TargetHealth,
        settings: BreakerSettings,
        now: float,
        started: float,
        kind: str | None,
    ) -> None:
        """A counted failure while the breaker is closed: it opens after `consecutive_failures`
        in a row, or when the failure rate over `window_s` reaches `failure_rate`."""
        # Else a call made after this one has answered well since: old news.
        if started >= health.ok_started:
            health.consecutive += 1
        if health.consecutive >= settings.consecutive_failures:
            self._open(
                health, settings, now, f"{health.consecutive} failures in a row (last: {kind})"
            )
            return
        counts = health.counts(now, settings.window_s, health.cleared_s)
        total = counts.ok + counts.failed + counts.other  # a cancelled call says nothing
        if total >= settings.min_requests and counts.failed >= settings.failure_rate * total:
            self._open(
                health,
                settings,
                now,
                f"{counts.failed} of the last {total} calls failed within {settings.window_s:g} s "
                f"(last: {kind})",
            )

    def _open(
        self, health: TargetHealth, settings: BreakerSettings, now: float, reason: str
    ) -> None:
        health.state = OPEN
        health.open_until = now + settings.cooldown_s
        health.reason = reason
        health.since_unix_ms = self._since(health)
        log.warning(
            "circuit for %s opened: %s; skipping it for %g s",
            health.label,
            reason,
            settings.cooldown_s,
        )
        self._changed(health)

    def _close(self, health: TargetHealth, now: float, reason: str) -> None:
        health.state = CLOSED
        health.consecutive = 0
        health.cleared_s = int(now)
        health.closed_at = now
        health.reason = reason
        health.since_unix_ms = self._since(health)
        log.info("circuit for %s closed: %s", health.label, reason)
        self._changed(health)

    def _since(self, health: TargetHealth) -> int:
        """When `health` takes a new state here, in wall-clock milliseconds: always after its
        state before, so that the other replicas order one breaker's states as they came here.
        A probe's close in the very millisecond of its claim would otherwise lose to the
        half-open there (apply keeps an open or half-open on a tie, as between replicas)."""
        return max(int(self.wall() * 1000), health.since_unix_ms + 1)

    def _changed(self, health: TargetHealth) -> None:
        """A breaker changed state here (not when told by another replica): tell the store."""
        self.store.announce(self.state_of(health))

    def apply(
        self,
        provider: str,
        model: str,
        state: State,
        until_unix_ms: int,
        reason: str,
        since_unix_ms: int,
    ) -> None:
        """A state another replica set (told by a shared store): adopt it without announcing it
        again."""
        if (provider, model) not in self.targets and (
            state == CLOSED
            or (len(self.targets) >= MAX_ADOPTED and not self.configured(provider, model))
        ):
            # A target never seen here is closed already; beyond MAX_ADOPTED, peers cannot grow
            # us (with what the config does not name: its own breakers are bounded by it).
            return
        health = self.of(provider, model)
        # A breaker closed since it was first seen here has seen nothing to order against.
        since_here = (
            health.since_unix_ms if health.closed_at > -math.inf or health.state != CLOSED else 0
        )
        if not newer(state, since_unix_ms, health.state, since_here):
            # The bucket's last record, replayed on reconnecting after this breaker changed here
            # while the bucket was out (an open older than the probe's close here, a close no
            # newer than the open here): what happened later stays.
            return
        now = self.clock()
        # Its cooldown (or lease) as the writer set it, counted from now at most: a replica
        # whose clock runs ahead would otherwise bench the target for as long as it is ahead.
        wall_ms = self.wall() * 1000
        # And never longer than such a state lasts anywhere: an "until" in year 9999 over a
        # "since" of now (a writer's bug; any client, in an open account) benched the target for
        # good: no replica probed it, so none wrote anything newer, and one that restarted
        # adopted it again from the bucket. (A replica whose config allows a longer lease may
        # see its probe doubled by this one: harmless.)
        longest_s = COOLDOWN_MAX_S if state == OPEN else self.longest_lease_s
        left_ms = min(until_unix_ms - wall_ms, until_unix_ms - since_unix_ms, longest_s * 1000)
        until = now + left_ms / 1000
        if state == OPEN:
            health.open_until = until
        elif state == HALF_OPEN:
            health.probe_until = until
        elif health.state != CLOSED:
            health.consecutive = 0
            health.cleared_s = int(now)
            health.closed_at = now
        if state != health.state:  # a line per breaker per change: one for each dispatcher
            # that set it, which says so itself; here, with a fleet's breakers, a flood
            log.debug(
                "circuit for %s is %s (set by another dispatcher: %s)", health.label, state, reason
            )
        health.state = state
        health.reason = reason
        health.since_unix_ms = since_unix_ms
        health.changed = True

    def until_unix_ms(self, health: TargetHealth) -> int:
        """When an open breaker's cooldown (or a half-open probe's lease) ends, on the wall
        clock."""
        until = (
            health.open_until
            if health.state == OPEN
            else health.probe_until
            if health.state == HALF_OPEN
            else 0.0
        )
        return int((self.wall() + (until - self.clock())) * 1000) if until else 0

    def state_of(self, health: TargetHealth) -> BreakerState:
        return BreakerState(
            provider=health.provider,
            model=health.model,
            state=health.state,
            until_unix_ms=self.until_unix_ms(health),
            reason=health.reason,
            since_unix_ms=health.since_unix_ms,
        )

    def p95_ms(self, provider: str, model: str, first_chunk: bool = False) -> float | None:
        """The recent p95 of the target's good answers (whole), or with `first_chunk`, of its
        streams' times to their first chunk; None until there are MIN_SAMPLES of them."""
        health = self.targets.get((provider, model))
        if health is None:
            return None
        latencies = health.first_chunks if first_chunk else health.latencies
        return None if latencies is None else latencies.p95(self.clock())

    def first_chunk(self, provider: str, model: str, latency_ms: float) -> None:
        """A streamed call's first chunk came `latency_ms` after the call was made."""
        health = self.targets.get((provider, model)) or self.of(provider, model)
        if health.first_chunks is None:
            health.first_chunks = Latencies()
        health.first_chunks.add(self.clock(), latency_ms)
        health.changed = True

    def cancelled(self, provider: str, model: str) -> None:
        """A call cancelled before it answered: counted among the target's calls, never for
        or against its breaker."""
        health = self.targets.get((provider, model)) or self.of(provider, model)
        health.cancelled[health._slot(self.clock())] += 1
        health.changed = True

    def snapshot(self) -> dict[str, Any]:
        """Every target's state and recent figures, as plain data (for the shared bucket and
        metrics)."""
        now = self.clock()
        out: dict[str, Any] = {}
        # A copy: the metrics reader calls this from its own thread.
        for health in list(self.targets.values()):
            counts = health.counts(now, _RECENT_S)
            histogram = health.histogram(now)
            # Its streams' times to their first chunk, which a stream's hedge = "p95" waits for:
            # none for a target that has not streamed.
            first_chunks = {} if health.first_chunks is None else health.first_chunks.histogram(now)
            out[health.label] = {
                "provider": health.provider,
                "model": health.model,
                "state": health.state,
                "reason": health.reason,
                "since_unix_ms": health.since_unix_ms,
                "until_unix_ms": self.until_unix_ms(health),
                "ok": counts.ok,
                "failed": counts.failed + counts.other,
                "cancelled": counts.cancelled,
                "skipped": health.skipped,
                **percentiles(histogram, first_chunks),
                "latency": {str(b): n for b, n in histogram.items()},
                "first_chunk_latency": {str(b): n for b, n in first_chunks.items()},
            }
        return out


class Untouched:
    """A Health seen by a request whose outcomes must not change it: one carrying simulated
    `faults`. Its breakers still apply (an open target is skipped), but it never probes and
    never records, so five simulated 503s cannot bench a real provider for every client."""

    def __init__(self, health: Health) -> None:
        self.health = health
        self.targets = health.targets

    def admit(self, provider: str, model: str) -> int:
        admitted = self.health.admit(provider, model)
        return SKIP if admitted == PROBE else admitted  # a real request sends the probe

    async def claim(self, provider: str, model: str, lease_s: float) -> bool:
        return False

    def p95_ms(self, provider: str, model: str, first_chunk: bool = False) -> float | None:
        return self.health.p95_ms(provider, model, first_chunk)

    def first_chunk(self, provider: str, model: str, latency_ms: float) -> None:
        pass

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def answered(self, *args: Any, **kwargs: Any) -> None:
        pass

    def skipped(self, provider: str, model: str) -> None:
        pass

    def cancelled(self, provider: str, model: str) -> None:
        pass

    def release(self, provider: str, model: str) -> None:
        pass
