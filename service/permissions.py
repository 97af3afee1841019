"""Least privilege on NATS: nats-server users for Lifeline's five roles, and what each may do.

Built from the subject names in schemas/subjects.py and a config's providers, streams and
buckets, so the server's permissions change with the code (`lifeline nats-config` prints
them; regenerate the file when the config's providers, streams or buckets change).

    clients      publish requests (llm.complete, llm.stream, llm.jobs.submit) and aborts
                 (llm.abort), and read a job's result by its id; receive only on their own
                 inbox prefix, _INBOX.<user>
    dispatchers  take requests and jobs, call workers, cancel attempts, answer clients (on
                 _INBOX.>), publish audit events, keep the jobs, results, audit and health
                 streams and buckets; their own inbox prefix is _LIFELINE_DISPATCHER
                 (they may publish there too: the trace of their start-up check)
    workers      one user per provider: take llm.provider.<name> (in its queue group) and
                 llm.cancel.<name>, answer each request once through response permissions,
                 and publish a stream's chunks to a dispatcher's inbox (<prefix>.*.*.c) only
    gateways     the HTTP gateways (only those named): a client's requests and aborts (no
                 jobs), answers on their own inbox prefix, _INBOX.<user> (publishing there
                 too: the trace of their start-up check); and their $SRV subjects
                 (discovery), each request answered once
    operators    read the audit stream and the live audit events, the health bucket, and ask
                 the NATS service API ($SRV: discovery, figures); receive the dead letters
                 (llm.jobs.dead) and on _INBOX.<user>

JetStream is reached through its API subjects, and what a role may do is the list of those it
may publish: a stream's INFO and CREATE, a consumer's CREATE (which also names where it
delivers, so only roles that may read a whole stream get it), a key's direct get. A client
has no access to the results bucket (its stream's info lists every key): it asks a dispatcher
on llm.jobs.result for the id it knows (ids from `lifeline submit` are random), and no client
may list, watch or read by sequence; operators may read the bucket. Nothing here connects to
NATS: it is names in, text out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from schemas import subjects
from schemas.subjects import INBOX_ROOT, client_inbox
from service.config import Config
from service.embedded import MAX_PENDING

CLIENT = "client"
DISPATCHER = "dispatcher"
WORKER = "worker"
GATEWAY = "gateway"
OPERATOR = "operator"
ROLES = (CLIENT, DISPATCHER, WORKER, GATEWAY, OPERATOR)

DISPATCHER_USER = "dispatcher"
WORKER_USER_PREFIX = "worker-"
DEFAULT_CLIENTS = ("client",)
DEFAULT_OPERATORS = ("operator",)

# Clients and operators connect with inbox prefix _INBOX.<user> (schemas.subjects.client_inbox):
# each may subscribe there and nowhere else, and the dispatchers answer under _INBOX.>.
# What a worker publishes a streaming attempt's chunks to: the Lifeline-Stream-To a dispatcher
# sets, <its inbox prefix>.<connection id>.<attempt token>.c (service/transport.py's _Inbox).
STREAM_CHUNKS = subjects.DISPATCHER_INBOX_PREFIX + ".*.*.c"
# How long after a request a worker may still answer it, beyond its provider's timeout_s.
RESPONSE_GRACE_S = 60
# How long a gateway may take to answer a $SRV request (it answers at once).
SERVICE_API_RESPONSE_S = 10

_JS = "$JS.API"
_USER = re.compile(r"^[A-Za-z0-9_-]+(?!\n)$")


@dataclass(frozen=True)
class Responses:
    """nats-server's allow_responses: answer each request received, at most `max_msgs` times,
    within `expires_s` of receiving it."""

    max_msgs: int = 1
    expires_s: int = 120


@dataclass(frozen=True)
class User:
    name: str
    role: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]  # "subject" or "subject queue-group"
    responses: Responses | None = None
    inbox_prefix: str | None = None  # what the user must connect with; None: nats-py's own
    provider: str | None = None  # a worker's

    @property
    def password_env(self) -> str:
        """The environment variable nats-server reads this user's password from."""
        return password_env(self.name)


def password_env(user: str) -> str:
    return "LIFELINE_" + re.sub(r"[^A-Za-z0-9]", "_", user).upper() + "_PASSWORD"


def worker_user(provider: str) -> str:
    return WORKER_USER_PREFIX + provider


# ---- JetStream API subjects ---------------------------------------------------------------


