"""The TOML config: read once at start-up, validated, errors naming the bad key.

    [dispatcher]            optional: request limits, max_attempts, allow_fault_injection
    [providers.<name>]      one per provider worker; `kind` picks the provider module, `models`
                            (optional) the only models its targets and requests may name
    [templates.<name>]      optional: a system prompt and/or user template a target can use
    [targets.<name>]        optional: a named, shaped target (provider + model, params, ...)
    [routes.<name>]         ordered `targets`, `fallback_on`, chains per error class, max_attempts
    [fallbacks]             optional: default chains per error class, for routes that name none
    [breaker]               optional: circuit-breaker defaults for every target (service/health.py)
    [nats]                  optional: how to connect to NATS, credentials, TLS (service/natsopts.py)

Provider tables are validated by their kind's settings type (workers/settings.py, through
workers/registry.py: no provider's code or HTTP client is loaded), so a typo in
any key fails here, before anything connects. Every chain entry is resolved here to a
TargetSpec with its name set, so the dispatcher never meets an unknown name from config.
"""

from __future__ import annotations

import ast
import difflib
import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import msgspec
from msgspec import Meta, Struct

from schemas.deadline import MIN_CALL_S
from schemas.errors import CHAIN_KINDS, kind_or_status_problem
from schemas.wire import (
    CONFIG_NAME,
    DROPPABLE,
    MAX_NAME_LENGTH,
    TARGET_SETS,
    UNSENT_WITH,
    OnMidstream,
    TargetSpec,
)
from service.health import SLOT_S, BreakerSettings
from service.natsopts import NatsSettings
from service.shaping import Template
from workers.registry import KINDS, known_kinds, parse_settings, settings_type
from workers.settings import ProviderSettings

# Provider and route names become NATS subject tokens (a subscription's line, with its
# queue group, must fit nats-server's 4 KiB protocol line) and come back in every reply.
_NAME = CONFIG_NAME  # the wire's rule: the conformance kit checks a name by it too

# Durations are finite, and ones JetStream takes (it counts them in int64 nanoseconds, which
# end at about 292 years). A year is more than any of these needs.
_YEAR_S = 365 * 86_400.0
# A request's time: one with less than MIN_CALL_S left is past its deadline, no provider asked.
RequestSeconds = Annotated[float, Meta(ge=MIN_CALL_S, le=_YEAR_S)]
# TOML integers are 64-bit (its spec makes one past them an error), and JetStream keeps its
# counts in an int64; Python's tomllib reads any: max_in_flight = 10**30 was no limit at all.
_INT64 = 2**63 - 1
_INT64_MIN = -(2**63)
# JetStream refuses a stream (a bucket too) that keeps its messages for less ("max age needs to
# be >= 100ms"), or for less than its duplicate window ("duplicates window can not be larger
# then max age").
_JETSTREAM_MIN_AGE_S = 0.1
# The audit stream drops an audit event published again within this window (a job delivered
# again after its result was stored publishes its event again). Here, where audit.max_age_s
# must cover it; service/audit.py makes the stream with it.
AUDIT_DEDUP_WINDOW_S = 600.0


# A stream's or bucket's name, as JetStream takes it (a regex's $ also matches before a final
# line break: (?!\n) refuses one); "" where the stream is optional. An error says which
# characters, not the regex.
_JS_NAME = r"^[A-Za-z0-9_-]+(?!\n)$"
_JS_NAME_OR_NONE = r"^[A-Za-z0-9_-]*(?!\n)$"
_PATTERNS = {
    _JS_NAME: "letters, digits, '_' and '-' only (a JetStream name)",
    _JS_NAME_OR_NONE: "letters, digits, '_' and '-' only (a JetStream name), or \"\" for none",
}

T = TypeVar("T")


class ConfigError(ValueError):
    """The config file is unreadable or invalid; the message names the file and the key.

    A mistake is one line: control characters of the keys and values it quotes are escaped
    (a quoted key may hold a line break or a terminal escape). `lines` marks a message
    already made of such mistakes, one a line."""

    def __init__(self, message: str, *, lines: bool = False) -> None:
        super().__init__(message if lines else _one_line(message))


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class DispatcherSettings(Struct, frozen=True, forbid_unknown_fields=True):
    # NATS's own default max_payload is 1 MiB; raise both together for long prompts. At most
    # nats-server's largest max_payload (an int32): no larger request can arrive, and the HTTP
    # gateway reads bodies of up to twice this into memory.
    max_request_bytes: Annotated[int, Meta(gt=0, le=2**31 - 1)] = 1024 * 1024
    default_timeout_s: RequestSeconds = 60.0
    max_timeout_s: RequestSeconds = 600.0
    # Requests a dispatcher works on at once; beyond it a request is answered at once with
    # "overloaded" (and a retry_after_s hint) instead of queueing without limit.
    max_in_flight: Annotated[int, Meta(ge=1)] = 1000
    # The bytes of the requests it works on at once (their bodies as sent; holding one costs
    # two to four times that): long prompts meet this bound before max_in_flight. A request
    # arriving while nothing else is in flight is always taken (max_request_bytes bounds it).
    max_in_flight_bytes: Annotated[int, Meta(gt=0)] = 256 * 1024 * 1024
    # Physical attempts per request across retries and fallbacks, so chains cannot multiply
    # into retry storms: the default, and the ceiling for a route's or a request's own value.
    max_attempts: Annotated[int, Meta(ge=1, le=50)] = 6
    # On SIGTERM a dispatcher stops taking requests and lets those in flight finish for this
    # long; the ones still running then are answered "shutting_down" (their attempts cancelled
    # at the workers), so each still gets its one reply and audit event. Keep it below your
    # supervisor's kill timeout (Kubernetes: terminationGracePeriodSeconds, 30 s).
    shutdown_grace_s: Annotated[float, Meta(ge=0, le=_YEAR_S)] = 10.0
    # Lets requests carry `faults` (simulated failures) to test their fallbacks. Never in
    # production.
    allow_fault_injection: bool = False
    # Breaker state shared by every dispatcher through this JetStream key-value bucket; when
    # false, or when the bucket cannot be reached, each dispatcher acts on its own view.
    shared_health: bool = True
    health_bucket: Annotated[str, Meta(pattern=_JS_NAME)] = "lifeline_health"

    def __post_init__(self) -> None:
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError(
                f"default_timeout_s ({self.default_timeout_s:g}) is above max_timeout_s "
                f"({self.max_timeout_s:g}): every request without its own timeout_s "
                "would be refused"
            )


