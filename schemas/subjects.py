"""Every NATS subject, queue group and header name Lifeline uses, in one place."""

import hashlib
import re

# Lifeline owns every subject under this prefix; no client may name one as its reply subject.
NAMESPACE = "llm."

# Clients send chat requests here (core request/reply).
COMPLETE = "llm.complete"
# The same requests, answered with a stream of events on the reply subject (schemas/streaming.py).
STREAM = "llm.stream"
DISPATCHER_QUEUE = "lifeline-dispatchers"
# "Stop my request": a client that gave up on a request (its user left, a stream was closed
# early) publishes the request's abort key (the ABORT_KEY header it sent the request with) here.
# Every dispatcher listens (no queue group); the one running that request stops it, cancels its
# attempts at their workers (HTTP calls included), answers it `aborted` and audits it. The key,
# random and known only to the client and the dispatchers, is what makes a request stoppable:
# a request sent without one cannot be aborted, and an id alone (guessable, echoed in audit
# events) stops nothing.
ABORT = "llm.abort"
ABORT_KEY = "Lifeline-Abort-Key"
# A longer key (or one a request in flight already uses) is accepted, but stops nothing.
MAX_ABORT_KEY_LENGTH = 256

# Durable jobs: the same request body, published through JetStream with its id as Nats-Msg-Id
# (service/jobs.py). A job's result is kept in a JetStream KV bucket under job_key(id), and,
# when the job names one in NOTIFY, published on that subject too.
JOBS_SUBMIT = "llm.jobs.submit"
JOBS_CONSUMER = "lifeline-jobs"  # the durable consumer every dispatcher pulls from
MSG_ID = "Nats-Msg-Id"  # JetStream's deduplication header
NOTIFY = "Lifeline-Notify"
# A job whose handling failed max_deliver times (a bug, not a provider failure: those give an
# error result) is published here, as it was submitted, with the error in JOB_ERROR.
JOBS_DEAD = "llm.jobs.dead"
# A job's result by its id, from a dispatcher (request/reply, body: the id; reply: the stored
# result, or an empty body while there is none): what a client needs no bucket permissions
# for, where a direct get of the bucket would let it read others' results too.
JOBS_RESULT = "llm.jobs.result"
JOBS_RESULT_QUEUE = "lifeline-results"
JOB_ERROR = "Lifeline-Error"
# On a job: a subject its answer is streamed to while it runs, as the events of llm.stream
# (schemas/streaming.py). Core NATS, so only for whoever listens then; the result is stored
# either way. A job delivered again streams again from event 1.
JOB_EVENTS = "Lifeline-Events"

# One subject per provider; the replicas of a provider's worker share its queue group.
PROVIDER_PREFIX = "llm.provider."
# "Stop that attempt": every replica of a provider's worker listens (no queue group), the one
# running the attempt named in the body (its Lifeline-Attempt-Id) cancels it and its HTTP call.
CANCEL_PREFIX = "llm.cancel."
# Every dispatcher connects with this inbox prefix (unless given another): its attempts'
# replies come to <prefix>.<id>.<n> and a streaming attempt's chunks to <prefix>.<id>.<n>.c
# (service/transport.py), so a server can let workers publish chunks there and nowhere else
# (service/permissions.py). Clients' inboxes stay apart, under _INBOX.
DISPATCHER_INBOX_PREFIX = "_LIFELINE_DISPATCHER"
# The NATS service API (ADR-32, service/discovery.py): every dispatcher, worker and HTTP
# gateway answers $SRV.PING, $SRV.INFO and $SRV.STATS, also with .<service> and
# .<service>.<id> after them, where <service> is DISPATCHER_SERVICE, worker_service(provider)
# or GATEWAY_SERVICE. No queue group: every instance answers.
SERVICE_API_PREFIX = "$SRV"
SERVICE_API_VERBS = ("PING", "INFO", "STATS")
DISPATCHER_SERVICE = "lifeline-dispatcher"
GATEWAY_SERVICE = "lifeline-gateway"
WORKER_SERVICE_PREFIX = "lifeline-worker-"
# One audit event per request, on llm.audit.ok or llm.audit.error.
AUDIT_PREFIX = "llm.audit."
AUDIT_ALL = AUDIT_PREFIX + ">"

# W3C trace context travels in NATS headers under its HTTP name.
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# Absolute deadline of an attempt, Unix epoch milliseconds: a worker drops work past it.
DEADLINE_MS = "Lifeline-Deadline-Ms"
REQUEST_ID = "Lifeline-Request-Id"
# Unique per physical attempt (a retry gets a new one); what a cancel message names.
ATTEMPT_ID = "Lifeline-Attempt-Id"
# On a streaming attempt: the subject the worker publishes the answer's text chunks to, in order,
# as bare UTF-8 bodies, before its one ProviderOk | ProviderFailure on the reply subject. A worker
# that does not stream ignores it and answers once.
STREAM_TO = "Lifeline-Stream-To"
# On the events of llm.stream (schemas/streaming.py): the event's number (1, 2, ... per request),
# the attempt it belongs to (1, 2, ... in the order the attempts started), and, on every event but
# a text delta, its kind.
SEQ = "Lifeline-Seq"
ATTEMPT_NO = "Lifeline-Attempt"
EVENT = "Lifeline-Event"
# On an llm.stream request: ask for heartbeat events, an empty one at once and one whenever the
# stream sent nothing for this many milliseconds (schemas/streaming.py), so a client can tell a
# dead dispatcher from a slow model.
HEARTBEAT_MS = "Lifeline-Heartbeat-Ms"