def _kv_stream(bucket: str) -> str:
    return "KV_" + bucket


def _stream_keeper(stream: str) -> list[str]:
    """Make a stream when missing, and look at it."""
    return [f"{_JS}.STREAM.CREATE.{stream}", f"{_JS}.STREAM.INFO.{stream}"]


def _bucket_keeper(bucket: str) -> list[str]:
    """Make a bucket when missing, bind to it (its stream's info), put and get any key."""
    stream = _kv_stream(bucket)
    return [
        *_stream_keeper(stream),
        f"$KV.{bucket}.>",
        f"{_JS}.DIRECT.GET.{stream}.>",
        f"{_JS}.STREAM.MSG.GET.{stream}",  # a bucket made without direct gets
    ]


def _stream_reader(stream: str) -> list[str]:
    """Read a whole stream through ordered consumers (nats-py's KV watch and keys): its info,
    a consumer, and the flow-control answers."""
    return [
        f"{_JS}.STREAM.INFO.{stream}",
        f"{_JS}.CONSUMER.CREATE.{stream}",
        f"{_JS}.CONSUMER.INFO.{stream}.*",  # an ordered consumer checks on itself
        f"$JS.FC.{stream}.>",
    ]


def _audit_reader(stream: str) -> list[str]:
    """Read the audit stream through ephemeral pull consumers (`lifeline audit`,
    service/audit.py's _Reader): its info, a consumer (nats-py names it, filtered on
    llm.audit.>), and its fetches."""
    return [
        f"{_JS}.STREAM.INFO.{stream}",
        f"{_JS}.CONSUMER.CREATE.{stream}.>",
        f"{_JS}.CONSUMER.MSG.NEXT.{stream}.*",
    ]


def _jobs_puller(stream: str, consumer: str) -> list[str]:
    """Pull jobs from the durable consumer every dispatcher shares, and acknowledge them."""
    return [
        f"{_JS}.STREAM.NAMES",  # nats-py's pull_subscribe looks the stream up by subject
        f"{_JS}.CONSUMER.INFO.{stream}.{consumer}",
        f"{_JS}.CONSUMER.CREATE.{stream}.{consumer}",
        f"{_JS}.CONSUMER.CREATE.{stream}.{consumer}.>",
        f"{_JS}.CONSUMER.DURABLE.CREATE.{stream}.{consumer}",
        f"{_JS}.CONSUMER.MSG.NEXT.{stream}.{consumer}",
        f"$JS.ACK.{stream}.{consumer}.>",
    ]


def _service_api(name: str) -> list[str]:
    """What one component answers of the NATS service API (service/discovery.py)."""
    prefix = subjects.SERVICE_API_PREFIX
    return [
        f"{prefix}.{verb}{suffix}"
        for verb in subjects.SERVICE_API_VERBS
        for suffix in ("", f".{name}", f".{name}.*")
    ]


# ---- the roles ----------------------------------------------------------------------------


def dispatcher(config: Config) -> User:
    """Every dispatcher replica connects as this one user."""
    jobs, audit = config.jobs, config.audit
    publish = [
        subjects.PROVIDER_PREFIX + ">",  # every provider: a request may name any target
        subjects.CANCEL_PREFIX + ">",
        subjects.AUDIT_ALL,
        subjects.JOBS_DEAD,
        f"{INBOX_ROOT}.>",  # replies, stream events, Lifeline-Notify and -Events to clients
        # Its own inbox: where the trace of its start-up check of these rights goes
        # (service/app.py's must_be_allowed_to_publish); only dispatchers listen there.
        subjects.DISPATCHER_INBOX_PREFIX + ".>",
        *_stream_keeper(jobs.stream),
        *_jobs_puller(jobs.stream, subjects.JOBS_CONSUMER),
        *_bucket_keeper(jobs.results_bucket),
        # A job's claim purged as it ends (service/jobs.py's _unclaim): no more than its
        # $KV.<bucket>.> rights allow already (a Nats-Rollup: all write empties the bucket).
        f"{_JS}.STREAM.PURGE.{_kv_stream(jobs.results_bucket)}",
    ]
    if audit.stream:
        publish += _stream_keeper(audit.stream)
    if config.dispatcher.shared_health:
        health = config.dispatcher.health_bucket
        publish += _bucket_keeper(health)
        publish += _stream_reader(_kv_stream(health))  # it watches the breakers
    return User(
        DISPATCHER_USER,
        DISPATCHER,
        publish=_unique(publish),
        subscribe=(
            f"{subjects.COMPLETE} {subjects.DISPATCHER_QUEUE}",
            f"{subjects.STREAM} {subjects.DISPATCHER_QUEUE}",
            f"{subjects.JOBS_RESULT} {subjects.JOBS_RESULT_QUEUE}",
            subjects.ABORT,
            subjects.DISPATCHER_INBOX_PREFIX + ".>",
            *_service_api(subjects.DISPATCHER_SERVICE),
        ),
        inbox_prefix=subjects.DISPATCHER_INBOX_PREFIX,
    )