class JobsSettings(Struct, frozen=True, forbid_unknown_fields=True):
    """Durable jobs on llm.jobs.submit (service/jobs.py); needs JetStream on the NATS server."""

    enabled: bool = True  # false: this dispatcher takes no jobs
    # Jobs one dispatcher works on at once; the rest wait in the stream, not in memory.
    in_flight: Annotated[int, Meta(ge=1)] = 100
    # A job not acknowledged (nor heartbeated) within ack_wait_s goes to another dispatcher.
    # At most 300 s: a job delivered again after its result was stored publishes its audit
    # event again, and the audit stream drops it as a duplicate only within its 600 s window.
    ack_wait_s: Annotated[float, Meta(ge=1, le=300)] = 30.0
    max_deliver: Annotated[int, Meta(ge=1)] = 5  # deliveries of one job before it is given up
    max_jobs: Annotated[int, Meta(ge=1, le=_INT64)] = 100_000  # waiting; more are refused
    # A repeated id within it is dropped (JetStream's shortest window is 0.1 s).
    dedup_window_s: Annotated[float, Meta(ge=_JETSTREAM_MIN_AGE_S, le=_YEAR_S)] = 120.0
    # How long a result is kept: JetStream makes no bucket that keeps its values shorter.
    results_ttl_s: Annotated[float, Meta(ge=_JETSTREAM_MIN_AGE_S, le=_YEAR_S)] = 86_400.0
    stream: Annotated[str, Meta(pattern=_JS_NAME)] = "LIFELINE_JOBS"
    results_bucket: Annotated[str, Meta(pattern=_JS_NAME)] = "lifeline_results"

    def __post_init__(self) -> None:
        # A job whose dispatcher stored its result and died before the ack comes back within
        # ack_wait_s, and is answered from the result: gone by then, it would be run (and
        # paid for) again.
        if self.results_ttl_s < self.ack_wait_s:
            raise ValueError(
                f"results_ttl_s ({self.results_ttl_s:g}) is under ack_wait_s "
                f"({self.ack_wait_s:g}): a job delivered again after its dispatcher died "
                "would find its result gone and call its provider again; keep results at "
                "least as long"
            )
        # An id sent again once its result expired runs again; within the dedup window its
        # publish is a duplicate, dropped: no run, and no result to find.
        if self.results_ttl_s < self.dedup_window_s:
            raise ValueError(
                f"results_ttl_s ({self.results_ttl_s:g}) is under dedup_window_s "
                f"({self.dedup_window_s:g}): a job sent again after its result expired, within "
                "the window, would be dropped as a duplicate and never answered; keep results "
                "at least as long, or shorten the window"
            )


class JetStreamSettings(Struct, frozen=True, forbid_unknown_fields=True):
    """How the streams and buckets Lifeline creates are kept: the jobs stream, the results and
    health buckets and the audit stream. On a NATS cluster, 3 keeps each on three servers, so
    losing one loses nothing (README: Running on a NATS cluster)."""

    replicas: Annotated[int, Meta(ge=1, le=5)] = 1


class AuditSettings(Struct, frozen=True, forbid_unknown_fields=True):
    """The audit events' JetStream stream (service/audit.py), so none is lost when no one
    listens; needs JetStream on the NATS server."""

    stream: Annotated[str, Meta(pattern=_JS_NAME_OR_NONE)] = "LIFELINE_AUDIT"  # "": none
    # Older events are dropped. JetStream makes no stream that keeps its messages for less than
    # its duplicate window, AUDIT_DEDUP_WINDOW_S.
    max_age_s: Annotated[float, Meta(ge=AUDIT_DEDUP_WINDOW_S, le=_YEAR_S)] = 7 * 86_400.0
    max_bytes: Annotated[int, Meta(gt=0, le=_INT64)] = 1024**3  # past it the oldest go
    # Error messages in audit events' attempts and in spans' error statuses (the dispatcher's
    # and the workers'). Off by default: a provider's error may quote the prompt it refused,
    # and prompt text stays out of audit events and spans unless a user opts in (DESIGN.md).
    error_text: bool = False
    # A request's event (llm.complete, llm.stream) published to JetStream and tried again until
    # the audit stream confirms it, as a job's is: none lost while a cluster's stream elects a
    # leader, for 90 to 200 µs more CPU per request than a core publish (off by default).
    confirm_requests: bool = False


# A chain entry: a target or provider name, an inline target table, or a load-balanced
# group `{ group = [...] }` of such (decoded one entry at a time in _chain, so that
# errors can say which entry and which key are wrong).
Chain = list[str | dict[str, Any]]


