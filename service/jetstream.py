"""JetStream's refusals Lifeline tells apart, and what to tell an operator about them.

The jobs stream and results bucket (service/jobstore.py), the audit stream (service/audit.py)
and the shared health bucket (service/shared_health.py) are made when missing, by whichever
process comes first; each says the same thing when JetStream will not make or serve them.
A stream of Lifeline's name that exists already (an operator's) is used as it is, once it has
been looked at: settings that would lose jobs or audit events are logged as a warning, once
per stream made, and a jobs stream that does not capture the jobs' subject is refused.
Imports nats-py and nothing of Lifeline's.
"""

from __future__ import annotations

import logging
from datetime import datetime

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from service.natsio import PublishRefused

# JetStream's error codes (an APIError's err_code), from nats-server's errors.json.
STREAM_NAME_IN_USE = 10058  # a stream of that name exists, with another configuration
NO_SUITABLE_PEERS = 10005  # fewer servers up than the replicas asked for
REPLICAS_NEED_CLUSTER = 10074  # replicas above 1 asked of a server not in a cluster
SUBJECTS_OVERLAP = 10065  # another stream already captures (some of) the subjects
INSUFFICIENT_RESOURCES = 10023  # JetStream's store (the server's or the account's) is full
MAX_STREAMS = 10027  # the account may have no more streams
INSUFFICIENT_STORAGE = 10047  # a stream's max_bytes does not fit the storage left
INSUFFICIENT_MEMORY = 10028  # the same for a stream kept in memory
STORE_FAILED = 10077  # a stream's store refused a message (at its own maximum, say)
MESSAGE_TOO_LARGE = 10054  # a message over the stream's (or bucket's) max_msg_size

# What JetStream answers while a stream or bucket is briefly out of reach (a cluster electing
# its leader after a node died, the connection reconnecting): worth trying again, after each of
# BACKOFF_S in turn (then its last). Other errors are not waited out.
UNREACHABLE = (
    TimeoutError,  # nats-py's own TimeoutError is one too
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)
BACKOFF_S = (0.1, 0.25, 0.5, 1.0)

# The streams Lifeline makes: the jobs stream, the results bucket, the audit stream and the
# shared health bucket (a bucket is a stream too).
STREAMS_NEEDED = 4


class UnfitStream(nats.js.errors.Error):
    """A stream of Lifeline's name exists, made so that Lifeline cannot work with it; the
    description says what to do."""


def exists_already(exc: BaseException) -> bool:
    """Whether making a stream failed only because one of that name exists (with settings an
    operator may have chosen: they stand)."""
    return getattr(exc, "err_code", None) == STREAM_NAME_IN_USE


def hint(exc: BaseException, replicas: int) -> str:
    """`exc`, from making or reaching a stream or bucket, with what to do about it."""
    if isinstance(exc, UnfitStream):
        return str(exc.description)
    if isinstance(exc, PublishRefused):  # its user's role: nothing JetStream can change
        return _said(exc)
    what = _said(exc)
    code = getattr(exc, "err_code", None)
    if code == NO_SUITABLE_PEERS:
        return (
            f"{what}; fewer JetStream servers are up than jetstream.replicas ({replicas}) "
            "asks for: start the others, or lower it"
        )
    if code == REPLICAS_NEED_CLUSTER:
        return (
            f"{what}; jetstream.replicas ({replicas}) above 1 needs a NATS cluster: set it to "
            "1 for a single server"
        )
    if code == SUBJECTS_OVERLAP:
        return (
            f"{what}; another stream already takes these subjects: remove it, or name that "
            "stream in the config (audit.stream, jobs.stream)"
        )
    if code == INSUFFICIENT_STORAGE:
        return (
            f"{what}; JetStream has less storage than this stream's limits reserve, and "
            "waiting does not change that: lower audit.max_bytes (1 GiB by default), or the "
            "limits of a stream or bucket made beforehand, or raise the server's jetstream "
            "max_file_store (max_memory_store) or the account's JetStream limit (max_file, "
            "max_mem)"
        )
    if code == MAX_STREAMS:
        return (
            f"{what}; the account may have no more streams: Lifeline needs {STREAMS_NEEDED} "
            "(the jobs stream, the results bucket, the audit stream and the shared health "
            'bucket; fewer with jobs.enabled = false, audit.stream = "" or '
            "dispatcher.shared_health = false): raise the account's JetStream max_streams, or "
            "delete streams it no longer needs"
        )
    if code == INSUFFICIENT_RESOURCES:
        return (
            f"{what}; JetStream's store is full (the server's max_file_store or "
            "max_memory_store, or the account's JetStream limit): make room (purge or delete "
            "streams, lower audit.max_bytes) or raise that limit"
        )
    if code == STORE_FAILED:
        return (
            f"{what}; the stream or bucket is at one of its own limits (the jobs stream holds "
            "jobs.max_jobs waiting jobs at most): wait for dispatchers to take some, or raise "
            "the limit"
        )
    if code == MESSAGE_TOO_LARGE:
        return (
            f"{what}; the message is over the max_msg_size of the stream or bucket it went to "
            "(one made beforehand with that limit): raise its max_msg_size, or delete it so "
            "that Lifeline makes it without one"
        )
    if isinstance(exc, nats.js.errors.NoStreamResponseError) or (
        isinstance(exc, nats.js.errors.NotFoundError) and code is None
    ):  # nats-py's own, when no stream captures the subject published or subscribed on
        return (
            f"{what}; no stream captures this subject: is JetStream on (nats-server -js)? Was "
            "a stream of the configured name (jobs.stream, audit.stream) made beforehand on "
            "other subjects? Delete it so that Lifeline makes it, or add the subject to it"
        )
    if isinstance(exc, TimeoutError):  # nats-py's TimeoutError is one too
        return (
            f"{what}; no answer in time: is JetStream on (nats-server -js)? May this NATS user "
            "use this stream or bucket (under `lifeline nats-config`, a client may not read the "
            "results bucket or the audit stream)? On a cluster, are enough servers up? Is "
            'the server\'s disk full (its log says "no space left on device"; it may answer no '
            "write until restarted once there is room)?"
        )
    return (
        f"{what}; is JetStream on (nats-server -js), and, on a cluster, are enough of its "
        "servers up to elect leaders?"
    )


