"""Breaker state shared by every dispatcher replica, through a NATS JetStream key-value bucket.

BucketStore is the store (service/health.py's HealthStore) a dispatcher's Health takes when
`dispatcher.shared_health` is on. No extra service: the bucket lives in the NATS that already
carries the requests. Its entries are msgspec Structs, as JSON:

    breaker.<provider>.<model>   BreakerRecord: the breaker's state, written by the dispatcher
                                 that changed it and watched by all: a breaker one replica
                                 opens is open everywhere within a network round trip. The
                                 half-open probe is claimed with a compare-and-set on the key's
                                 revision, so only one replica sends it.
    stats.<dispatcher>           StatsDocument: one dispatcher's recent figures per target
                                 (outcomes, latency histograms of good answers and of streams'
                                 first chunks, skips), written once a second
                                 when they changed; `lifeline status` merges them. At most
                                 STATS_MAX_BYTES (or a quarter of the server's max_payload),
                                 whatever the traffic: the targets that say the most go
                                 first, the rest are counted.

A dispatcher that cannot reach the bucket (JetStream off, NATS trouble, a timeout) says so
in its log, keeps acting on its own view (as with service/health.py's LocalStore), and tries
again every few seconds. Requests never wait on the bucket, except for the rare probe claim
(bounded).

Why JetStream KV: it is already in the NATS Lifeline runs on, instead of Redis or a gossip
protocol. Only state changes are written (an open, a probe claim, a close). Failure counts
stay per replica: sharing every outcome would put a JetStream write on every request. The
price: with N replicas, a breaker opens when one replica has seen enough failures, not when
all of them together have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from typing import Annotated, Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.kv import KeyValue
from nats.nuid import NUID

from service import jetstream
from service.health import CLOSED, OPEN, BreakerState, Health, UnixMs, newer, percentiles
from service.loop import cancel_and_wait

log = logging.getLogger("lifeline.health")

BREAKER_PREFIX = "breaker."
STATS_PREFIX = "stats."
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_OP_TIMEOUT_S = 1.0  # one bucket operation; a slower bucket counts as unreachable
_CLAIM_TIMEOUT_S = 0.25  # a probe claim is on a request's path: bounded tighter
_PUBLISH_EVERY_S = 1.0
_RETRY_EVERY_S = 5.0
_SWEEP_EVERY_S = 60.0  # how often to delete stats documents of dispatchers long gone
_STATS_GONE_AFTER_S = 600.0  # a stats document this old is a dispatcher's that died
_SWEEP_MAX = 100  # documents deleted per sweep at most
_LOOK_EVERY_S = 5.0  # how often to look whether the bucket was made again (see _maintain)
_REFRESH_EVERY_S = 30.0
# A dispatcher's stats older than this are from one that is gone: a live one writes them
# every 30 s at least (_REFRESH_EVERY_S), so two missed writes and a margin.
STALE_AFTER_S = 2 * _REFRESH_EVERY_S + 5.0
WINDOW_S = 60.0  # the figures' window: a document older than that counted no call still in it
# A stats document's ceiling. One put over the server's max_payload is refused (and the bucket
# then counts as lost), so the document is kept far below it: 64 KiB holds a few hundred targets.
STATS_MAX_BYTES = 64 * 1024


class BreakerRecord(BreakerState, frozen=True):
    """A breaker's state in the bucket, and the dispatcher that wrote it (which ignores its
    echo)."""

    by: str = ""


# A count as any dispatcher writes it: at most an int64, never negative. msgspec decodes a JSON
# integer of any length whole, and one past a float's range (a percentile's rank, a success
# rate) ended `lifeline status` in an OverflowError: a document with any other is left out.
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class TargetFigures(msgspec.Struct):
    """What `lifeline status` reads of one target's figures (merge_status); the rest stays local."""

    provider: str
    model: str
    ok: Count = 0
    failed: Count = 0
    cancelled: Count = 0  # absent from a version before it: 0
    skipped: Count = 0
    latency: dict[int, Count] = {}  # latency bucket -> good answers (service/health.py's histogram)
    # latency bucket -> streams' first chunks (absent from a version before it, or a target
    # that has not streamed: {})
    first_chunk_latency: dict[int, Count] = {}


