"""Every way a call or a request can fail, in one place.

    a provider call (one attempt) fails with an error kind: ProviderFailure.kind on the wire,
    ProviderError(kind, ...) raised inside a worker
        timeout, rate_limit, server_error, connection        the provider is unwell: retried and
                                                              counted by breakers by default
                                                              (transient, as no_responders and
                                                              invalid_output are)
        quota                                                 the account's credit is spent:
                                                              counted by breakers, not retried
        auth, bad_request, context_length, content_filter    the request's (or the key's) fault
        response_too_large                                    the answer was too large to carry
        no_responders                                         no worker runs (dispatcher side), or
                                                              it stopped before it answered
        invalid_output                                        the answer failed response_format,
                                                              tools, tool_choice or fail_on_length
                                                              (dispatcher side)
    a target is passed over without a call: Attempt.reason, SKIP_REASONS
    a whole request fails: CompletionReply.error.type, REQUEST_ERRORS; what a resend can do
    about it: RESEND, resend_is_futile (the Python client raises each family as its own class)

Routes, targets and breakers name failures by kind or by HTTP status (`fallback_on`,
`retry_on`, `trip_on`); `kind_or_status_problem` is the one check of such an entry.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import NamedTuple


class Kind(NamedTuple):
    """One error kind of a provider call, with what Lifeline does about it by default."""

    name: str
    meaning: str
    # HTTP statuses that map to it (classify_status; else 5xx and 4xx rules).
    statuses: tuple[int, ...] = ()
    retried: bool = False  # in a target's default retry_on
    trips: bool = False  # in a breaker's default trip_on: it says the provider is unwell
    own_chain: bool = False  # a route may name a chain for it (<kind>_fallbacks)
    # A later call may not fail so: a chain failed on no such kind fails again, resent unchanged.
    transient: bool = False


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(
            "timeout",
            "no answer before the attempt's timeout, an HTTP timeout or 408, Anthropic's 504 "
            "timeout_error",
            statuses=(408,),
            retried=True,
            trips=True,
            transient=True,
        ),
        Kind(
            "rate_limit",
            "HTTP 429 (the provider's Retry-After comes as retry_after_s), or a worker at its "
            "max_in_flight or out of file descriptors",
            statuses=(429,),
            retried=True,
            trips=True,
            transient=True,
        ),
        Kind(
            "server_error",
            "HTTP 5xx (every other 5xx status), Anthropic's 529, an unparseable 200, a redirect "
            "(3xx: not followed, so that the key goes nowhere else)",
            retried=True,
            trips=True,
            transient=True,
        ),
        Kind(
            "connection",
            "the provider could not be reached",
            retried=True,
            trips=True,
            transient=True,
        ),
        Kind(
            "quota",
            "the account's quota or credit is spent: OpenAI's 429 insufficient_quota, "
            "HTTP 402 (Anthropic's billing_error, or its 400 saying so); retrying cannot help, "
            "another provider can",
            statuses=(402,),
            trips=True,
        ),
        Kind("auth", "HTTP 401, 403", statuses=(401, 403)),
        Kind("bad_request", "HTTP 4xx (every other 4xx status)"),
        Kind(
            "context_length",
            "the input is too long for the model (the provider's error code, Anthropic's 413 "
            "or request_too_large)",
            own_chain=True,
        ),
        Kind("content_filter", "the provider withheld the answer", own_chain=True),
        Kind(
            "response_too_large",
            "the answer is over max_response_bytes, or its reply would not fit max_payload",
        ),
        Kind(
            "no_responders",
            "no worker is running for the provider (dispatcher side), or the one running the "
            "call stopped before it answered: falls back at once",
            transient=True,
        ),
        Kind(
            "invalid_output",
            "the answer failed the request's response_format, tools, tool_choice or "
            "fail_on_length (dispatcher side)",
            transient=True,  # a model draws its answer anew: the next may fit
        ),
    )
}

ERROR_KINDS = tuple(KINDS)
DEFAULT_RETRY_ON = frozenset(k.name for k in KINDS.values() if k.retried)
DEFAULT_TRIP_ON = frozenset(k.name for k in KINDS.values() if k.trips)
CHAIN_KINDS = tuple(k.name for k in KINDS.values() if k.own_chain)


_BY_STATUS = {status: kind.name for kind in KINDS.values() for status in kind.statuses}


# A call given less than this share of its timeout_s was cut short by its request's deadline.
WHOLE_TIMEOUT_SHARE = 0.95


def timeout_message(name: str, timeout_s: float, own_timeout_s: float) -> str:
    """What a call that got no answer within `timeout_s` says, in the same words whether the
    dispatcher's timer or the worker's fired first: the target's own timeout when the call had
    (nearly) all of it, else the time its request's deadline left it."""
    if timeout_s >= own_timeout_s * WHOLE_TIMEOUT_SHARE:
        return f"{name} did not answer within its {own_timeout_s:g} s timeout"
    return (
        f"{name} did not answer within the {timeout_s:.3g} s left before its deadline "
        f"(its own timeout is {own_timeout_s:g} s)"
    )