def _said(exc: BaseException) -> str:
    """What went wrong, in a line: an API error's own description (nats-py's str() of one is
    "nats: BadRequestError: code=400 err_code=10005 description='...'", or "description='None'")."""
    if isinstance(exc, nats.js.errors.APIError):
        return f"{type(exc).__name__}: {exc.description}" if exc.description else type(exc).__name__
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


# What was warned about already, by (stream, when it was made, warning): a stream is looked at
# again on every try to set jobs up (every 2 s while the results bucket cannot be made) and
# each time it is made again; a warning is worth a line once per stream made.
_warned: set[tuple[str, datetime | None, str]] = set()
_WARNED_MAX = 1000  # an operator making streams by the thousand gets some warnings again


def covers(pattern: str, subject: str) -> bool:
    """Whether every subject `subject` stands for (it may hold wildcards) matches `pattern`."""
    want, have = pattern.split("."), subject.split(".")
    for n, token in enumerate(want):
        if token == ">":
            return len(have) > n
        if n >= len(have) or have[n] == ">" or (token != "*" and token != have[n]):
            return False
    return len(want) == len(have)


def _limited(config: api.StreamConfig) -> bool:
    """Whether the stream has a limit of messages or bytes (one past which it discards)."""
    limits = (config.max_msgs, config.max_bytes, config.max_msgs_per_subject)
    return any(limit is not None and limit > 0 for limit in limits)


def _too_small(config: api.StreamConfig, max_payload: int | None) -> str | None:
    if max_payload and config.max_msg_size is not None and 0 < config.max_msg_size < max_payload:
        return (
            f"takes messages of at most {config.max_msg_size} bytes (max_msg_size), below the "
            f"server's max_payload ({max_payload})"
        )
    return None


def jobs_stream_problems(info: api.StreamInfo, subject: str, max_payload: int | None) -> list[str]:
    """What in an existing jobs stream loses jobs or refuses them, each with what to do.
    Raises UnfitStream when it does not capture `subject`: no job could be taken."""
    config, name = info.config, info.config.name
    if not any(covers(pattern, subject) for pattern in config.subjects or ()):
        raise UnfitStream(
            f"stream {name} exists but does not capture {subject} (its subjects: "
            f"{', '.join(config.subjects or ()) or 'none'}): no job can be submitted or taken; "
            f"delete it (nats stream rm {name}) so that Lifeline makes it, or add {subject} to "
            "its subjects, or name another stream in jobs.stream"
        )
    said = []
    if config.discard != api.DiscardPolicy.NEW and _limited(config):
        said.append(
            f"{name} discards old messages once full (max_msgs, max_bytes): accepted jobs can "
            "be dropped unanswered; delete the stream so that Lifeline makes it, or set "
            "discard=new"
        )
    if config.retention != api.RetentionPolicy.WORK_QUEUE:
        loses = (
            "a job published while no dispatcher has its consumer is dropped"
            if config.retention == api.RetentionPolicy.INTEREST
            else "answered jobs stay in it, filling it up"
        )
        retention = getattr(config.retention, "value", config.retention)
        said.append(
            f"{name} keeps messages by {retention} retention, not as a work queue: {loses}; "
            "delete the stream so that Lifeline makes it"
        )
    if small := _too_small(config, max_payload):
        said.append(
            f"{name} {small}: larger jobs are refused; delete the stream so that Lifeline "
            "makes it, or raise its max_msg_size"
        )
    return said