def worker(provider: str, timeout_s: float) -> User:
    """The user every replica of one provider's worker connects as."""
    return User(
        worker_user(provider),
        WORKER,
        publish=(STREAM_CHUNKS,),
        subscribe=(
            f"{subjects.provider_subject(provider)} {subjects.provider_queue(provider)}",
            subjects.cancel_subject(provider),
            *_service_api(subjects.worker_service(provider)),
        ),
        responses=Responses(1, math.ceil(timeout_s) + RESPONSE_GRACE_S),
        provider=provider,
    )


def gateway(name: str) -> User:
    """The HTTP gateway (`lifeline gateway`; every replica of one deployment shares a user):
    it sends requests and aborts as a client does (no jobs), and answers the service API."""
    return User(
        name,
        GATEWAY,
        # And its own inbox, where only it listens: the trace of its start-up check of these
        # rights goes there (service/app.py's must_be_allowed_to_publish).
        publish=(subjects.COMPLETE, subjects.STREAM, subjects.ABORT, client_inbox(name) + ".>"),
        subscribe=(client_inbox(name) + ".>", *_service_api(subjects.GATEWAY_SERVICE)),
        responses=Responses(1, SERVICE_API_RESPONSE_S),  # to $SRV requests, its only ones
        inbox_prefix=client_inbox(name),
    )


def client(name: str, config: Config) -> User:
    # No access to the results bucket itself: its stream's info lists every key, and a direct
    # get of job.* (permissions cannot tell a literal * from a wildcard) answers the newest
    # result of anyone's job. A dispatcher answers llm.jobs.result for the id it is sent.
    return User(
        name,
        CLIENT,
        publish=(
            subjects.COMPLETE,
            subjects.STREAM,
            subjects.ABORT,
            subjects.JOBS_SUBMIT,
            subjects.JOBS_RESULT,
            f"{_JS}.STREAM.INFO.{config.jobs.stream}",  # the Python client's check before a job
        ),
        subscribe=(client_inbox(name) + ".>",),
        inbox_prefix=client_inbox(name),
    )


def operator(name: str, config: Config) -> User:
    publish = [f"{subjects.SERVICE_API_PREFIX}.>"]  # discovery: `nats micro ls`, figures
    # Any job's result (`lifeline result`): asked of a dispatcher, else read in the bucket.
    results = _kv_stream(config.jobs.results_bucket)
    publish += [
        subjects.JOBS_RESULT,
        f"{_JS}.STREAM.INFO.{results}",
        f"{_JS}.DIRECT.GET.{results}.>",
        f"{_JS}.STREAM.MSG.GET.{results}",  # a bucket made without direct gets
    ]
    if config.audit.stream:
        publish += _audit_reader(config.audit.stream)
    if config.dispatcher.shared_health:
        health = _kv_stream(config.dispatcher.health_bucket)
        publish += [*_stream_reader(health), f"{_JS}.DIRECT.GET.{health}.>"]
        publish.append(f"{_JS}.STREAM.MSG.GET.{health}")  # a bucket made without direct gets
    return User(
        name,
        OPERATOR,
        publish=_unique(publish),
        # The dead letters too (jobs given up on, as submitted): no other role may receive
        # them, so without this one what is published on llm.jobs.dead reaches nobody.
        subscribe=(client_inbox(name) + ".>", subjects.AUDIT_ALL, subjects.JOBS_DEAD),
        inbox_prefix=client_inbox(name),
    )


