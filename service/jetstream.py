"""JetStream's refusals Lifeline tells apart, and what to tell an operator about them.

The jobs stream and results bucket (service/jobstore.py), the audit stream (service/audit.py)
and the shared health bucket (service/shared_health.py) are made when missing, by whichever
process comes first; each says the same thing when JetStream will not make or serve them.
Imports nats-py's errors and nothing of Lifeline's.
"""

from __future__ import annotations

import nats.js.errors

# JetStream's error codes (an APIError's err_code), from nats-server's errors.json.
STREAM_NAME_IN_USE = 10058  # a stream of that name exists, with another configuration
NO_SUITABLE_PEERS = 10005  # fewer servers up than the replicas asked for
REPLICAS_NEED_CLUSTER = 10074  # replicas above 1 asked of a server not in a cluster
SUBJECTS_OVERLAP = 10065  # another stream already captures (some of) the subjects


def exists_already(exc: BaseException) -> bool:
    """Whether making a stream failed only because one of that name exists (with settings an
    operator may have chosen: they stand)."""
    return getattr(exc, "err_code", None) == STREAM_NAME_IN_USE


def hint(exc: BaseException, replicas: int) -> str:
    """`exc`, from making or reaching a stream or bucket, with what to do about it."""
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
    if isinstance(exc, TimeoutError):  # nats-py's TimeoutError is one too
        return (
            f"{what}; no answer in time: is JetStream on (nats-server -js)? May this NATS user "
            "use this stream or bucket (under `lifeline nats-config`, a client may not read the "
            "results bucket or the audit stream)? On a cluster, are enough servers up?"
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