class GroupSpec(Struct, frozen=True, forbid_unknown_fields=True):
    """Equivalent targets: one is picked per request by `weight`, the others tried next."""

    group: Annotated[list[str | dict[str, Any]], Meta(min_length=2)]


# A resolved chain step: one target, or a group of them.
Step = TargetSpec | list[TargetSpec]


class RouteConfig(Struct, frozen=True, forbid_unknown_fields=True):
    targets: Annotated[Chain, Meta(min_length=1)]
    # None: every provider failure falls back. Otherwise error kinds and/or HTTP statuses.
    fallback_on: list[str | int] | None = None
    # Entered instead of the rest of `targets` when an attempt fails with that kind.
    context_length_fallbacks: Chain | None = None
    content_filter_fallbacks: Chain | None = None
    max_attempts: Annotated[int, Meta(ge=1)] | None = None  # the default for this route's requests
    # Circuit-breaker settings for this route's targets, over [breaker] (a target's own win).
    breaker: dict[str, Any] | None = None
    # Hedging: start the next target when a call is still running after hedge_after_ms, or
    # after the target's recent p95 (hedge = "p95"; hedge_after_ms is then the least wait).
    hedge_after_ms: Annotated[float, Meta(gt=0, le=_YEAR_S * 1000)] | None = None
    hedge: Literal["p95"] | None = None
    # Shares of the route's requests (over the last 10 s, plus a reserve of 3): hedges may use
    # hedge_budget; retries and hedges together may use retry_budget.
    hedge_budget: Annotated[float, Meta(ge=0, le=1)] = 0.1
    retry_budget: Annotated[float, Meta(ge=0, le=10)] = 0.2
    # On llm.stream, what a failure after the first chunk leads to (a request may choose its own).
    on_midstream: OnMidstream = "reset"


class FallbacksConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """Default error-class chains, for every route that does not name its own."""

    context_length: Chain | None = None
    content_filter: Chain | None = None


# Error kinds that can have chains of their own: route key -> kind.
CLASS_CHAINS = {f"{kind}_fallbacks": kind for kind in CHAIN_KINDS}


class Route(Struct, frozen=True):
    """A route with every chain resolved: each entry a TargetSpec whose `name` is set, or a
    group."""

    targets: list[Step]
    fallback_on: frozenset[str | int] | None
    by_kind: dict[str, list[Step]]  # error kind -> the chain entered on that failure
    max_attempts: int
    breaker: dict[str, Any] | None = None  # over [breaker], under each target's own
    hedge_after_ms: float | None = None
    hedge_p95: bool = False
    hedge_budget: float = 0.1
    retry_budget: float = 0.2
    on_midstream: str = "reset"


class _RawConfig(Struct, frozen=True, forbid_unknown_fields=True):
    # Tables are validated one entry at a time below, so errors can name the entry
    # (msgspec writes dict keys as `[...]` in its paths).
    providers: dict[str, Any]
    routes: dict[str, Any] = {}
    dispatcher: dict[str, Any] = {}
    templates: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    fallbacks: dict[str, Any] = {}
    breaker: dict[str, Any] = {}
    jobs: dict[str, Any] = {}
    audit: dict[str, Any] = {}
    jetstream: dict[str, Any] = {}
    nats: dict[str, Any] = {}
    model_aliases: dict[str, Any] = {}


class Config(Struct, frozen=True):
    providers: dict[str, ProviderSettings]
    routes: dict[str, Route]
    dispatcher: DispatcherSettings
    templates: dict[str, Template] = {}
    targets: dict[str, TargetSpec] = {}  # named targets, each with its name set
    default_chains: dict[str, list[Step]] = {}  # [fallbacks]: error kind -> chain
    breaker: dict[str, Any] = {}  # [breaker]: every target's circuit-breaker defaults
    source: str = "<memory>"
    jobs: JobsSettings = JobsSettings()
    audit: AuditSettings = AuditSettings()
    jetstream: JetStreamSettings = JetStreamSettings()
    nats: NatsSettings = NatsSettings()
    # [model_aliases]: what else a `model` may name at the HTTP gateway and in an OpenAI Batch
    # file, and a request's `route`: each the name of a route, target or provider (an OpenAI
    # SDK's "gpt-4o", say; routing.Router resolves them for the dispatcher)
    model_aliases: dict[str, str] = {}
    # What is valid but does nothing as written (see _warnings): every command that loads the
    # config shows them once, at its start; nothing reads them while serving.
    warnings: tuple[str, ...] = ()

    def resolve_target(self, ref: str | TargetSpec) -> TargetSpec:
        """A chain entry (a target name, a provider name or a table) as a checked TargetSpec
        with its name set; raises ValueError saying what is wrong. Requests use it too."""
        return resolve_target(
            ref,
            providers=self.providers,
            templates=self.templates,
            targets=self.targets,
            dispatcher=self.dispatcher,
        )


def load_config(path: str | Path) -> Config:
    path = Path(path)
    data = _read_toml(path)
    try:
        return parse_config(data, source=str(path))
    except ConfigError as exc:
        raise ConfigError(f"{_one_line(str(path))}: {exc}", lines=True) from None


