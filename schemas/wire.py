"""Wire contract v1: the JSON messages on Lifeline's subjects, as msgspec Structs.

Every field added after v1 must have a default, so old senders stay valid
(msgspec's schema-evolution rules). Encoders and decoders are built once, here.

    client     --CompletionRequest-->  llm.complete        --CompletionReply--> reply subject
    dispatcher --ProviderRequest---->  llm.provider.<name> --ProviderOk | ProviderFailure-->
    dispatcher --AuditEvent--------->  llm.audit.<status>
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

Role = Literal["system", "user", "assistant"]

# What a provider call can fail with. Workers map HTTP statuses and transport errors
# to these; the dispatcher adds "no_responders" (no worker is running).
ERROR_KINDS = (
    "timeout",
    "rate_limit",
    "server_error",
    "auth",
    "bad_request",
    "context_length",
    "content_filter",
    "connection",
    "no_responders",
)

# Why a whole request failed (CompletionReply.error.type).
ALL_FAILED = "all_failed"  # every target was tried and failed
FALLBACK_STOPPED = "fallback_stopped"  # a failure outside the route's fallback_on ended the chain
DEADLINE_EXCEEDED = "deadline_exceeded"  # the request's timeout_s ran out before a target could start
INVALID_REQUEST = "invalid_request"  # malformed JSON, wrong types, empty messages, ...
PAYLOAD_TOO_LARGE = "payload_too_large"
UNKNOWN_ROUTE = "unknown_route"
UNKNOWN_PROVIDER = "unknown_provider"
INTERNAL = "internal"  # a bug in Lifeline; the message says what to report


class ChatMessage(Struct, frozen=True):
    role: Role
    content: str


class CompletionRequest(Struct, frozen=True):
    """What a client sends to llm.complete."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    id: str = ""
    route: str = "default"
    targets: list[str] | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    timeout_s: Annotated[float, Meta(gt=0)] | None = None
    metadata: dict[str, Any] = {}


class Usage(Struct, frozen=True):
    input_tokens: int = 0
    output_tokens: int = 0


class Attempt(Struct, frozen=True):
    """One call of one target, as the client, the audit and the trace see it."""

    provider: str
    model: str
    outcome: Literal["ok", "timeout", "no_responders", "error"]
    latency_ms: float
    error_type: str | None = None
    status_code: int | None = None
    message: str | None = None


class ErrorInfo(Struct, frozen=True):
    type: str
    message: str


class CompletionReply(Struct, frozen=True):
    """What the client gets back on its reply subject, success or not."""

    id: str
    status: Literal["ok", "error"]
    content: str | None = None
    provider: str | None = None
    model: str | None = None
    attempts: list[Attempt] = []
    usage: Usage | None = None
    latency_ms: float = 0.0
    trace_id: str | None = None
    error: ErrorInfo | None = None


class AuditEvent(Struct, frozen=True):
    """One per request on llm.audit.<status>. Never carries prompt, answer or credentials."""

    id: str
    status: Literal["ok", "error"]
    route: str | None
    provider: str | None
    model: str | None
    attempts: list[Attempt]
    latency_ms: float
    trace_id: str | None
    ts_unix_ms: int
    error_type: str | None = None
    usage: Usage | None = None
    request_bytes: int = 0


# ---- dispatcher <-> provider worker -------------------------------------------------


class ProviderRequest(Struct, frozen=True):
    """What the dispatcher sends to llm.provider.<name>."""

    id: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    temperature: float | None = None
    model: str | None = None  # overrides the worker's configured model when set
    metadata: dict[str, Any] = {}


class ProviderOk(Struct, frozen=True, tag_field="status", tag="ok"):
    content: str
    model: str
    usage: Usage = Usage()
    latency_ms: float = 0.0


class ProviderFailure(Struct, frozen=True, tag_field="status", tag="error"):
    kind: str  # one of ERROR_KINDS
    message: str
    status_code: int | None = None
    retry_after_s: float | None = None
    latency_ms: float = 0.0


ProviderReply = ProviderOk | ProviderFailure


encoder = msgspec.json.Encoder()
request_decoder = msgspec.json.Decoder(CompletionRequest)
reply_decoder = msgspec.json.Decoder(CompletionReply)
audit_decoder = msgspec.json.Decoder(AuditEvent)
provider_request_decoder = msgspec.json.Decoder(ProviderRequest)
provider_reply_decoder = msgspec.json.Decoder(ProviderReply)


class _IdOnly(Struct):
    id: str = ""


_id_decoder = msgspec.json.Decoder(_IdOnly)


def salvage_id(data: bytes) -> str:
    """The request id of a message that failed full validation, if it has a readable one."""
    try:
        return _id_decoder.decode(data).id
    except msgspec.DecodeError:
        return ""