def classify_status(status_code: int) -> str:
    """HTTP error status -> error kind, the one mapping every worker and the dispatcher share:
    the statuses in KINDS, then any other 4xx is a bad_request and anything else (5xx, and a
    3xx: the endpoint is elsewhere, not the request at fault) a server_error."""
    return _BY_STATUS.get(status_code) or (
        "bad_request" if 400 <= status_code < 500 else "server_error"
    )


def kind_or_status_problem(entry: object) -> str | None:
    """What is wrong with one entry of fallback_on, retry_on or trip_on, or None when it is an
    error kind or an HTTP error status."""
    if isinstance(entry, int) and not isinstance(entry, bool):
        return (
            None
            if 400 <= entry <= 599
            else f"status {entry} is not an HTTP error status (400..599)"
        )
    if isinstance(entry, str) and entry in KINDS:
        return None
    known = ", ".join(ERROR_KINDS)
    close = difflib.get_close_matches(entry, ERROR_KINDS, n=1) if isinstance(entry, str) else []
    if close:  # as an unknown key is answered (service/config.py)
        return f"unknown error kind {entry!r} (did you mean {close[0]!r}?); known: {known}"
    return f"unknown error kind {entry!r} (known: {known})"


# The longest wait a failed call may ask for (retry_after_s), as long as a breaker's longest
# cooldown (service.health.COOLDOWN_MAX_S): a Retry-After of years (a date in 9999, 1e306 s)
# is passed on as this, so no client is told to wait years and no figure overflows.
RETRY_AFTER_MAX_S = 3600.0


def bounded_retry_after(seconds: float) -> float | None:
    """A Retry-After in seconds as a failure carries it: at most RETRY_AFTER_MAX_S, None for
    one that is no wait (nan, inf, negative)."""
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, RETRY_AFTER_MAX_S)


