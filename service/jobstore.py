"""The jobs stream and the results bucket, shaped in one place: dispatchers make them
(service/jobs.py), and so do `lifeline submit` and the Python client (service/client.py)
when no dispatcher has yet, so a job can wait for one. Imports NATS, the wire and
service.jetstream only."""

from __future__ import annotations

import logging
from typing import Any, Protocol

import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from schemas import subjects
from service import jetstream

log = logging.getLogger("lifeline.jobs")


class JobsShape(Protocol):
    """What the stream and bucket are made from (service.config.JobsSettings has it)."""

    @property
    def stream(self) -> str: ...
    @property
    def max_jobs(self) -> int: ...
    @property
    def dedup_window_s(self) -> float: ...
    @property
    def results_bucket(self) -> str: ...
    @property
    def results_ttl_s(self) -> float: ...


async def ensure_jobs(js: JetStreamContext, settings: JobsShape, replicas: int = 1) -> KeyValue:
    """The jobs stream and the results bucket, created when missing (dispatchers and
    `lifeline submit` both call it, so a job can be published before any dispatcher runs),
    each kept on `replicas` servers of a cluster."""
    config = api.StreamConfig(
        name=settings.stream,
        subjects=[subjects.JOBS_SUBMIT],
        retention=api.RetentionPolicy.WORK_QUEUE,
        discard=api.DiscardPolicy.NEW,
        max_msgs=settings.max_jobs,
        duplicate_window=settings.dedup_window_s,
        num_replicas=replicas,
        description="Lifeline jobs waiting for a dispatcher",
    )
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError as exc:
        if not jetstream.exists_already(exc):  # not enough servers for the replicas, ...
            raise
        log.info("jobs stream %s exists with other settings; using it as it is", settings.stream)
        # ... once looked at: a warning for what loses jobs, an UnfitStream if it takes none
        await jetstream.look_at_existing(
            js, settings.stream, subjects.JOBS_SUBMIT, log, jobs=True, wanted=config
        )
    try:
        found = await js.key_value(settings.results_bucket)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(
            bucket=settings.results_bucket,
            history=1,
            ttl=settings.results_ttl_s,
            replicas=replicas,
            description="Lifeline job results, by job id",
            # Reads by key ($JS.API.DIRECT.GET.<stream>.<key>), never by sequence: a
            # least-privilege client may read the result of a job whose id it knows, and only
            # that (service/permissions.py).
            direct=True,
        )
    await jetstream.look_at_bucket(js, settings.results_bucket, replicas, log)
    return found


async def ensure_jobs_as_a_client(js: JetStreamContext, settings: JobsShape, replicas: int) -> None:
    """The jobs stream and results bucket made as a dispatcher makes them when there is no jobs
    stream yet (no dispatcher ran); one that exists is used as it is: a least-privilege client
    may look at it (its INFO), not make it."""
    try:
        await js.stream_info(settings.stream)
    except nats.js.errors.NotFoundError:
        await ensure_jobs(js, settings, replicas)


async def results_max_value(js: JetStreamContext, settings: JobsShape) -> int | None:
    """The largest value the results bucket takes (its stream's max_msg_size, which counts a
    write's headers too), or None when it has no limit of its own: one an operator made may
    have one (`max_value_size`), and a result over it is refused however often it is tried."""
    return max_value_of(await js.stream_info(f"KV_{settings.results_bucket}"))


def max_value_of(info: Any) -> int | None:
    """`results_max_value` of the bucket's stream info, read already."""
    size = info.config.max_msg_size
    return size if size is not None and size > 0 else None