def audit_stream_problems(info: api.StreamInfo, subject: str, max_payload: int | None) -> list[str]:
    """What in an existing audit stream keeps audit events from it, each with what to do."""
    config, name = info.config, info.config.name
    said = []
    if not any(covers(pattern, subject) for pattern in config.subjects or ()):
        said.append(
            f"{name} captures {', '.join(config.subjects or ()) or 'nothing'}, not all of "
            f"the audit events' subjects ({subject}): the others are not kept; delete the "
            f"stream so that Lifeline makes it, or make its subjects cover {subject}"
        )
    if config.discard == api.DiscardPolicy.NEW and _limited(config):
        said.append(
            f"{name} discards new messages once full (max_msgs, max_bytes): audit events are "
            "lost from then on; delete the stream so that Lifeline makes it, or set "
            "discard=old"
        )
    if small := _too_small(config, max_payload):
        said.append(
            f"{name} {small}: larger audit events are not kept; delete the stream so that "
            "Lifeline makes it, or raise its max_msg_size"
        )
    return said


# The limits a config sets on a stream Lifeline makes, as a StreamConfig names them.
_LIMITS = ("max_age", "max_bytes", "max_msgs", "duplicate_window")


def _other_limits(have: api.StreamConfig, wanted: api.StreamConfig) -> str | None:
    """The config's limits a stream made earlier does not have (an older config, another
    version's defaults, an operator's hand), or None."""
    differ = [
        f"{limit} {getattr(have, limit)} (the config's: {getattr(wanted, limit)})"
        for limit in _LIMITS
        if getattr(wanted, limit) not in (None, 0, -1)
        and getattr(have, limit) != getattr(wanted, limit)
    ]
    # Fewer copies than jetstream.replicas asks: losing its one server loses what it holds.
    # (More is an operator's `nats stream edit`, and loses nothing.)
    if (have.num_replicas or 1) < (wanted.num_replicas or 1):
        differ.append(f"num_replicas {have.num_replicas} (the config's: {wanted.num_replicas})")
    if not differ:
        return None
    return (
        f"{have.name} was made with other limits than the config's: {', '.join(differ)}; it "
        f"keeps its own until edited (nats stream edit {have.name}) or deleted, so that "
        "Lifeline makes it anew"
    )


async def look_at_existing(
    js: JetStreamContext,
    name: str,
    subject: str,
    log: logging.Logger,
    jobs: bool,
    wanted: api.StreamConfig | None = None,
) -> None:
    """Look at the stream `name` that exists already (an operator's, perhaps) and warn, once
    per stream made, about what in it loses messages on `subject`: the jobs stream's
    (jobs_stream_problems, which raises UnfitStream) or the audit stream's."""
    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        return  # gone since: made again by the next try
    nc = getattr(js, "_nc", None)  # the connection's max_payload, where nats-py keeps it
    max_payload = getattr(nc, "max_payload", None)
    problems = (jobs_stream_problems if jobs else audit_stream_problems)(info, subject, max_payload)
    if wanted is not None and (other := _other_limits(info.config, wanted)):
        problems.append(other)
    for problem in problems:
        _warn_once(log, name, info.created, problem)


def _warn_once(log: logging.Logger, name: str, created: datetime | None, problem: str) -> None:
    key = (name, created, problem)
    if key in _warned:
        return
    if len(_warned) >= _WARNED_MAX:
        _warned.clear()
    _warned.add(key)
    log.warning("%s (the stream existed already, made otherwise; used as it is)", problem)


async def look_at_bucket(
    js: JetStreamContext, bucket: str, replicas: int, log: logging.Logger
) -> None:
    """Warn, once per bucket made, when the bucket that exists already is kept on fewer
    servers than jetstream.replicas asks (made before it was raised): a bucket found is used
    as it is, and losing its one server loses what it holds."""
    name = f"KV_{bucket}"
    try:
        info = await js.stream_info(name)
    except Exception as exc:  # noqa: BLE001 - gone since, or not ours to look at: a look only
        log.debug("could not look at bucket %s: %r", bucket, exc)
        return
    wanted = api.StreamConfig(name=name, num_replicas=replicas)
    if (other := _other_limits(info.config, wanted)) is not None:
        _warn_once(log, name, info.created, other)
