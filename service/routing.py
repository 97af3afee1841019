"""Where a raw request becomes a plan, or a clear refusal.

`Router.plan(data)` checks the size, decodes, resolves the route (or the request's own
targets) into frozen Targets (service/target.py), sets the request's Deadline, and checks
every per-request override against what the config allows: timeout_s and deadline_unix_ms
against max_timeout_s, max_attempts against the configured ceiling, fallback_on only
narrowing the route's, faults only where allowed, response_format's schema compiled, a
target's model inside its provider's `models` (when the config lists them). Anything else
raises Rejected, which the engine answers with an error reply and an audit event, before
any provider is called. A request target naming a model the config does not name shares its
provider's one health entry (health.ADHOC_MODEL), so what requests make up cannot grow the
dispatcher.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import NamedTuple

import msgspec

from schemas import CompletionRequest, ErrorInfo
from schemas.deadline import Deadline
from schemas.errors import DEFAULT_RETRY_ON, kind_or_status_problem
from schemas.ids import Ids
from schemas.wire import (
    DEADLINE_EXCEEDED,
    INVALID_REQUEST,
    PAYLOAD_TOO_LARGE,
    UNKNOWN_PROVIDER,
    UNKNOWN_ROUTE,
    ChatMessage,
    Fault,
    NamedTool,
    TargetSpec,
    Tool,
    clipped,
    not_a_request,
    request_decoder,
    salvage_id,
)
from service.budgets import Budget, Budgets
from service.config import Config, Step, breaker_settings
from service.faults import check_faults
from service.health import ADHOC_MODEL
from service.policy import NO_NEEDS, Chain, Hedge, Limits, Needs
from service.shaping import (
    Shaping,
    Template,
    Validator,
    estimate_shaped,
    estimate_tokens,
    output_validator,
    wants_json,
)
from service.target import HealthKey, Target

# A refusal quotes what it refuses: at most this many characters of it go back.
MAX_REFUSAL_CHARS = 2000


class Rejected(Exception):
    """A request refused before any provider is tried."""

    def __init__(
        self,
        error_type: str,
        message: str,
        request_id: str = "",
        route: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        # It may quote what the request held: bounded, so the reply and its audit event stay
        # small whatever that was.
        message = clipped(message, MAX_REFUSAL_CHARS) or ""
        super().__init__(message)
        self.error = ErrorInfo(error_type, message, retry_after_s)
        self.request_id = request_id
        self.route = route


class Plan(msgspec.Struct, frozen=True):
    request: CompletionRequest
    request_id: str
    route: str | None  # None when the request named its own targets
    chain: Chain
    limits: Limits
    needs: Needs
    validate: Validator | None
    faults: dict[str, tuple[Fault, ...]] | None


class _Route(NamedTuple):
    chain: Chain  # groups flattened in config order; used as is when the route has no groups
    fallback_on: frozenset[str | int] | None
    max_attempts: int
    counts_tokens: bool  # some target declares max_input_tokens
    groups: tuple | None = None  # (steps, by_kind steps) when some step is a load-balanced group
    hedge: Hedge | None = None
    budgets: Budgets | None = None  # shared by every request of the route
    on_midstream: str = "reset"


def weighted_order(group: Sequence[Target], rand: Callable[[], float]) -> list[Target]:
    """The group's targets in a random order where each comes first with probability
    weight / total, and so on down (Efraimidis-Spirakis weighted sampling without replacement)."""
    # The key u ** (1 / weight), compared as log(weight) - log(-log u), which stays finite
    # for any finite weight (the power, or log(u) / weight, underflows or overflows for a tiny
    # one, and every key then ties). 1 - rand() is in (0, 1]; -log of 1 is 0: that one first.
    keyed = []
    for i, t in enumerate(group):
        e = -math.log(1.0 - rand())
        keyed.append((math.log(t.weight) - math.log(e) if e > 0.0 else math.inf, i))
    return [group[i] for _, i in sorted(keyed, reverse=True)]


class _ShapedEstimates:
    """A request's input estimated as each target's shaping makes it (its template, tools it
    drops), once per shaping: its 64 targets may share one, and shaping a large input costs
    milliseconds each time."""

    __slots__ = ("known", "messages", "tools")

    def __init__(self, messages: Sequence[ChatMessage], tools: Sequence[Tool] | None) -> None:
        self.messages, self.tools = messages, tools
        self.known: dict[tuple[int, bool], int] = {}

    def __call__(self, template: Template | None, with_tools: bool) -> int:
        key = (id(template), with_tools)
        tokens = self.known.get(key)
        if tokens is None:  # a config's templates live as long as the request: ids stay theirs
            tools = self.tools if with_tools else None
            tokens = self.known[key] = (
                estimate_shaped(self.messages, tools, template)
                if template is not None
                else estimate_tokens(self.messages, tools)
            )
        return tokens


def _flat(steps: Sequence[Target | tuple[Target, ...]]) -> list[Target]:
    return [t for step in steps for t in ((step,) if isinstance(step, Target) else step)]


class _Refused(Exception):
    """A refusal found by one of Router.plan's helpers, which know neither the request's id nor
    its route: plan raises it again as the Rejected that carries them. (A closure per request
    that made the Rejected itself cost plan about 1,700 instructions, its cells and function.)"""

    def __init__(self, message: str, error_type: str = INVALID_REQUEST) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type


class Router:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.default_breaker = breaker_settings(config.breaker)
        # Request targets may name a configured target or a bare provider.
        self.named = {name: self.build(spec) for name, spec in config.targets.items()}
        for name in config.providers:
            self.named[name] = self.build(config.resolve_target(name))
        self.default_by_kind = {  # an empty chain is none, as in a route's (config._route)
            kind: self.build_all(chain) for kind, chain in config.default_chains.items() if chain
        }
        self.routes = {}
        for name, r in config.routes.items():
            hedge = Hedge(r.hedge_after_ms / 1000 if r.hedge_after_ms else None, r.hedge_p95)
            self.routes[name] = self._route(
                self.build_all(r.targets, r.breaker),
                {k: self.build_all(c, r.breaker) for k, c in r.by_kind.items()},
                r.fallback_on,
                r.max_attempts,
                hedge if hedge.after_s is not None or hedge.p95 else None,
                Budgets(Budget(r.retry_budget), Budget(r.hedge_budget)),
                r.on_midstream,
            )
        # Requests that name their own targets share one budget (at the routes' defaults).
        self.request_budgets = Budgets(Budget(0.2), Budget(0.1))
        # [model_aliases]: a request's `route` may be an alias, as a gateway request's `model`
        # may (a framework integration's model="gpt-4o-mini", a batch file's): the route it
        # stands for (the same one, its budgets and hedging shared), or a target's or
        # provider's chain of one, as a request naming it in `targets` gets. The plan names
        # the route an alias stands for (None for a target's, as for `targets`).
        self.aliased: dict[str, str | None] = {}
        for alias, name in config.model_aliases.items():
            if name in config.routes:
                self.routes[alias], self.aliased[alias] = self.routes[name], name
            else:
                self.routes[alias] = self._route(
                    [self.named[name]],
                    self.default_by_kind,
                    None,
                    config.dispatcher.max_attempts,
                    None,
                    self.request_budgets,
                )
                self.aliased[alias] = None
        # Requests with `faults` share one of their own: their simulated failures' retries
        # must not spend the budget of every other client's real ones (as for breakers).
        self.fault_budgets = Budgets(Budget(0.2), Budget(0.1))
        # Per provider, the models the config names: each keeps a breaker and figures of its own.
        self.models = self._configured_models()
        self._ids = Ids()  # unique ids for requests that bring none
        self.random = random.Random()

    def build(self, spec: TargetSpec, route_breaker: dict | None = None) -> Target:
        """A checked TargetSpec (name set) as the policy's Target."""
        provider = self.config.providers[spec.provider]
        if route_breaker is None and spec.breaker is None:
            breaker = self.default_breaker
        else:
            breaker = breaker_settings(self.config.breaker, route_breaker, spec.breaker)
        shaping = None
        template = self.config.templates[spec.template] if spec.template is not None else None
        own = (spec.model, spec.temperature, spec.max_tokens, spec.top_p, template, spec.stop)
        if own != (None,) * 6 or (spec.seed, spec.parallel_tool_calls) != (None, None) or spec.drop:
            shaping = Shaping(
                spec.model,
                spec.temperature,
                spec.max_tokens,
                spec.top_p,
                template,
                spec.template,
                tuple(spec.stop) if spec.stop is not None else None,
                spec.seed,
                spec.parallel_tool_calls,
                frozenset(spec.drop),
            )
        return Target(
            provider=spec.provider,
            kind=provider.kind,
            model=spec.model or provider.model,
            timeout_s=spec.timeout_s or provider.timeout_s,
            name=spec.name or spec.provider,
            retries=spec.retries,
            retry_on=frozenset(spec.retry_on) if spec.retry_on is not None else DEFAULT_RETRY_ON,
            backoff_s=spec.backoff_s,
            max_backoff_s=spec.max_backoff_s,
            max_input_tokens=spec.max_input_tokens,
            json_output=spec.json_output,
            tools=spec.tools,
            vision=spec.vision,
            pass_failures=spec.pass_failures,
            weight=spec.weight,
            breaker=breaker if breaker.enabled else None,
            shaping=shaping,
            ttft_s=spec.ttft_s,
            idle_s=spec.idle_s,
            prefill=spec.prefill,
            max_response_bytes=provider.max_response_bytes,
        )

    def _configured_models(self) -> dict[str, frozenset[str]]:
        every = [
            *self.named.values(),
            *(t for chain in self.default_by_kind.values() for t in _flat(chain)),
        ]
        for route in self.routes.values():
            every += [
                *route.chain.targets,
                *(t for chain in route.chain.by_kind.values() for t in chain),
            ]
        models = {name: set(settings.models) for name, settings in self.config.providers.items()}
        for target in every:
            models[target.provider].add(target.model)
        return {name: frozenset(names) for name, names in models.items()}

    def build_all(
        self, steps: Sequence[Step], route_breaker: dict | None = None
    ) -> list[Target | tuple[Target, ...]]:
        return [
            tuple(self.build(s, route_breaker) for s in step)
            if isinstance(step, list)
            else self.build(step, route_breaker)
            for step in steps
        ]

    @staticmethod
    def _route(
        targets: Sequence[Target | tuple[Target, ...]],
        by_kind: Mapping[str, Sequence[Target | tuple[Target, ...]]],
        fallback_on: frozenset[str | int] | None,
        max_attempts: int,
        hedge: Hedge | None = None,
        budgets: Budgets | None = None,
        on_midstream: str = "reset",
    ) -> _Route:
        chains = [targets, *by_kind.values()]
        grouped = any(not isinstance(step, Target) for chain in chains for step in chain)
        every = [t for chain in chains for t in _flat(chain)]
        chain = Chain(_flat(targets), {kind: _flat(c) for kind, c in by_kind.items()})
        return _Route(
            chain,
            fallback_on,
            max_attempts,
            any(t.max_input_tokens is not None for t in every),
            (targets, by_kind) if grouped else None,
            hedge,
            budgets,
            on_midstream,
        )

    def _chain_for_request(self, route: _Route) -> Chain:
        """The route's chain, with each load-balanced group in this request's weighted order."""
        if route.groups is None:
            return route.chain
        targets, by_kind = route.groups
        return Chain(
            self._ordered(targets), {kind: self._ordered(c) for kind, c in by_kind.items()}
        )

    def _ordered(self, steps: Sequence[Target | tuple[Target, ...]]) -> list[Target]:
        out: list[Target] = []
        for step in steps:
            if isinstance(step, Target):
                out.append(step)
            else:
                out.extend(weighted_order(step, self.random.random))
        return out

    def plan(self, data: bytes, arrived: float | None = None, default_id: str = "") -> Plan:
        """Validate a raw request and resolve its chain; raises Rejected.

        The request's deadline counts from `arrived` (time.monotonic() when the message came
        in), so time spent waiting for a free slot is part of its timeout_s."""
        # The request decoded here, its refusals made by _too_large and _undecodable (a method
        # for this was about 400 instructions more, its call).
        max_bytes = self.config.dispatcher.max_request_bytes
        if len(data) > max_bytes:
            raise _too_large(len(data), max_bytes, default_id)
        try:
            request = request_decoder.decode(data)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise _undecodable(data, exc, default_id) from None
        request_id = request.id or default_id or self._ids.next()
        route_name = request.route if request.targets is None else None
        if self.aliased and route_name in self.aliased:  # no aliases: no lookup
            route_name = self.aliased[route_name]

        try:  # the helpers raise _Refused, which knows neither the request's id nor its route
            if arrived is None:
                arrived = time.monotonic()
            if request.timeout_s is None and request.deadline_unix_ms is None:
                # The default timeout, from arrival: _deadline's common case, without its call.
                deadline = Deadline(arrived + self.config.dispatcher.default_timeout_s)
            else:
                deadline = self._deadline(request, arrived)
            # The common request, a configured route without groups and without a max_attempts
            # of its own, decided here; the helpers for the rest (a method call costs about
            # 700 instructions here, counted: these three were a sixth of the plan).
            route = self.routes.get(request.route) if request.targets is None else None
            if route is None:  # the request's own targets, or an unknown route (refused)
                route = self._resolve(request)
            chain = route.chain if route.groups is None else self._chain_for_request(route)
            fallback_on = route.fallback_on
            if request.fallback_on is not None:
                fallback_on = self._narrowed(request.fallback_on, fallback_on)
            max_attempts = (
                route.max_attempts
                if request.max_attempts is None
                else self._max_attempts(request, route)
            )
            try:
                validate = output_validator(request)
            except ValueError as exc:
                raise _Refused(str(exc)) from None
            images = tool_results = False  # a plain loop: a generator costs more
            for message in request.messages:
                if message.role == "tool":
                    tool_results = True
                elif not images and type(message.content) is not str and message.images:
                    images = True
            if (
                tool_results
                and (unanswered := _unmatched_tool_result(request.messages)) is not None
            ):
                # Every provider refuses one (a 400 from each target, then all_failed): it is the
                # client's mistake, refused here before any call, naming the message.
                raise _Refused(
                    "invalid request: a tool message answers a call of an earlier assistant "
                    "message by its id, and no call before it has this tool_call_id - at "
                    f"`$.messages[{unanswered}].tool_call_id`"
                )
            faults = self._faults(request.faults, chain) if request.faults else None
            needs = NO_NEEDS
            json = request.response_format is not None and wants_json(request.response_format)
            if route.counts_tokens or json or request.tools or images:
                tokens, shaped = None, None
                if route.counts_tokens:  # some target declares max_input_tokens
                    tokens = estimate_tokens(request.messages, request.tools)
                    if self.config.templates or request.tools:  # a target's own template, or
                        # its drop = ["tools"], makes its input other than the request's
                        shaped = _ShapedEstimates(request.messages, request.tools)
                choice = request.tool_choice
                must_call = choice == "required" or isinstance(choice, NamedTool)
                needs = Needs(tokens, json, bool(request.tools), images, shaped, must_call)
            limits = Limits(
                deadline,
                max_attempts,
                fallback_on,
                request.fallback,
                route.hedge,
                route.budgets if faults is None else self.fault_budgets,
                request.on_midstream or route.on_midstream,
            )
            return Plan(request, request_id, route_name, chain, limits, needs, validate, faults)
        except _Refused as refused:
            raise Rejected(refused.error_type, refused.message, request_id, route_name) from None

    def _max_attempts(self, request: CompletionRequest, route: _Route) -> int:
        ceiling = self.config.dispatcher.max_attempts
        if request.max_attempts is None:
            return route.max_attempts
        if request.max_attempts > ceiling:
            raise _Refused(
                f"max_attempts {request.max_attempts} is above this dispatcher's maximum of "
                f"{ceiling}"
            )
        return request.max_attempts

    def _deadline(self, request: CompletionRequest, arrived: float) -> Deadline:
        """timeout_s after the request arrived (or the default), or its deadline_unix_ms when
        that comes sooner; neither may be further away than max_timeout_s."""
        limits = self.config.dispatcher
        timeout_s = request.timeout_s
        if timeout_s is not None and timeout_s > limits.max_timeout_s:
            raise _Refused(
                f"timeout_s {timeout_s:g} is above this dispatcher's maximum of "
                f"{limits.max_timeout_s:g}"
            )
        if request.deadline_unix_ms is None:  # Deadline.after, without its call (per request)
            return Deadline(
                arrived + (limits.default_timeout_s if timeout_s is None else timeout_s)
            )
        deadline = Deadline.at_unix_ms(request.deadline_unix_ms)
        left_s = deadline.left_s()
        if left_s <= 0:
            raise _Refused(
                f"deadline_unix_ms passed {-left_s * 1000:.0f} ms before the dispatcher got the "
                "request, by its clock; no target was tried (if the request was sent in time, "
                "the two clocks disagree: timeout_s counts from arrival and needs none)",
                DEADLINE_EXCEEDED,
            )
        if left_s > limits.max_timeout_s:
            raise _Refused(
                f"deadline_unix_ms is {left_s:.0f} s away, above this dispatcher's maximum of "
                f"{limits.max_timeout_s:g} s"
            )
        return (
            deadline if timeout_s is None else deadline.sooner(Deadline.after(timeout_s, arrived))
        )

    def _resolve(self, request: CompletionRequest) -> _Route:
        if request.targets is None:
            route = self.routes.get(request.route)
            if route is None:
                known = f"configured routes: {sorted(self.config.routes)}"
                if not self.config.routes:  # a plug-in's config of providers: targets is the way
                    known = f"no route is configured: name one of {sorted(self.named)} in targets"
                if self.aliased:
                    known += f"; model aliases: {sorted(self.aliased)}"
                raise _Refused(f"unknown route {request.route!r}; {known}", UNKNOWN_ROUTE)
            return route
        if not request.targets:
            raise _Refused(
                f"targets is empty; name at least one of {sorted(self.named)}", UNKNOWN_PROVIDER
            )
        targets = []
        seen: dict[str, list[tuple[TargetSpec, int]]] = {}  # name -> its specs, where listed
        for i, ref in enumerate(request.targets):
            if isinstance(ref, str):
                if ref not in self.named:
                    raise _Refused(
                        f"targets[{i}]: unknown target or provider {ref!r}; configured: "
                        f"{sorted(self.named)}",
                        UNKNOWN_PROVIDER,
                    )
                _listed_once(self.config.resolve_target(ref), i, seen)
                targets.append(self.named[ref])
                continue
            if ref.breaker is not None:
                raise _Refused(
                    f"targets[{i}].breaker: circuit breakers are set in the config, not per request"
                )
            try:
                spec = self.config.resolve_target(ref)
            except ValueError as exc:
                field = getattr(exc, "field", "")
                raise _Refused(
                    f"targets[{i}]{'.' + field if field else ''}: {exc}",
                    UNKNOWN_PROVIDER if field == "provider" else INVALID_REQUEST,
                ) from None
            _listed_once(spec, i, seen)
            target = self.build(spec)
            provider_timeout_s = self.config.providers[spec.provider].timeout_s
            if (
                (spec.timeout_s is not None and spec.timeout_s < provider_timeout_s)
                or spec.ttft_s is not None
                or spec.idle_s is not None
            ):  # its timeouts are the request's doing: they must not open a shared breaker
                target = dataclasses.replace(target, own_limits=True)
            if target.model not in self.models[target.provider]:
                # A model the config never names: its health is the provider's one shared entry.
                target = dataclasses.replace(
                    target, health_key=HealthKey(target.provider, ADHOC_MODEL)
                )
            targets.append(target)
        return self._route(
            targets,
            self.default_by_kind,
            None,
            self.config.dispatcher.max_attempts,
            None,
            self.request_budgets,
        )

    @staticmethod
    def _narrowed(
        asked: list[str | int], allowed: Collection[str | int] | None
    ) -> frozenset[str | int]:
        for entry in asked:
            problem = kind_or_status_problem(entry)
            if problem is not None:
                raise _Refused(f"fallback_on: {problem}")
            if allowed is not None and entry not in allowed:
                raise _Refused(
                    f"fallback_on: {entry!r} is not in the route's fallback_on "
                    f"({sorted(map(str, allowed))}); "
                    "a request can only narrow it"
                )
        return frozenset(asked)

    def _faults(self, faults, chain: Chain) -> dict[str, tuple[Fault, ...]]:
        if not self.config.dispatcher.allow_fault_injection:
            raise _Refused(
                "this dispatcher does not accept faults; set dispatcher.allow_fault_injection = "
                "true "
                "in a test or staging config (never in production)"
            )
        every = [*chain.targets, *(t for c in chain.by_kind.values() for t in c)]
        names = {t.name for t in every} | {t.provider for t in every}
        unknown = sorted(set(faults) - names)
        if unknown:
            raise _Refused(
                f"faults name {unknown}, which are not targets of this request (targets: "
                f"{sorted(names)})"
            )
        try:
            return check_faults(faults)
        except ValueError as exc:
            raise _Refused(str(exc)) from None