def provider_subject(name: str) -> str:
    return PROVIDER_PREFIX + name


def provider_queue(name: str) -> str:
    return "lifeline-provider-" + name


def cancel_subject(provider: str) -> str:
    return CANCEL_PREFIX + provider


def worker_service(provider: str) -> str:
    """A provider's workers' name in the NATS service API."""
    return WORKER_SERVICE_PREFIX + provider


def service_api_subjects(name: str, instance_id: str) -> list[str]:
    """What one instance of service `name` answers: each verb alone, with its name, and
    with its name and id."""
    return [
        f"{SERVICE_API_PREFIX}.{verb}{suffix}"
        for verb in SERVICE_API_VERBS
        for suffix in ("", f".{name}", f".{name}.{instance_id}")
    ]


def audit_subject(status: str) -> str:
    return AUDIT_PREFIX + status


def job_key(job_id: str) -> str:
    """The results bucket's key for a job id (ids may hold characters keys may not)."""
    return "job." + _digest(job_id)


def job_audit_id(job_id: str, place: str) -> str:
    """A job's audit event's Nats-Msg-Id, by which the audit stream keeps one per job: a hash
    of its id and its place in the jobs stream (the same on each of its deliveries, and on no
    other job: a job of the id run again keeps its own event). A hash, as its key is, since a
    header's value is stripped and rewritten on its way (two ids that differ by a trailing
    space or a line break would share one event). A place holds no line break, so the two are
    told apart where the place starts."""
    return "job:" + _digest(f"{job_id}\n{place}")


def _digest(job_id: str) -> str:
    return hashlib.sha256(job_id.encode()).hexdigest()[:40]


def reply_subject_refused(subject: str, *, chunks: bool = False) -> str | None:
    """Why a client's reply subject may not be answered on, or None when it is fine. With
    `chunks`, a worker's check of the Lifeline-Stream-To a dispatcher gave it, which is in the
    dispatchers' own inbox (no one else's reply subject may be).

    A reply published there would land on Lifeline's own subjects (a second audit event,
    a loop through llm.complete, an answer on the audit feed) or on the server's ($JS, $KV,
    $SYS, $SRV, ...). Wildcards cannot name one inbox, nor can a subject with an empty token
    reach any subscriber. Whitespace or a control character
    cannot be in a subject at all: written into a PUB line, it is a protocol error for which
    the server closes the publisher's connection (a header can carry one; a message's own
    reply subject cannot).
    """
    # Printable ASCII without a space has none of what _NOT_A_SUBJECT finds, and is told
    # without the regex (a third of this check's cost; it runs for every request).
    plain = subject.isascii() and subject.isprintable() and " " not in subject
    if not subject or (not plain and _NOT_A_SUBJECT.search(subject)):
        return (
            "it is empty or has whitespace, a control character or bytes that are not UTF-8, "
            "which no subject may"
        )
    if (
        len(subject) > MAX_REPLY_SUBJECT_BYTES // 4
        and len(subject.encode()) > MAX_REPLY_SUBJECT_BYTES
    ):
        # Published to, it makes a protocol line longer than the server takes (4 KiB by
        # default: max_control_line), and the server closes the publisher's connection.
        return f"it is over {MAX_REPLY_SUBJECT_BYTES} bytes long"
    if subject.startswith(_REFUSED_STARTS):
        if subject.startswith(NAMESPACE):
            return f"it is inside Lifeline's own namespace ({NAMESPACE}>)"
        if subject.startswith("$"):
            return "it is one of the NATS server's own subjects ($...)"
        if not chunks:
            return f"it is inside the dispatchers' own inbox ({DISPATCHER_INBOX_PREFIX}>)"
    if ("*" in subject or ">" in subject) and any(t in ("*", ">") for t in subject.split(".")):
        return "it contains a wildcard"
    if subject[0] == "." or subject[-1] == "." or ".." in subject:
        return (
            "it has an empty token (a dot at its start or end, or two in a row), which no "
            "subscription can match"
        )
    return None


# Longer reply subjects are refused: with its headers' size and its own, a publish to one must
# fit nats-server's max_control_line (4 KiB by default).
MAX_REPLY_SUBJECT_BYTES = 1024
_NOT_A_SUBJECT = re.compile(r"[\x00-\x20\x7f\ud800-\udfff]")  # surrogates: bytes not UTF-8
_REFUSED_STARTS = (NAMESPACE, "$", DISPATCHER_INBOX_PREFIX)


# Clients and operators of a least-privilege setup (service/permissions.py) connect with inbox
# prefix _INBOX.<user> (nats-py's inbox_prefix, --nats-inbox-prefix, [nats] inbox_prefix,
# $NATS_INBOX_PREFIX).
INBOX_ROOT = "_INBOX"


def client_inbox(user: str) -> str:
    """The inbox prefix a client or operator user connects with."""
    return f"{INBOX_ROOT}.{user}"