def _read_toml(path: Path) -> dict[str, Any]:
    # TOML is UTF-8 whatever the locale (a latin-1 one read "Réponds" as "RÃ©ponds", an
    # ASCII one refused it); a leading byte-order mark, as Windows editors write, is skipped.
    try:
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:  # named by --config: a relative name, in the folder it is run in
        where = "" if path.is_absolute() else f" in {Path.cwd()}"
        raise ConfigError(f"{path}: no such file{where}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 (byte {exc.start}); a TOML file is UTF-8: save it as that"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {_toml_problem(str(exc))}") from None
    except ValueError:  # Python reads no integer of over 4,300 digits (sys.int_info)
        raise ConfigError(
            f"{path}: not valid TOML: an integer of thousands of digits; TOML integers are "
            f"64-bit ({_INT64_MIN} to {_INT64}): write a smaller number"
        ) from None


def _toml_problem(text: str) -> str:
    """tomllib's message, those about a table or key given twice in a config's words (its
    own: "Cannot declare ('providers', 'p') twice", "Cannot overwrite a value")."""
    message, sep, at = text.partition(" (at ")
    where = sep + at  # " (at line 4, column 13)"
    table = re.fullmatch(r"Cannot declare (\(.*\)) twice", message)
    if table:
        name = ".".join(ast.literal_eval(table.group(1)))
        return f"[{name}] is declared twice{where}: merge the two into one"
    if message == "Cannot overwrite a value":
        return f"a key set twice{where}: keep one"
    return text


def parse_config(data: dict[str, Any], source: str = "<memory>") -> Config:
    """The checked config; raises ConfigError naming every mistake it found (each table on
    its own, then the routes and targets, which need the tables right to be checked)."""
    raw = _convert({"providers": {}, **data}, _RawConfig, "")
    errors = _Errors()
    errors.found += _oversized_integers(data, "")
    errors.raise_any()  # before the tables: their own bounds would say it again, or nothing
    if not raw.providers:
        raise ConfigError("providers: at least one [providers.<name>] table is needed")
    providers = {
        name: settings
        for name, table in raw.providers.items()
        if (settings := errors.check(_provider, name, table)) is not None
    }
    dispatcher = errors.check(_convert, raw.dispatcher, DispatcherSettings, "dispatcher")
    errors.check(_breaker, "breaker", raw.breaker)
    templates = {
        name: template
        for name, table in raw.templates.items()
        if (template := errors.check(_convert, table, Template, f"templates.{name}")) is not None
    }
    defaults = errors.check(_convert, raw.fallbacks, FallbacksConfig, "fallbacks")
    jobs = errors.check(_convert, raw.jobs, JobsSettings, "jobs")
    audit = errors.check(_convert, raw.audit, AuditSettings, "audit")
    jetstream = errors.check(_convert, raw.jetstream, JetStreamSettings, "jetstream")
    nats = errors.check(_nats, raw.nats)
    if jobs is not None and audit is not None and dispatcher is not None:
        errors.check(_streams_apart, jobs, audit, dispatcher)
    errors.raise_any()  # what follows refers to the tables above
    targets = _named_targets(raw.targets, providers, templates, dispatcher)

    def resolve(key: str, chain: Chain) -> list[Step]:
        return _chain(key, chain, providers, templates, targets, dispatcher)

    default_chains = {  # a bad one is left out, so that the routes are checked all the same
        kind: chain
        for kind in CLASS_CHAINS.values()
        if getattr(defaults, kind) is not None
        and (chain := errors.check(resolve, f"fallbacks.{kind}", getattr(defaults, kind)))
        is not None
    }
    routes = {
        name: route
        for name, table in raw.routes.items()
        if (route := errors.check(_route, name, table, dispatcher, default_chains, resolve))
        is not None
    }
    # Against every route the file declares: one refused above is said once, not again here.
    aliases = errors.check(_model_aliases, raw.model_aliases, raw.routes, targets, providers)
    errors.raise_any()
    return Config(
        providers=providers,
        routes=routes,
        dispatcher=dispatcher,
        templates=templates,
        targets=targets,
        default_chains=default_chains,
        breaker=raw.breaker,
        source=source,
        jobs=jobs,
        audit=audit,
        jetstream=jetstream,
        nats=nats,
        model_aliases=aliases or {},
        warnings=_warnings(routes),
    )


def _model_aliases(
    table: dict[str, Any],
    routes: Mapping[str, Any],
    targets: Mapping[str, Any],
    providers: Mapping[str, Any],
) -> dict[str, str]:
    """[model_aliases], checked: each a name of at most 256 printable characters that names
    nothing else, for a route, target or provider."""
    known = [*routes, *targets, *providers]
    for alias, name in table.items():
        key = f"model_aliases.{_one_line(alias)}"
        if not alias or len(alias) > MAX_NAME_LENGTH or not alias.isprintable():
            raise ConfigError(f"{key}: an alias is 1 to 256 printable characters")
        if alias in known:
            raise ConfigError(
                f"{key}: {alias!r} names a route, target or provider already, which a request "
                "reaches by that name; drop the alias"
            )
        if isinstance(name, dict):  # `gpt-4.1 = "x"` is the table gpt-4 holding 1 = "x"
            raise ConfigError(
                f'{key}: a table; quote an alias with a dot in it: "{alias}.{next(iter(name), "")}" = ...'
            )
        if not isinstance(name, str) or name not in known:
            raise ConfigError(
                f"{key}: {_one_line(repr(name))} is no route, target or provider of this config "
                f"({', '.join(dict.fromkeys(known))})"
            )
    return dict(table)


def _warnings(routes: dict[str, Route]) -> tuple[str, ...]:
    """What a valid config holds that will never act: a hedge starts the chain's next target,
    and a route of one plain target has none."""
    return tuple(
        f"routes.{name}.{'hedge' if route.hedge_p95 else 'hedge_after_ms'}: the route has one "
        "target, so no hedge can start beside it; add a second target (or a group), or drop it"
        for name, route in routes.items()
        if (route.hedge_after_ms is not None or route.hedge_p95)
        and len(route.targets) == 1
        and not isinstance(route.targets[0], list)
    )


def _oversized_integers(value: Any, key: str) -> list[str]:
    """A mistake for every integer in `value` (a TOML document, table or array) past TOML's
    64 bits."""
    if isinstance(value, dict):
        inner = [(f"{key}.{k}" if key else str(k), v) for k, v in value.items()]
        return [m for where, v in inner for m in _oversized_integers(v, where)]
    if isinstance(value, list):
        return [m for i, v in enumerate(value) for m in _oversized_integers(v, f"{key}[{i}]")]
    if type(value) is int and not _INT64_MIN <= value <= _INT64:
        digits = len(str(abs(value)))
        number = str(value) if digits <= 40 else f"an integer of {digits} digits"
        return [
            (
                f"{key}: {number} is outside the 64-bit integers TOML holds ({_INT64_MIN} to "
                f"{_INT64}): write a smaller number"
            )
        ]
    return []


def _streams_apart(
    jobs: JobsSettings, audit: AuditSettings, dispatcher: DispatcherSettings
) -> None:
    """The JetStream streams Lifeline keeps are four (a bucket is the stream KV_<name>): one
    name for two would mix jobs, results, audit events and breakers in one stream, and give
    whoever may read one of them the other (`lifeline nats-config` grants by stream)."""
    named = {
        "jobs.stream": jobs.stream,
        "jobs.results_bucket": f"KV_{jobs.results_bucket}",
        "audit.stream": audit.stream,
        "dispatcher.health_bucket": f"KV_{dispatcher.health_bucket}",
    }
    seen: dict[str, str] = {}
    for key, stream in named.items():
        if not stream:
            continue  # audit.stream = "": none
        if stream in seen:
            raise ConfigError(
                f"{key}: its stream {stream} is also {seen[stream]}'s: give each its own name"
            )
        seen[stream] = key


class _Errors:
    """Every mistake of a config, so that one run of check-config shows them all."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def check(self, check: Callable[..., T], *args: Any) -> T | None:
        try:
            return check(*args)
        except ConfigError as exc:
            self.found.append(str(exc))
            return None

    def raise_any(self) -> None:
        if len(self.found) == 1:
            raise ConfigError(self.found[0])
        if self.found:
            listed = "\n  ".join(self.found)
            raise ConfigError(f"{len(self.found)} mistakes:\n  {listed}", lines=True)


def load_nats_settings(path: str | Path) -> NatsSettings:
    """Only the [nats] table of a config file, checked: for the commands that only connect
    (ask, status, ...), which a mistake elsewhere in the file should not stop."""
    path = Path(path)
    data = _read_toml(path)
    try:
        return _nats(data.get("nats", {}))
    except ConfigError as exc:
        raise ConfigError(f"{_one_line(str(path))}: {exc}", lines=True) from None


def _nats(table: Any) -> NatsSettings:
    for secret in ("password", "token"):
        if isinstance(table, dict) and secret in table:
            raise ConfigError(
                f"nats.{secret}: a secret is never written in the config: name the environment "
                f"variable ({secret}_env) or the file ({secret}_file) that holds it"
            )
    settings = _convert(table, NatsSettings, "nats")
    for key, problem in settings.problems():
        raise ConfigError(f"nats.{key}: {problem}")
    return settings


def _named_targets(
    tables: dict[str, Any],
    providers: dict[str, ProviderSettings],
    templates: dict[str, Template],
    dispatcher: DispatcherSettings,
) -> dict[str, TargetSpec]:
    """The [targets.<name>] tables, each resolved with its name set."""
    targets: dict[str, TargetSpec] = {}
    for name, table in tables.items():
        key = f"targets.{name}"
        if not _NAME.match(name):  # requests name it, `--fault NAME=...` too
            raise ConfigError(f"{key}: target names are 1 to 256 letters, digits, '_' and '-'")
        if name in providers:
            raise ConfigError(f"{key}: a provider has this name too; give the target another one")
        spec = _convert(table, TargetSpec, key)
        if spec.name is not None and spec.name != name:
            raise ConfigError(f"{key}.name: a named target's name is its table key; drop `name`")
        targets[name] = _entry(
            key, msgspec.structs.replace(spec, name=name), providers, templates, {}, dispatcher
        )
    return targets


def _route(
    name: str,
    table: Any,
    dispatcher: DispatcherSettings,
    default_chains: dict[str, list[Step]],
    resolve: Callable[[str, Chain], list[Step]],
) -> Route:
    """One [routes.<name>] table, checked, with its chains resolved by `resolve`."""
    key = f"routes.{name}"
    route = _convert(table, RouteConfig, key, _target_taking)
    if not _NAME.match(name):
        raise ConfigError(f"{key}: route names are 1 to 256 letters, digits, '_' and '-'")
    problem = _bad_kind(route.fallback_on)
    if problem is not None:
        raise ConfigError(f"{key}.fallback_on[{problem[0]}]: {problem[1]}")
    if route.max_attempts is not None and route.max_attempts > dispatcher.max_attempts:
        raise ConfigError(
            f"{key}.max_attempts: {route.max_attempts} is above dispatcher.max_attempts "
            f"({dispatcher.max_attempts})"
        )
    if route.breaker is not None:
        _breaker(f"{key}.breaker", route.breaker)
    by_kind = dict(default_chains)
    for field, kind in CLASS_CHAINS.items():
        chain = getattr(route, field)
        if chain is not None:  # [] turns a default chain off for this route
            by_kind[kind] = resolve(f"{key}.{field}", chain)
    return Route(
        targets=resolve(f"{key}.targets", route.targets),
        fallback_on=frozenset(route.fallback_on) if route.fallback_on is not None else None,
        by_kind={kind: chain for kind, chain in by_kind.items() if chain},
        max_attempts=route.max_attempts or dispatcher.max_attempts,
        breaker=route.breaker,
        hedge_after_ms=route.hedge_after_ms,
        hedge_p95=route.hedge == "p95",
        hedge_budget=route.hedge_budget,
        retry_budget=route.retry_budget,
        on_midstream=route.on_midstream,
    )


def _provider(name: str, table: Any) -> ProviderSettings:
    key = f"providers.{name}"
    if not _NAME.match(name):
        raise ConfigError(f"{key}: provider names are 1 to 256 letters, digits, '_' and '-'")
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: expected a table")
    try:
        settings = parse_settings(table)
    except KeyError:
        kinds = f"one of {', '.join(known_kinds())} (the installed ones)"
        if "kind" not in table:
            raise ConfigError(f"{key}.kind: missing: set it to {kinds}") from None
        raise ConfigError(f"{key}.kind: expected {kinds}, got {table['kind']!r}") from None
    except msgspec.ValidationError as exc:
        hint = _kinds_taking(table.get("kind"))
        raise ConfigError(_located(key, exc, settings_type(table), hint)) from None
    for i, model in enumerate(settings.models):
        if not model.strip():
            raise ConfigError(f"{key}.models[{i}]: a model name cannot be empty")
    fixed = settings.fixed_model()
    if fixed is not None and settings.models:
        raise ConfigError(
            f"{key}.models: this provider serves one model ({fixed}), so its targets and "
            "requests cannot name another; drop `models`, and for each other model add a "
            f'provider (kind = "{settings.kind}") that serves it'
        )
    return settings


def allowed_models(settings: ProviderSettings) -> list[str]:
    """The models a provider's targets and requests may name: `model` and `models`; [] means any."""
    if not settings.models:
        return []
    return [model for model in dict.fromkeys([settings.model, *settings.models]) if model]


# The most targets a chain names, its groups' members counted: each one left when a request
# stops is an attempt in its reply and audit event (skipped, max_attempts), so a chain of
# thousands made replies of a megabyte, refused as reply_too_large.
MAX_CHAIN_TARGETS = 256


def _chain(key: str, chain: Chain, *known: Any) -> list[Step]:
    size = sum(
        len(entry["group"])
        if isinstance(entry, dict) and isinstance(entry.get("group"), list)
        else 1
        for entry in chain
    )
    if size > MAX_CHAIN_TARGETS:
        raise ConfigError(
            f"{key}: {size} targets, over the {MAX_CHAIN_TARGETS} a chain may name (each is in "
            "a failed request's attempts); split it into routes, or give one target `retries`"
        )
    steps: list[Step] = []
    for i, entry in enumerate(chain):
        where = f"{key}[{i}]"
        if isinstance(entry, dict) and "group" in entry:
            group = _convert(entry, GroupSpec, where)
            for j, member in enumerate(group.group):
                if isinstance(member, dict) and "group" in member:
                    raise ConfigError(
                        f"{where}.group[{j}]: a group holds targets, not another group; list "
                        "the inner group's targets in this one, with their weights"
                    )
            members = [
                _entry(f"{where}.group[{j}]", member, *known)
                for j, member in enumerate(group.group)
            ]
            names = [m.name for m in members]
            for j, name in enumerate(names):
                if name in names[:j]:  # one target twice: a group of fewer than it says
                    raise ConfigError(
                        f"{where}.group[{j}]: target {name!r} is already in this group "
                        f"(group[{names.index(name)}]); a group tries each of its targets once, "
                        "so list it once (for more calls to it, give it `retries`)"
                    )
            steps.append(members)
        else:
            steps.append(_entry(where, entry, *known))
    _listed_once(key, steps)
    return steps


def _listed_once(key: str, steps: list[Step]) -> None:
    """A target a chain names again is called again as a fallback: at once, past its retry_on,
    its backoff and the route's retry budget, which bound the calls `retries` adds. The same
    provider twice, shaped apart (a larger max_tokens, another model or name), is two
    targets."""
    field = key.rpartition(".")[2]
    seen: list[tuple[TargetSpec, str]] = []  # TargetSpec holds lists: not hashable
    for i, step in enumerate(steps):
        members = [step] if isinstance(step, TargetSpec) else step
        for j, spec in enumerate(members):
            where = f"[{i}]" if isinstance(step, TargetSpec) else f"[{i}].group[{j}]"
            first = next((at for earlier, at in seen if earlier == spec), None)
            if first is not None:
                raise ConfigError(
                    f"{key}{where}: target {spec.name!r} is already in this chain "
                    f"({field}{first}); list it once, and for more calls to it give it `retries` "
                    "(a second entry calls it again at once, past its retry_on, its backoff and "
                    "the route's retry budget)"
                )
            seen.append((spec, where))


def _entry(key: str, entry: str | TargetSpec | dict[str, Any], *known: Any) -> TargetSpec:
    ref = _convert(entry, TargetSpec, key) if isinstance(entry, dict) else entry
    try:
        return resolve_target(ref, *known)
    except ValueError as exc:
        raise ConfigError(f"{key}{_field_of(exc)}: {exc}") from None


class TargetError(ValueError):
    """A chain entry is invalid; `field` names the offending key inside it, if any."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def _field_of(exc: ValueError) -> str:
    field = getattr(exc, "field", "")
    return f".{field}" if field else ""


def resolve_target(
    ref: str | TargetSpec,
    providers: dict[str, ProviderSettings],
    templates: dict[str, Template],
    targets: dict[str, TargetSpec],
    dispatcher: DispatcherSettings,
) -> TargetSpec:
    if isinstance(ref, str):
        if ref in targets:
            return targets[ref]
        if ref in providers:
            return TargetSpec(provider=ref, name=ref)
        known = ", ".join(sorted([*targets, *providers]))
        raise TargetError(f"unknown target or provider {ref!r} (configured: {known})")
    _check_target(ref, providers, templates, dispatcher)
    if ref.name is not None:
        return ref
    name = ref.provider if ref.model is None else f"{ref.provider}:{ref.model}"
    return msgspec.structs.replace(ref, name=name)


def _check_target(
    ref: TargetSpec,
    providers: dict[str, ProviderSettings],
    templates: dict[str, Template],
    dispatcher: DispatcherSettings,
) -> None:
    """Raises TargetError naming the first key of an inline target that the config refutes."""
    if ref.provider not in providers:
        raise TargetError(
            f"unknown provider {ref.provider!r} (configured: {', '.join(sorted(providers))})",
            "provider",
        )
    provider = providers[ref.provider]
    if ref.model is not None and not ref.model.strip():
        # Sent as the model "" (every call a bad_request), while replies and the breaker
        # named the provider's own.
        own = f" ({provider.model})" if provider.model else ""
        raise TargetError(
            f"an empty name calls no model: name one, or drop `model` for provider "
            f"{ref.provider}'s own{own}",
            "model",
        )
    fixed = provider.fixed_model() if ref.model is not None else None
    if fixed is not None and ref.model != provider.model:
        raise TargetError(
            f"model {ref.model!r} cannot be chosen per target: provider {ref.provider} serves "
            f"one model ({fixed}); to call {ref.model}, add a provider (kind = "
            f'"{provider.kind}") that serves it and name that provider here instead (or drop '
            "`model`)",
            "model",
        )
    allowed = allowed_models(provider)
    if ref.model is not None and allowed and ref.model not in allowed:
        raise TargetError(
            f"model {ref.model!r} is not one provider {ref.provider} allows "
            f"({', '.join(allowed)}); to allow it, add it to providers.{ref.provider}.models "
            "in the config",
            "model",
        )
    if ref.template is not None and ref.template not in templates:
        known = ", ".join(sorted(templates)) or "none"
        raise TargetError(f"unknown template {ref.template!r} (configured: {known})", "template")
    if ref.timeout_s is not None and ref.timeout_s < MIN_CALL_S:
        raise TargetError(
            f"{ref.timeout_s:g} is under {MIN_CALL_S * 1000:g} ms: a worker gets its deadline in "
            "whole milliseconds, so a call given less times out (or is dropped as late) instead "
            "of being made",
            "timeout_s",
        )
    if ref.timeout_s is not None and ref.timeout_s > dispatcher.max_timeout_s:
        raise TargetError(
            f"{ref.timeout_s:g} is above dispatcher.max_timeout_s ({dispatcher.max_timeout_s:g})",
            "timeout_s",
        )
    if ref.timeout_s is not None and ref.timeout_s > provider.timeout_s:
        # The worker holds each call to its provider's timeout_s: a longer one would be cut
        # there, as a timeout counted against the provider.
        raise TargetError(
            f"{ref.timeout_s:g} is above providers.{ref.provider}.timeout_s "
            f"({provider.timeout_s:g}), which its worker holds every call to: raise that",
            "timeout_s",
        )
    problem = _bad_kind(ref.retry_on)
    if problem is not None:
        raise TargetError(problem[1], f"retry_on[{problem[0]}]")
    for i, name in enumerate(ref.drop):
        problem = _drop_problem(ref, name)
        if problem is not None:
            raise TargetError(problem, f"drop[{i}]")
    if ref.breaker is not None:
        try:
            _breaker("breaker", ref.breaker)
        except ConfigError as exc:
            field, _, message = str(exc).partition(": ")
            raise TargetError(message, field) from None


def _drop_problem(ref: TargetSpec, name: str) -> str | None:
    """Why `ref` may not drop `name`: not a parameter it can, or one its own settings
    contradict (accepted, the drop won silently, or the skip left it nothing to act on)."""
    if name not in DROPPABLE:
        return f"{name!r} is not a request parameter a target can drop ({', '.join(DROPPABLE)})"
    for field in (name, *UNSENT_WITH.get(name, ())):
        value = getattr(ref, field) if field in TARGET_SETS else None
        if value is not None:
            return (
                f"this target sets {field} ({_shown(value)}), which dropping {name} leaves unsent: "
                f"keep one (its own {field} replaces the request's; drop sends none)"
            )
    if name == "tools" and not ref.tools:
        return (
            "tools = false skips every request with tools, so dropping them never acts: keep "
            "one (drop calls this target without the request's tools; tools = false skips it)"
        )
    return None


def _shown(value: Any) -> str:
    """A config value as TOML's inline form mostly writes it (true, ["END"])."""
    return msgspec.json.encode(value).decode()


def breaker_settings(*layers: dict[str, Any] | None) -> BreakerSettings:
    """[breaker], a route's and a target's settings, later layers winning key by key."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer or {})
    return msgspec.convert(merged, BreakerSettings)


def _breaker(key: str, table: dict[str, Any]) -> None:
    settings = _convert(table, BreakerSettings, key)
    # As written: settings.trip_on is a frozenset, whose order (string hashes) differs by process.
    problem = _bad_kind(table.get("trip_on") or ())
    if problem is not None:
        raise ConfigError(f"{key}.trip_on[{problem[0]}]: {problem[1]}")
    # A window_s under one slot was counted as the current slot, while check-config said
    # "in 1e-06 s".
    if settings.window_s < SLOT_S:
        raise ConfigError(
            f"{key}.window_s: {settings.window_s:g} s is shorter than the {SLOT_S:g} s "
            "slots the breaker counts calls in (it would count the current one only): set 1 to "
            "300"
        )


def _bad_kind(entries: Collection[str | int] | None) -> tuple[int, str] | None:
    """The first entry of a fallback_on / retry_on / trip_on list that is neither an error kind
    nor an HTTP error status."""
    for i, entry in enumerate(entries or ()):
        problem = kind_or_status_problem(entry)
        if problem is not None:
            return i, problem
    return None


# Where an unknown key, spelt right, belongs instead (None: nowhere known).
_Elsewhere = Callable[[str], str | None]


def _convert(data: Any, type_: type, prefix: str, elsewhere: _Elsewhere | None = None) -> Any:
    try:
        return msgspec.convert(data, type_)
    except msgspec.ValidationError as exc:
        raise ConfigError(_located(prefix, exc, type_, elsewhere)) from None


def _kinds_taking(kind: Any) -> _Elsewhere:
    """For a provider of `kind`: the built-in kinds that take a key it does not (a table
    copied from one kind to another)."""

    def hint(key: str) -> str | None:
        own = _url_key(kind) if key in _URL_KEYS else None
        if own is not None and own != key:  # its URL, under another kind's name
            return f"kind {kind} takes its URL as {own!r}{_URL_KEYS[own]}"
        owners = [name for name, (other, _) in KINDS.items() if key in _keys(other)]
        takers = "kind {} takes" if len(owners) == 1 else "kinds {} take"
        return f"kind {kind} has none; {takers.format(', '.join(owners))} it" if owners else None

    return hint


# The key a built-in kind takes its server's URL by, and what it looks like where that helps:
# a table copied from a kind of the other name has the other's.
_URL_KEYS = {"base_url": "", "endpoint": ": https://<resource>.openai.azure.com"}


def _url_key(kind: Any) -> str | None:
    """The key of _URL_KEYS a built-in `kind` takes (None: none, or not a built-in kind)."""
    if not isinstance(kind, str) or kind not in KINDS:
        return None
    return next((key for key in _URL_KEYS if key in _keys(KINDS[kind][0])), None)


def _target_taking(key: str) -> str | None:
    """For a route: a key each of its targets takes instead (retries, timeout_s, ...)."""
    if key not in _keys(TargetSpec):
        return None
    return f'a route has none; a target takes it: targets = [{{ provider = "...", {key} = ... }}]'


def _located(
    prefix: str,
    exc: msgspec.ValidationError,
    type_: type | None = None,
    elsewhere: _Elsewhere | None = None,
) -> str:
    """Turn msgspec's "... - at `$.a.b`" into "prefix.a.b: ..." so the key comes first; an
    unknown key of `type_` itself gets the closest known one as a suggestion, else where it
    belongs instead, as `elsewhere` says."""
    text = str(exc)
    message, sep, where = text.rpartition(" - at `$")
    if not sep:
        message, where = text, ""
    path = (prefix + where.rstrip("`")).lstrip(".")
    if message.startswith("Invalid enum value") and re.fullmatch(r"\.\w+`", where):
        allowed = _literals(type_, where[1:-1])
        if allowed:
            message += f" (expected one of {', '.join(map(repr, allowed))})"
    for pattern, characters in _PATTERNS.items():
        if message == f"Expected `str` matching regex {pattern!r}":
            message = f"expected {characters}"
    unknown = re.match(r"Object contains unknown field `(.+)`", message)
    if unknown:
        key = unknown.group(1)
        hint = "check its spelling"
        if isinstance(type_, type) and issubclass(type_, msgspec.Struct) and not where:
            close = difflib.get_close_matches(key, _keys(type_), n=1, cutoff=0.6)
            instead = elsewhere(key) if elsewhere is not None else None
            if close:
                hint = f"did you mean {close[0]!r}?"
            elif instead:  # spelt right, for another table
                hint = instead
        return f"{path + '.' if path else ''}{key}: unknown key ({hint})"
    return f"{path}: {message}" if path else message


def _keys(type_: type) -> list[str]:
    """The keys a config table of the Struct `type_` takes."""
    return [f.encode_name for f in msgspec.structs.fields(type_)]


def _literals(type_: type | None, field: str) -> list[Any]:
    """The values a Literal-typed field of the Struct `type_` takes ([] when it is not one)."""
    if not (isinstance(type_, type) and issubclass(type_, msgspec.Struct)):
        return []
    try:
        pending, found = [get_type_hints(type_).get(field)], []
    except (NameError, TypeError):  # a plugin's settings may name what is not importable here
        return []
    while pending:
        hint = pending.pop()
        if get_origin(hint) is Literal:
            found += get_args(hint)
        else:
            pending += get_args(hint)
    return found
