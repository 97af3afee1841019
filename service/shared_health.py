"""Breaker state shared by every dispatcher replica, through a NATS JetStream key-value bucket.

No extra service: the bucket lives in the NATS that already carries the requests.

    breaker.<provider>.<model>   the breaker's state, written by the dispatcher that changed it
                                 and watched by all: a breaker one replica opens is open
                                 everywhere within a network round trip. The half-open probe
                                 is claimed with a compare-and-set on the key's revision, so
                                 only one replica sends it.
    stats.<dispatcher>           one dispatcher's recent figures per target (outcomes, latency
                                 histogram, skips), written once a second when they changed;
                                 `lifeline status` merges them. At most STATS_MAX_BYTES (or a
                                 quarter of the server's max_payload), whatever the traffic:
                                 the targets that say the most go first, the rest are counted.

A dispatcher that cannot reach the bucket (JetStream off, NATS trouble, a timeout) says so
in its log, keeps acting on its own view (service/health.py), and tries again every few
seconds. Requests never wait on the bucket, except for the rare probe claim (bounded).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import time
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.kv import KeyValue
from nats.nuid import NUID

from service.health import CLOSED, HALF_OPEN, OPEN, Health, TargetHealth

log = logging.getLogger("lifeline.health")

BREAKER_PREFIX = "breaker."
STATS_PREFIX = "stats."
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_OP_TIMEOUT_S = 1.0  # one bucket operation; a slower bucket counts as unreachable
_CLAIM_TIMEOUT_S = 0.25  # a probe claim is on a request's path: bounded tighter
_RECLAIM_AFTER_S = 1.0  # after a lost claim nobody announced, when this dispatcher may claim again
_PUBLISH_EVERY_S = 1.0
_RETRY_EVERY_S = 5.0
_REFRESH_EVERY_S = 30.0
STALE_AFTER_S = 120.0  # a dispatcher's stats older than this are from one that is gone
# A stats document's ceiling. One put over the server's max_payload is refused (and the bucket
# then counts as lost), so the document is kept far below it: 64 KiB holds a few hundred targets.
STATS_MAX_BYTES = 64 * 1024
# What `lifeline status` reads of each target's figures (merge_status); the rest stays local.
_STATS_FIELDS = ("provider", "model", "ok", "failed", "skipped", "latency")


def key_token(text: str) -> str:
    """A model name as one bucket-key token: '.', '/', ':' and the like become =XX."""
    return _UNSAFE.sub(lambda m: "".join(f"={b:02X}" for b in m.group().encode()), text) or "="


def breaker_key(provider: str, model: str) -> str:
    return f"{BREAKER_PREFIX}{provider}.{key_token(model)}"


class SharedHealth(Health):
    """Health whose breaker changes go to, and come from, the shared bucket."""

    def __init__(self, nc: Client, bucket: str, **kwargs: Any) -> None:
        super().__init__(on_change=self._announce, **kwargs)
        self.nc = nc
        self.bucket = bucket
        self.id = f"{os.getpid()}-{NUID().next().decode()[:8]}"
        self.host = socket.gethostname()
        self.kv: KeyValue | None = None
        self.problem: str | None = (
            "not connected yet"  # why the bucket is not in use; None when it is
        )
        self._revisions: dict[str, int] = {}  # breaker key -> last revision seen
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watcher: Any = None
        self._follower: asyncio.Task[None] | None = None
        self._loop: asyncio.Task[None] | None = None

    @property
    def shared(self) -> bool:
        return self.kv is not None

    async def start(self) -> None:
        await self._connect()
        self._loop = asyncio.create_task(self._maintain())

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
            self._loop = None
        if self._tasks:  # breaker changes still being written
            await asyncio.wait(set(self._tasks), timeout=_OP_TIMEOUT_S)
        kv, self.kv = self.kv, None
        if kv is not None:
            try:
                await asyncio.wait_for(kv.delete(STATS_PREFIX + self.id), _OP_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - going away anyway; status drops stale stats
                pass
        await self._stop_watcher()

    async def _connect(self) -> None:
        try:
            js = self.nc.jetstream(timeout=_OP_TIMEOUT_S * 2)
            try:
                kv = await js.key_value(self.bucket)
            except nats.js.errors.BucketNotFoundError:
                kv = await js.create_key_value(
                    bucket=self.bucket, history=1, description="Lifeline breaker state"
                )
            self._watcher = await kv.watch(BREAKER_PREFIX + ">")
        except Exception as exc:  # noqa: BLE001 - nats-py raises many types; each means "not reachable"
            self._degrade(exc)
            return
        self._follower = asyncio.create_task(self._follow(self._watcher))
        self.kv = kv
        if self.problem != "not connected yet":
            log.warning(
                "shared health restored: breaker state is shared again through bucket %s",
                self.bucket,
            )
        else:
            log.info(
                "shared health: breaker state is shared through JetStream bucket %s", self.bucket
            )
        self.problem = None
        for (
            health
        ) in self.targets.values():  # what opened here meanwhile, unless the bucket knows better
            if health.state != CLOSED:
                self._spawn(
                    self._put(health.provider, health.model, self._value(health), only_if_new=True)
                )

    def _degrade(self, exc: BaseException) -> None:
        problem = f"{type(exc).__name__}: {exc}".rstrip(": ")
        if self.kv is not None or self.problem == "not connected yet":
            log.warning(
                "shared health unavailable (bucket %s: %s); breakers use this dispatcher's own view "
                "until it is back (is JetStream enabled on the NATS server?)",
                self.bucket,
                problem,
            )
        self.kv = None
        self.problem = problem

    async def _stop_watcher(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            try:
                await watcher.stop()
            except Exception:  # noqa: BLE001 - the connection may be gone already
                pass
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)

    async def _follow(self, watcher: Any) -> None:
        """Adopt every breaker change another dispatcher writes."""
        async for entry in watcher:
            if entry is None or entry.value is None or entry.operation is not None:
                continue  # the end-of-history marker, or a delete
            try:
                value = json.loads(entry.value)
                target = (value["provider"], value["model"])
                if value.get("by") != self.id:
                    self.apply(
                        *target,
                        value["state"],
                        value["until_unix_ms"],
                        value.get("reason", ""),
                        value.get("since_unix_ms", 0),
                    )
                kept = target in self.targets
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning(
                    "ignoring a malformed breaker entry %s in bucket %s: %s",
                    entry.key,
                    self.bucket,
                    exc,
                )
                kept = False
            # Revisions are kept for the breakers kept here only: the bucket may hold many more keys.
            # An echo of our own write can arrive after a later write's revision was stored.
            if kept or entry.key in self._revisions:
                self._revisions[entry.key] = max(entry.revision, self._revisions.get(entry.key, 0))

    async def _maintain(self) -> None:
        """Publish this dispatcher's figures every second when they changed, and every 30 s
        anyway (so `status` sees an idle dispatcher's window empty); reconnect when the bucket was lost."""
        published = 0.0
        while True:
            await asyncio.sleep(_PUBLISH_EVERY_S if self.kv is not None else _RETRY_EVERY_S)
            if self.kv is None:
                await self._stop_watcher()
                await self._connect()
                continue
            now = time.monotonic()
            if any(h.changed for h in self.targets.values()) or now - published >= _REFRESH_EVERY_S:
                published = now
                await self.publish_stats()

    async def publish_stats(self) -> None:
        if self.kv is None:
            return
        for health in self.targets.values():
            health.changed = False
        limit_bytes = min(STATS_MAX_BYTES, self.nc.max_payload // 4)
        payload = stats_document(
            self.id, self.host, int(time.time() * 1000), self.snapshot(), limit_bytes
        )
        if (
            len(payload) > limit_bytes
        ):  # only a host name of kilobytes gets here; never send what may not fit
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

    def _value(self, health: TargetHealth) -> bytes:
        return json.dumps(
            {
                "provider": health.provider,
                "model": health.model,
                "state": health.state,
                "until_unix_ms": self.until_unix_ms(health),
                "reason": health.reason,
                "since_unix_ms": health.since_unix_ms,
                "by": self.id,
            }
        ).encode()

    def _announce(self, health: TargetHealth) -> None:
        """A breaker changed here: write it to the bucket, off the request's path."""
        if self.kv is not None:
            self._spawn(self._put(health.provider, health.model, self._value(health)))

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _put(
        self, provider: str, model: str, value: bytes, only_if_new: bool = False
    ) -> None:
        if self.kv is None:
            return
        key = breaker_key(provider, model)
        try:
            write = self.kv.create(key, value) if only_if_new else self.kv.put(key, value)
            self._revisions[key] = max(
                await asyncio.wait_for(write, _OP_TIMEOUT_S), self._revisions.get(key, 0)
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            pass  # only_if_new: the bucket has a state already; the watcher brings it here
        except Exception as exc:  # noqa: BLE001
            self._degrade(exc)

    async def claim(self, provider: str, model: str, lease_s: float) -> bool:
        """Only one replica probes: the claim is a compare-and-set on the breaker's revision."""
        if self.kv is None:
            return await super().claim(provider, model, lease_s)
        key = breaker_key(provider, model)
        health = self.of(provider, model)
        health.state, health.probe_until = (
            HALF_OPEN,
            self.clock() + lease_s,
        )  # skip it here while we ask
        asked_until = health.probe_until
        value = self._value(health)
        revision = self._revisions.get(key)
        try:
            if revision is None:
                revision = await asyncio.wait_for(self.kv.create(key, value), _CLAIM_TIMEOUT_S)
            else:
                revision = await asyncio.wait_for(
                    self.kv.update(key, value, last=revision), _CLAIM_TIMEOUT_S
                )
        except nats.js.errors.KeyWrongLastSequenceError:
            # Someone changed the key first. Another replica's claim or state reaches us through the
            # watcher and sets the lease it holds; but the newer revision may be our own write whose
            # echo has not come back, and then nothing would: ask again soon, not after our whole lease.
            if health.probe_until == asked_until:
                health.probe_until = self.clock() + _RECLAIM_AFTER_S
            return False
        except Exception as exc:  # noqa: BLE001
            self._degrade(exc)
            return await super().claim(provider, model, lease_s)
        self._revisions[key] = revision
        self.claim_locally(provider, model, lease_s, announce=False)
        return True


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
    document: dict[str, Any] = {
        "dispatcher": dispatcher,
        "host": host,
        "ts_unix_ms": ts_unix_ms,
        "targets": {},
    }
    # json.dumps writes ASCII, so characters are bytes; ', "omitted": N' takes at most 30 of them.
    room = limit_bytes - len(json.dumps(document)) - 30
    for label, figures in ranked:
        entry = {field: figures[field] for field in _STATS_FIELDS}
        size = len(json.dumps({label: entry}))  # its braces count for the ", " that goes before it
        if size > room:
            break
        document["targets"][label] = entry
        room -= size
    document["omitted"] = len(ranked) - len(document["targets"])
    return json.dumps(document).encode()


def merge_status(entries: dict[str, bytes], now_unix_ms: int | None = None) -> dict[str, Any]:
    """The bucket's contents as one view per target: breaker state from `breaker.*`, figures
    summed over the live dispatchers' `stats.*`. Used by `lifeline status` and its tests."""
    now_unix_ms = now_unix_ms if now_unix_ms is not None else int(time.time() * 1000)
    targets: dict[str, dict[str, Any]] = {}
    dispatchers = []
    for key, raw in sorted(entries.items()):
        try:
            value = json.loads(raw)
        except ValueError:
            continue
        if key.startswith(STATS_PREFIX):
            if now_unix_ms - value.get("ts_unix_ms", 0) > STALE_AFTER_S * 1000:
                continue
            dispatchers.append(
                {
                    "id": value.get("dispatcher"),
                    "host": value.get("host"),
                    "omitted": value.get("omitted", 0),
                }
            )
            for label, figures in value.get("targets", {}).items():
                view = targets.setdefault(label, _empty(figures["provider"], figures["model"]))
                view["ok"] += figures.get("ok", 0)
                view["failed"] += figures.get("failed", 0)
                view["skipped"] += figures.get("skipped", 0)
                for bucket, count in figures.get("latency", {}).items():
                    view["latency"][int(bucket)] = view["latency"].get(int(bucket), 0) + count
        elif key.startswith(BREAKER_PREFIX):
            label = (
                f"{value['provider']}:{value['model']}" if value.get("model") else value["provider"]
            )
            view = targets.setdefault(label, _empty(value["provider"], value.get("model", "")))
            state = value.get("state", CLOSED)
            if state == OPEN and value.get("until_unix_ms", 0) <= now_unix_ms:
                state = "open (cooldown over: next call probes)"
            view.update(
                state=state,
                reason=value.get("reason", ""),
                since_unix_ms=value.get("since_unix_ms", 0),
                until_unix_ms=value.get("until_unix_ms", 0),
            )
    return {"dispatchers": dispatchers, "targets": targets}


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
        "skipped": 0,
        "latency": {},
    }


async def read_bucket(nc: Client, bucket: str) -> dict[str, bytes]:
    """Every live key of the health bucket; raises nats.js.errors.BucketNotFoundError."""
    kv = await nc.jetstream(timeout=_OP_TIMEOUT_S * 2).key_value(bucket)
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return {}
    entries: dict[str, bytes] = {}
    for key in keys:
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:  # deleted meanwhile (a dispatcher stopped)
            continue
        if entry.value:
            entries[key] = entry.value
    return entries