def users(
    config: Config,
    clients: Sequence[str] = DEFAULT_CLIENTS,
    operators: Sequence[str] = DEFAULT_OPERATORS,
    gateways: Sequence[str] = (),
) -> list[User]:
    """Every user: the dispatchers', one per provider's workers, the gateways' (none unless
    named: nats-server wants every user's password), the operators' and the clients'.
    ValueError when a name is unusable or taken twice."""
    found = [dispatcher(config)]
    found += [worker(name, p.timeout_s) for name, p in config.providers.items()]
    found += [gateway(name) for name in gateways]
    found += [operator(name, config) for name in operators]
    found += [client(name, config) for name in clients]
    seen: dict[str, str] = {}
    for user in found:
        if not _USER.match(user.name):
            raise ValueError(
                f"user name {user.name!r}: use only letters, digits, '_' and '-' (it is an "
                "inbox subject token and part of an environment variable's name)"
            )
        for key in (user.name, user.password_env):
            if key in seen:
                raise ValueError(
                    f"{user.role} {user.name!r} and {seen[key]} would share {key!r}: "
                    "choose other names"
                )
            seen[key] = f"{user.role} {user.name!r}"
    return found


# ---- nats-server's configuration ------------------------------------------------------------


def render(found: Iterable[User], source: str = "") -> str:
    """The nats-server configuration: JetStream on, and one user per entry, each with its
    password taken from an environment variable when the server starts."""
    found = list(found)
    # A path is any characters: a line break in it would end the comment, and what follows
    # would be the server's configuration (no_auth_user: dispatcher, say).
    source = source.encode("unicode_escape").decode("ascii") if not source.isprintable() else source
    lines = [
        "# Lifeline: least-privilege users for nats-server, generated by `lifeline nats-config`",
        f"# from schemas/subjects.py{' and ' + source if source else ''}. Regenerate it when",
        "# providers, clients, streams or buckets change, rather than editing it.",
        "#",
        "# Each process connects as its user: NATS_USER and NATS_PASSWORD (or --nats-user and",
        "# --nats-password, or [nats] user and password_env); clients and operators also with",
        "# their inbox prefix (--nats-inbox-prefix, [nats] inbox_prefix, NATS_INBOX_PREFIX).",
        "# nats-server reads each password from an environment variable when it starts, and",
        "# refuses to start when one is unset; use letters and digits, starting with a letter:",
    ]
    width = max(len(u.password_env) for u in found)
    for user in found:
        how = f", inbox prefix {user.inbox_prefix}" if user.inbox_prefix else ""
        if user.role == DISPATCHER:
            how += " (its default)"
        lines.append(f"#   {user.password_env:<{width}}  {user.name}: {user.role}{how}")
    lines += [
        "",
        "jetstream: enabled",
        "",
        "# How far one client (a dispatcher, a worker) may fall behind before the server closes",
        "# it as a slow consumer and drops every message it held for it. nats-server's default,",
        "# 64MB, is a burst of about 70 requests near max_payload (1MB).",
        f"max_pending: {MAX_PENDING}",
        "",
        "authorization {",
        "  users = [",
    ]
    for user in found:
        lines += _user_block(user)
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def server_config(
    config: Config,
    clients: Sequence[str] = DEFAULT_CLIENTS,
    operators: Sequence[str] = DEFAULT_OPERATORS,
    gateways: Sequence[str] = (),
) -> str:
    return render(users(config, clients, operators, gateways), config.source)


_WHO = {
    DISPATCHER: "every dispatcher replica (lifeline dispatcher)",
    WORKER: "every replica of this provider's worker (lifeline worker {provider})",
    GATEWAY: "an HTTP gateway, every replica (lifeline gateway)",
    OPERATOR: "an operator (lifeline status, audit, health; nats micro ls)",
    CLIENT: "a client (lifeline ask, submit, result; the Python client)",
}


def _user_block(user: User) -> list[str]:
    block = [
        f"    # {_WHO[user.role].format(provider=user.provider)}",
        "    {",
        f"      user: {_quote(user.name)}",
        f"      password: ${user.password_env}",
        "      permissions: {",
        f"        publish: {{allow: {_list(user.publish, 10)}}}",
        f"        subscribe: {{allow: {_list(user.subscribe, 10)}}}",
    ]
    if user.responses is not None:
        block.append(
            f"        allow_responses: {{max: {user.responses.max_msgs}, "
            f'expires: "{user.responses.expires_s}s"}}'
        )
    block += ["      }", "    }"]
    return block


def _list(items: Sequence[str], indent: int) -> str:
    pad = " " * indent
    return "[\n" + ",\n".join(f"{pad}  {_quote(s)}" for s in items) + f"\n{pad}]"


def _quote(text: str) -> str:
    """A quoted string ($ would otherwise start a variable reference)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))