class StatsDocument(msgspec.Struct):
    dispatcher: str
    host: str
    ts_unix_ms: UnixMs
    targets: dict[str, TargetFigures] = {}
    omitted: Count = 0  # targets left out to keep the document under its limit


_encoder = msgspec.json.Encoder()
_breaker_decoder = msgspec.json.Decoder(BreakerRecord)
_stats_decoder = msgspec.json.Decoder(StatsDocument)


def key_token(text: str) -> str:
    """A model name as one bucket-key token: '.', '/', ':' and the like become =XX."""
    return _UNSAFE.sub(lambda m: "".join(f"={b:02X}" for b in m.group().encode()), text) or "="


def breaker_key(provider: str, model: str) -> str:
    return f"{BREAKER_PREFIX}{provider}.{key_token(model)}"


class BucketStore:
    """A Health's store (service/health.py's HealthStore) in the shared bucket: the breaker
    changes this dispatcher makes go to it, those the others make come from it."""

    def __init__(self, nc: Client, bucket: str, replicas: int = 1) -> None:
        self.nc = nc
        self.bucket = bucket
        self.replicas = replicas
        self.id = f"{os.getpid()}-{NUID().next().decode()[:8]}"
        self.host = socket.gethostname()
        self.health: Health | None = None  # the one this store serves, from start()
        self.kv: KeyValue | None = None
        # Why the bucket is not in use; None when it is.
        self.problem: str | None = "not connected yet"
        self._revisions: dict[str, int] = {}  # breaker key -> last revision seen
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watcher: Any = None
        self._follower: asyncio.Task[None] | None = None
        self._made: object | None = None  # when the watched bucket's stream was made
        self._loop: asyncio.Task[None] | None = None

    @property
    def shared(self) -> bool:
        return self.kv is not None

    async def start(self, health: Health) -> None:
        self.health = health
        await self._connect(health)
        self._loop = asyncio.create_task(self._maintain(health))

    async def stop(self) -> None:
        if self._loop is not None:
            await cancel_and_wait(self._loop)
            self._loop = None
        if self._tasks:  # breaker changes still being written
            await asyncio.wait(set(self._tasks), timeout=_OP_TIMEOUT_S)
        kv, self.kv = self.kv, None
        if kv is not None:
            try:
                await asyncio.wait_for(kv.delete(STATS_PREFIX + self.id), _OP_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - going away anyway; status drops stale stats
                log.debug("could not delete this dispatcher's stats from %s: %r", self.bucket, exc)
        await self._stop_watcher()

    async def _connect(self, health: Health) -> None:
        try:
            js = self.nc.jetstream(timeout=_OP_TIMEOUT_S * 2)
            try:
                kv = await js.key_value(self.bucket)
                await jetstream.look_at_bucket(js, self.bucket, self.replicas, log)
            except nats.js.errors.BucketNotFoundError:
                kv = await js.create_key_value(
                    bucket=self.bucket,
                    history=1,
                    replicas=self.replicas,
                    description="Lifeline breaker state",
                )
            # The revisions known belong to the bucket as it was: this one may be new (deleted
            # and made again, a server restarted without its store), its revisions lower. The
            # watch replays every key's last record, and its revision with it.
            self._revisions.clear()
            self._made = await self._made_at(js)
            self._watcher = await kv.watch(BREAKER_PREFIX + ">")
        except Exception as exc:  # noqa: BLE001 - nats-py raises many types, all "not reachable"
            self._degrade(exc)
            return
        self._follower = asyncio.create_task(self._follow(health, self._watcher))
        self.kv = kv
        if self.problem is None:
            pass  # watched afresh after a reconnect (see _maintain): nothing was lost
        elif self.problem != "not connected yet":
            log.warning(
                "shared health restored: breaker state is shared again through bucket %s",
                self.bucket,
            )
        else:
            log.info(
                "shared health: breaker state is shared through JetStream bucket %s", self.bucket
            )
        self.problem = None
        # What opened here meanwhile, unless the bucket knows better (a newer record).
        for target in health.targets.values():
            if target.state != CLOSED:
                self._spawn(self._put_if_newer(health.state_of(target)))

    def _degrade(self, exc: BaseException) -> None:
        problem = f"{type(exc).__name__}: {exc}".rstrip(": ")
        if self.kv is not None or self.problem == "not connected yet":
            log.warning(
                "shared health unavailable (bucket %s: %s); breakers use this dispatcher's own "
                "view until it is back",
                self.bucket,
                # It worked until now: a server restarting, or a cluster electing a leader.
                problem if self.kv is not None else jetstream.hint(exc, self.replicas),
            )
        self.kv = None
        self.problem = problem

    async def _stop_watcher(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            try:
                await watcher.stop()
            except Exception as exc:  # noqa: BLE001 - the connection may be gone already
                log.debug("could not stop the watcher of bucket %s: %r", self.bucket, exc)
        follower, self._follower = self._follower, None
        if follower is not None:
            await cancel_and_wait(follower)

    async def _follow(self, health: Health, watcher: Any) -> None:
        """Adopt every breaker change another dispatcher writes."""
        async for entry in watcher:
            if entry is None:
                continue  # the end-of-history marker
            if entry.operation is not None or entry.value is None:  # a delete or a purge:
                self._revisions.pop(entry.key, None)  # a claim now creates the key afresh
                continue
            try:
                record = _breaker_decoder.decode(entry.value)
            except msgspec.DecodeError as exc:
                log.warning(
                    "ignoring a malformed breaker entry %s in bucket %s: %s",
                    entry.key,
                    self.bucket,
                    exc,
                )
                kept = False
            else:
                if record.by != self.id:
                    health.apply(
                        provider=record.provider,
                        model=record.model,
                        state=record.state,
                        until_unix_ms=record.until_unix_ms,
                        reason=record.reason,
                        since_unix_ms=record.since_unix_ms,
                    )
                kept = (record.provider, record.model) in health.targets
            # Revisions are kept for the breakers kept here only: the bucket may hold many more
            # keys.
            # An echo of our own write can arrive after a later write's revision was stored.
            if kept or entry.key in self._revisions:
                self._revisions[entry.key] = max(entry.revision, self._revisions.get(entry.key, 0))

    async def _maintain(self, health: Health) -> None:
        """Publish this dispatcher's figures every second when they changed, and every 30 s
        anyway (so `status` sees an idle dispatcher's window empty); reconnect when the bucket
        was lost."""
        published = looked = 0.0
        swept = time.monotonic()
        reconnects = self.nc.stats["reconnects"]
        while True:
            await asyncio.sleep(_PUBLISH_EVERY_S if self.kv is not None else _RETRY_EVERY_S)
            remade = False
            if self.kv is not None and time.monotonic() - looked >= _LOOK_EVERY_S:
                # Deleted and made again (an operator, another replica) while this one's writes
                # all went through: its watch resumed at its old place in the old stream, far
                # past the new one's records, and it heard no other replica's breaker again.
                looked = time.monotonic()
                made = await self._made_at(self.nc.jetstream(timeout=_OP_TIMEOUT_S))
                remade = made is not None and made != self._made
            if self.kv is None or remade or self.nc.stats["reconnects"] != reconnects:
                # Lost, or back from a reconnect: the server may have restarted without its
                # store, the bucket made anew by another replica, and a watch that resumes at
                # its old place in the stream would never see the new one's records.
                reconnects = self.nc.stats["reconnects"]
                await self._stop_watcher()
                await self._connect(health)
                continue
            now = time.monotonic()
            if now - swept >= _SWEEP_EVERY_S:
                swept = now
                await self._sweep_stale_stats()
            changed = any(target.changed for target in health.targets.values())
            if changed or now - published >= _REFRESH_EVERY_S:
                published = now
                await self.publish_stats()

    async def _sweep_stale_stats(self) -> None:
        """Delete the stats documents of dispatchers gone without stopping (SIGKILL, out of
        memory): only a stop deletes its own, and `lifeline status` reads every key of the
        bucket on every call. A few per sweep, long stale only (every replica sweeps)."""
        kv = self.kv
        if kv is None:
            return
        try:
            keys = await asyncio.wait_for(kv.keys(), _OP_TIMEOUT_S * 5)
        except Exception:  # noqa: BLE001 - none yet (NoKeysError), unreachable: the next sweep
            return
        now_ms, swept = time.time() * 1000, 0
        for key in keys:
            if not key.startswith(STATS_PREFIX) or key == STATS_PREFIX + self.id:
                continue
            try:
                entry = await asyncio.wait_for(kv.get(key), _OP_TIMEOUT_S)
                age_ms = now_ms - _stats_decoder.decode(entry.value).ts_unix_ms
            except Exception:  # noqa: BLE001, S112 - gone meanwhile, or not a stats document
                continue
            if age_ms > _STATS_GONE_AFTER_S * 1000:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(kv.delete(key), _OP_TIMEOUT_S)
                swept += 1
                if swept >= _SWEEP_MAX:
                    return

    async def _made_at(self, js: Any) -> object | None:
        """When the bucket's stream was made, or None when that cannot be told now."""
        try:
            info = await asyncio.wait_for(js.stream_info(f"KV_{self.bucket}"), _OP_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - unreachable for now: the next look tells
            return None
        return info.created

    async def publish_stats(self) -> None:
        if self.kv is None or self.health is None:
            return
        for target in self.health.targets.values():
            target.changed = False
        limit_bytes = min(STATS_MAX_BYTES, self.nc.max_payload // 4)
        payload = stats_document(
            dispatcher=self.id,
            host=self.host,
            ts_unix_ms=int(time.time() * 1000),
            snapshot=self.health.snapshot(),
            limit_bytes=limit_bytes,
        )
        # Only a host name of kilobytes gets here; never send what may not fit.
        if len(payload) > limit_bytes:
            log.warning(
                "not sharing figures: the stats document is %d bytes, above %d",
                len(payload),
                limit_bytes,
            )
            return
        try:
            await asyncio.wait_for(self.kv.put(STATS_PREFIX + self.id, payload), _OP_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001
            self._degrade(exc)

    def _value(self, breaker: BreakerState) -> bytes:
        record = BreakerRecord(**msgspec.structs.asdict(breaker), by=self.id)
        return _encoder.encode(record)

    def announce(self, breaker: BreakerState) -> None:
        """A breaker changed here: write it to the bucket, off the request's path."""
        if self.kv is not None:
            self._spawn(self._put(breaker))

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _put(
        self, breaker: BreakerState, only_if_new: bool = False, last: int | None = None
    ) -> None:
        """Write `breaker`; with `only_if_new` only where the bucket has none, with `last`
        only over that revision (a write in between wins)."""
        if self.kv is None:
            return
        key, value = breaker_key(breaker.provider, breaker.model), self._value(breaker)
        try:
            if only_if_new:
                write = self.kv.create(key, value)
            elif last is not None:
                write = self.kv.update(key, value, last=last)
            else:
                write = self.kv.put(key, value)
            revision = await asyncio.wait_for(write, _OP_TIMEOUT_S)
            self._revisions[key] = max(revision, self._revisions.get(key, 0))
        except nats.js.errors.KeyWrongLastSequenceError:
            pass  # the bucket has a state already, or a newer one: the watcher brings it here
        except Exception as exc:  # noqa: BLE001
            self._degrade(exc)

    async def _put_if_newer(self, breaker: BreakerState) -> None:
        """Write `breaker` unless the bucket holds a record as new or newer."""
        if self.kv is None:
            return
        key = breaker_key(breaker.provider, breaker.model)
        try:
            entry = await asyncio.wait_for(self.kv.get(key), _OP_TIMEOUT_S)
        except nats.js.errors.KeyNotFoundError:
            await self._put(breaker, only_if_new=True)
            return
        except Exception as exc:  # noqa: BLE001
            self._degrade(exc)
            return
        try:
            stored = _breaker_decoder.decode(entry.value or b"")
        except msgspec.DecodeError:
            stored = None
        if stored is None or _newer(breaker, stored):
            await self._put(breaker, last=entry.revision)

    async def claim(self, breaker: BreakerState) -> bool | None:
        """Only one replica probes: the claim is a compare-and-set on the breaker's revision.
        None while the bucket is out of reach: then this dispatcher decides alone."""
        if self.kv is None:
            return None
        key, value = breaker_key(breaker.provider, breaker.model), self._value(breaker)
        revision = self._revisions.get(key)
        try:
            if revision is None:
                revision = await asyncio.wait_for(self.kv.create(key, value), _CLAIM_TIMEOUT_S)
            else:
                update = self.kv.update(key, value, last=revision)
                revision = await asyncio.wait_for(update, _CLAIM_TIMEOUT_S)
        except nats.js.errors.KeyWrongLastSequenceError:
            # Someone changed the key first (what they wrote comes through the watcher), or the
            # revision known here is gone (the key deleted or purged, the bucket made anew):
            # learn the bucket's own, or every later claim would fail the same way.
            self._spawn(self._learn_revision(key))
            return False
        except Exception as exc:  # noqa: BLE001
            self._degrade(exc)
            return None
        self._revisions[key] = revision
        return True

    async def _learn_revision(self, key: str) -> None:
        if self.kv is None:
            return
        try:
            entry = await asyncio.wait_for(self.kv.get(key), _OP_TIMEOUT_S)
        except nats.js.errors.KeyNotFoundError:
            self._revisions.pop(key, None)  # the next claim creates it
        except Exception as exc:  # noqa: BLE001 - the next failed claim asks again
            log.debug("could not read %s from bucket %s: %r", key, self.bucket, exc)
        else:
            self._revisions[key] = entry.revision


def _newer(breaker: BreakerState, stored: BreakerState) -> bool:
    """Whether this dispatcher's `breaker` replaces the bucket's `stored` record (health.newer,
    as Health.apply decides too)."""
    return newer(breaker.state, breaker.since_unix_ms, stored.state, stored.since_unix_ms)


def stats_document(
    dispatcher: str,
    host: str,
    ts_unix_ms: int,
    snapshot: dict[str, dict[str, Any]],
    limit_bytes: int,
) -> bytes:
    """One dispatcher's figures for `lifeline status`, at most limit_bytes of JSON however many
    targets there are (unless its host name alone is longer): a breaker that is not closed first,
    then the busiest targets; those that do not fit are only counted, in `omitted`."""
    ranked = sorted(
        snapshot.items(),
        key=lambda item: (item[1]["state"] == CLOSED, -item[1]["ok"] - item[1]["failed"]),
    )
    document = StatsDocument(
        dispatcher=dispatcher, host=host, ts_unix_ms=ts_unix_ms, omitted=len(ranked)
    )
    # The largest `omitted` there can be is counted in; each entry costs its label, ':', its
    # figures and a ','.
    room = limit_bytes - len(_encoder.encode(document))
    for label, figures in ranked:
        entry = _figures(figures)
        size = len(_encoder.encode(label)) + len(_encoder.encode(entry)) + 2
        if size > room:
            break
        document.targets[label] = entry
        room -= size
    document.omitted = len(ranked) - len(document.targets)
    return _encoder.encode(document)


def _figures(figures: dict[str, Any]) -> TargetFigures:
    return TargetFigures(
        provider=figures["provider"],
        model=figures["model"],
        ok=figures["ok"],
        failed=figures["failed"],
        cancelled=figures["cancelled"],
        skipped=figures["skipped"],
        latency=_histogram(figures["latency"]),
        first_chunk_latency=_histogram(figures["first_chunk_latency"]),
    )


def _histogram(sparse: dict[str, int]) -> dict[int, int]:
    return {int(bucket): count for bucket, count in sparse.items()}


def merge_status(entries: dict[str, bytes], now_unix_ms: int | None = None) -> dict[str, Any]:
    """The bucket's contents as one view per target: breaker state from `breaker.*`, figures
    summed over the live dispatchers' `stats.*`, and the p50/p95 of the summed latency
    histograms (of good answers, and of streams' first chunks). Used by `lifeline status` and
    its tests. Entries that do not decode are left out."""
    now_unix_ms = now_unix_ms if now_unix_ms is not None else int(time.time() * 1000)
    targets: dict[str, dict[str, Any]] = {}
    dispatchers = []
    for key, raw in sorted(entries.items()):
        try:
            if key.startswith(STATS_PREFIX):
                stats = _stats_decoder.decode(raw)
                age_ms = now_unix_ms - stats.ts_unix_ms
                if age_ms <= STALE_AFTER_S * 1000:
                    dispatchers.append(
                        {"id": stats.dispatcher, "host": stats.host, "omitted": stats.omitted}
                    )
                    if age_ms <= WINDOW_S * 1000:
                        _merge_stats(targets, stats)
            elif key.startswith(BREAKER_PREFIX):
                _merge_breaker(targets, _breaker_decoder.decode(raw), now_unix_ms)
        except msgspec.DecodeError:
            continue  # not one of ours (or from a version that wrote it differently): left out
    for view in targets.values():
        # From the histograms summed over the dispatchers: percentiles cannot be summed.
        view.update(percentiles(view["latency"], view["first_chunk_latency"]))
    return {"dispatchers": dispatchers, "targets": targets}


def _merge_stats(targets: dict[str, dict[str, Any]], stats: StatsDocument) -> None:
    for label, figures in stats.targets.items():
        view = targets.setdefault(label, _empty(figures.provider, figures.model))
        view["ok"] += figures.ok
        view["failed"] += figures.failed
        view["cancelled"] += figures.cancelled
        view["skipped"] += figures.skipped
        _add(view["latency"], figures.latency)
        _add(view["first_chunk_latency"], figures.first_chunk_latency)


def _add(histogram: dict[int, int], more: dict[int, int]) -> None:
    for bucket, count in more.items():
        histogram[bucket] = histogram.get(bucket, 0) + count


def _merge_breaker(
    targets: dict[str, dict[str, Any]], breaker: BreakerRecord, now_unix_ms: int
) -> None:
    label = f"{breaker.provider}:{breaker.model}" if breaker.model else breaker.provider
    view = targets.setdefault(label, _empty(breaker.provider, breaker.model))
    state: str = breaker.state
    if state == OPEN and breaker.until_unix_ms <= now_unix_ms:
        state = "open (cooldown over: next call probes)"
    view.update(
        state=state,
        reason=breaker.reason,
        since_unix_ms=breaker.since_unix_ms,
        until_unix_ms=breaker.until_unix_ms,
    )


def _empty(provider: str, model: str) -> dict[str, Any]:
    return {
        "provider": provider,
        "model": model,
        "state": CLOSED,
        "reason": "",
        "since_unix_ms": 0,
        "until_unix_ms": 0,
        "ok": 0,
        "failed": 0,
        "cancelled": 0,
        "skipped": 0,
        "latency": {},
        "first_chunk_latency": {},
    }


class BucketTooSlow(TimeoutError):
    """The bucket was not read whole within the time `read_bucket` was given."""


_READER_GONE_S = 2.0  # how long the server keeps a finished read's consumer


async def read_bucket(nc: Client, bucket: str, within_s: float) -> dict[str, bytes]:
    """Every live key of the health bucket, read in one pass, within `within_s` in all: raises
    nats.js.errors.BucketNotFoundError, or BucketTooSlow saying how far it got. nats-py's
    key listing waits for its messages without a bound (a link that lost some held `lifeline
    status` for good), and a read per key took a round trip each."""
    entries: dict[str, bytes] = {}
    bound = asyncio.timeout(within_s)
    try:
        async with bound:
            kv = await nc.jetstream(timeout=_OP_TIMEOUT_S * 2).key_value(bucket)
            # Its consumer gone soon after the read (nats-py's default keeps one 5 minutes:
            # `lifeline status` every second left 300 on the bucket's stream).
            watcher = await kv.watchall(inactive_threshold=_READER_GONE_S)
            seen = False
            try:
                async for entry in watcher:
                    # None: nats-py's end of the listing, but first of all also when the server
                    # said "none left to send" before what it had sent arrived (seen under load:
                    # an empty bucket printed, exit 0); the bucket's count tells those apart.
                    if entry is None:
                        if seen or (await kv.status()).values == 0:
                            break
                        continue
                    seen = True
                    if entry.value and entry.key.startswith((STATS_PREFIX, BREAKER_PREFIX)):
                        entries[entry.key] = entry.value  # what merge_status reads
                    if entry.delta == 0:  # the last of those there when the listing began
                        break
            finally:
                with contextlib.suppress(Exception):
                    await watcher.stop()
    except TimeoutError:
        if not bound.expired():  # one operation's own timeout: said as it is
            raise
        raise BucketTooSlow(
            f"did not answer within {within_s:g} s ({len(entries)} key(s) read)"
        ) from None
    return entries