def _too_large(size: int, max_bytes: int, default_id: str) -> Rejected:
    """A request above dispatcher.max_request_bytes, refused unread."""
    return Rejected(
        PAYLOAD_TOO_LARGE,
        f"request is {size} bytes; this dispatcher accepts at most {max_bytes} "
        "(dispatcher.max_request_bytes in the config)",
        default_id,
    )


def _undecodable(data: bytes, exc: Exception, default_id: str) -> Rejected:
    """Why `data` is not a request (schemas.wire.not_a_request), carrying its id as far as it
    can be read (else the id it came with: a job's Nats-Msg-Id)."""
    return Rejected(INVALID_REQUEST, not_a_request(exc, data), salvage_id(data) or default_id)


def _listed_once(spec: TargetSpec, i: int, seen: dict[str, list[tuple[TargetSpec, int]]]) -> None:
    """As in a configured chain (config._listed_once): a target named again would be called
    again at once, past its retry_on, its backoff and the retry budget, so a request could
    send one provider in an outage max_attempts calls, and open its shared breaker alone."""
    name = spec.name or spec.provider
    for earlier, at in seen.setdefault(name, []):
        if earlier == spec:
            raise _Refused(
                f"targets[{i}]: target {name!r} is already in this chain (targets[{at}]); "
                "list it once, and for more calls to it give it `retries` (a second entry "
                "calls it again at once, past its retry_on, its backoff and the retry budget)"
            )
    seen[name].append((spec, i))


def _unmatched_tool_result(messages: Sequence[ChatMessage]) -> int | None:
    """The index of the first tool message whose tool_call_id no earlier assistant message's
    tool call has, if any."""
    called: set[str] | None = None  # made at the first call: most requests have none
    for i, message in enumerate(messages):
        role = message.role
        if role == "tool":
            if called is None or message.tool_call_id not in called:
                return i
        elif role == "assistant" and message.tool_calls:
            if called is None:
                called = set()
            called.update(call.id for call in message.tool_calls)
    return None