class ProviderError(Exception):
    """A provider call failed in a way the dispatcher may fall back on: what a provider raises,
    and what a worker answers as a ProviderFailure (schemas.wire) with the same fields."""

    def __init__(
        self,
        kind: str,
        message: str,
        status_code: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status_code = status_code
        self.retry_after_s = retry_after_s


# Why a target was passed over without a call (Attempt.reason when outcome is "skipped").
SKIP_REASONS = (
    "max_input_tokens",  # the estimated input is longer than the target's max_input_tokens
    "json_output",  # the request wants JSON and the target declares json_output = false
    "tools",  # the request offers tools and the target declares tools = false
    "vision",  # the request has images and the target declares vision = false
    "deadline",  # the request's deadline left no time to start it
    "max_attempts",  # the request's cap on physical attempts was reached
    "circuit_open",  # the target's circuit breaker is open (still called if it is the last left)
)

# Why a failed attempt was not retried although its target's retries allowed it (Attempt.reason),
# and why a cancelled attempt was cancelled:
#   retry_budget   the route's retry budget was spent: the dispatcher fell back instead
#   retry_after    the provider's Retry-After is above the target's max_backoff_s
#   deadline       the wait before the retry would end after the request's deadline
#   circuit_open   the target's breaker is not closed (this failure may have opened it)
#   hedge_lost     a hedged attempt's rival answered first; this one was cancelled at its worker
#                  (on an `ok` attempt: both answered in the same turn, the rival was served)
#   aborted, shutting_down   still running when its request was aborted or cut short at
#                  shutdown (the request's error type); cancelled at its worker
RETRY_BUDGET = "retry_budget"
HEDGE_LOST = "hedge_lost"

# Why a whole request failed (CompletionReply.error.type).
ALL_FAILED = "all_failed"  # every target was tried and failed
FALLBACK_STOPPED = "fallback_stopped"  # a failure outside the route's fallback_on ended the chain
# The request's timeout_s ran out before a target could start.
DEADLINE_EXCEEDED = "deadline_exceeded"
INVALID_REQUEST = "invalid_request"  # malformed JSON, wrong types, empty messages, ...
# The request (or what it becomes for a worker) does not fit.
PAYLOAD_TOO_LARGE = "payload_too_large"
# An answer came, but the reply carrying it would not fit max_payload.
REPLY_TOO_LARGE = "reply_too_large"
# The dispatcher is at dispatcher.max_in_flight; retry after error.retry_after_s.
OVERLOADED = "overloaded"
# The reply subject is inside Lifeline's or the server's namespace.
REPLY_SUBJECT_REFUSED = "reply_subject_refused"
UNKNOWN_ROUTE = "unknown_route"
UNKNOWN_PROVIDER = "unknown_provider"
# Every target was skipped by a capability check; none was called.
NO_CAPABLE_TARGET = "no_capable_target"
MAX_ATTEMPTS_REACHED = "max_attempts_reached"  # the cap on physical attempts ended the chain
INTERNAL = "internal"  # a bug in Lifeline; the message says what to report
# On llm.stream, an attempt failed after its first chunks reached the client and the request's
# (or route's) on_midstream is "fail".
MIDSTREAM_FAILED = "midstream_failed"
# The dispatcher was stopped and its shutdown grace ran out before the request was answered;
# its attempts were cancelled at their workers.
SHUTTING_DOWN = "shutting_down"
# Its client aborted it (llm.abort) before it was answered; its attempts were cancelled at their
# workers. The reply still goes out (nobody may read it) and the audit event says so.
ABORTED = "aborted"

REQUEST_ERRORS = (
    ALL_FAILED,
    FALLBACK_STOPPED,
    DEADLINE_EXCEEDED,
    INVALID_REQUEST,
    PAYLOAD_TOO_LARGE,
    REPLY_TOO_LARGE,
    OVERLOADED,
    REPLY_SUBJECT_REFUSED,
    UNKNOWN_ROUTE,
    UNKNOWN_PROVIDER,
    NO_CAPABLE_TARGET,
    MAX_ATTEMPTS_REACHED,
    INTERNAL,
    MIDSTREAM_FAILED,
    SHUTTING_DOWN,
    ABORTED,
)
# The request errors worth sending again as they are, after error.retry_after_s: the dispatcher
# that answered could not take the request (or not finish it); another one, or a later
# moment, can. Clients, the HTTP gateway and the integrations resend (or say to) on these.
RESEND = frozenset({OVERLOADED, SHUTTING_DOWN})
# The request errors no resend cures: sent again unchanged, the request gets the same answer.
REFUSED = frozenset(
    {
        INVALID_REQUEST,
        PAYLOAD_TOO_LARGE,
        REPLY_TOO_LARGE,
        REPLY_SUBJECT_REFUSED,
        UNKNOWN_ROUTE,
        UNKNOWN_PROVIDER,
        NO_CAPABLE_TARGET,
    }
)
# The request errors of a chain that ran and failed: final or not by its calls' kinds.
CHAIN_FAILED = frozenset({ALL_FAILED, FALLBACK_STOPPED, MAX_ATTEMPTS_REACHED, MIDSTREAM_FAILED})


def resend_is_futile(
    error_type: str, failed_kinds: Iterable[str | None], skip_reasons: Iterable[str | None] = ()
) -> bool:
    """Whether a request that failed with `error_type` fails again if sent unchanged: an error in
    REFUSED, or a chain (CHAIN_FAILED) whose every call failed on a kind that is not transient
    (the providers refused it: bad_request, context_length, auth, ...) and that skipped no
    target for an open breaker (which closes)."""
    if error_type in REFUSED:
        return True
    kinds = list(failed_kinds)
    return (
        error_type in CHAIN_FAILED
        and bool(kinds)
        and all(kind in KINDS and not KINDS[kind].transient for kind in kinds)
        and "circuit_open" not in skip_reasons
    )
