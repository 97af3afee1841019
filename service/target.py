"""A target: one provider and model with its settings, as the policy and the dispatcher use it.

Config entries (`[targets.<name>]`, inline tables in a route, a request's own targets) are
resolved once, in service/routing.py, into this frozen value. A target has two identities,
kept apart on purpose:

    name        what the route calls it: replies (`target`), attempts, the request span and the
                attempt spans (`lifeline.target`), `faults`. Unique within a config.
    health_key  (provider, model): what its circuit breaker and recent figures are kept under,
                in `lifeline status`, the metrics and the attempt spans (`lifeline.health_key`).
                Two named targets on one model share it, since the model behind them is one;
                every model the config never names shares the provider's one key
                (`<provider>:*`, health.ADHOC_MODEL), so made-up names cannot grow health.

Pure: no NATS, no HTTP, no telemetry.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import NamedTuple

from schemas.errors import DEFAULT_RETRY_ON
from service.health import BreakerSettings
from service.shaping import Shaping


class HealthKey(NamedTuple):
    provider: str
    model: str

    def __str__(self) -> str:
        return f"{self.provider}:{self.model}"


_DERIVED = HealthKey("", "")  # health_key's default: (provider, model)


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    name: str  # the target's name in replies, attempts, spans and faults
    provider: str  # the provider's name in the config, also its subject token
    kind: str  # the provider's kind: openai, anthropic, fake, ...
    model: str
    timeout_s: float
    health_key: HealthKey = _DERIVED  # see the module docstring; (provider, model) by default
    retries: int = 0
    retry_on: Collection[str | int] = DEFAULT_RETRY_ON
    backoff_s: float = 0.25
    max_backoff_s: float = 10.0
    max_input_tokens: int | None = None
    json_output: bool = True
    tools: bool = True  # it can call tools (false: skipped for a request with tools)
    vision: bool = True  # it can read images (false: skipped for a request with images)
    pass_failures: bool = False
    weight: float = 1.0  # share within a load-balanced group (routing orders groups per request)
    breaker: BreakerSettings | None = None  # None: no circuit breaker
    shaping: Shaping | None = None  # the target's own model, parameters and template
    # Streaming: a first chunk within ttft_s, then one at least every idle_s (None: no limit
    # but timeout_s); prefill: it can continue a partial answer (on_midstream = "continue").
    ttft_s: float | None = None
    idle_s: float | None = None
    prefill: bool = False
    # Its provider's max_response_bytes: past it the dispatcher stops a stream itself, whatever
    # the worker (one in another language may not stop), as its memory holds the text.
    max_response_bytes: int | None = None
    # A request's own target whose time limits (a timeout_s under its provider's, a ttft_s or
    # an idle_s) the request chose: its timeouts are the client's doing, not the provider's
    # health, so they never count toward the shared circuit breaker.
    own_limits: bool = False

    def __post_init__(self) -> None:
        if self.health_key is _DERIVED:
            object.__setattr__(self, "health_key", HealthKey(self.provider, self.model))
