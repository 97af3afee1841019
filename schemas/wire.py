"""Wire contract v1: the JSON messages on Lifeline's subjects, as msgspec Structs.

Every field added after v1 must have a default, so old senders stay valid
(msgspec's schema-evolution rules). Encoders and decoders are built once, here.

    client     --CompletionRequest-->  llm.complete        --CompletionReply--> reply subject
    client     --CompletionRequest-->  llm.stream          --events (schemas/streaming.py)-->
    dispatcher --ProviderRequest---->  llm.provider.<name> --ProviderOk | ProviderFailure-->
    dispatcher --AuditEvent--------->  llm.audit.<status>
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from schemas.deadline import MIN_CALL_S

# The error kinds and request error types live in schemas.errors; re-exported here, where
# the messages that carry them are defined.
from schemas.errors import (  # noqa: F401
    ABORTED,
    ALL_FAILED,
    DEADLINE_EXCEEDED,
    ERROR_KINDS,
    FALLBACK_STOPPED,
    HEDGE_LOST,
    INTERNAL,
    INVALID_REQUEST,
    MAX_ATTEMPTS_REACHED,
    MIDSTREAM_FAILED,
    NO_CAPABLE_TARGET,
    OVERLOADED,
    PAYLOAD_TOO_LARGE,
    REPLY_SUBJECT_REFUSED,
    REPLY_TOO_LARGE,
    RETRY_BUDGET,
    SHUTTING_DOWN,
    SKIP_REASONS,
    UNKNOWN_PROVIDER,
    UNKNOWN_ROUTE,
    classify_status,
)

# "developer" is OpenAI's newer name for system instructions; a provider without it gets it as
# a system message. A "tool" message answers one tool call, by tool_call_id.
Role = Literal["system", "user", "assistant", "tool", "developer"]
# What a streamed request does when an attempt fails after its chunks reached the client:
# "reset" them and stream the next target from the start, let the next target "continue"
# from them (targets with prefill = true; others reset), or "fail" the request.
OnMidstream = Literal["reset", "continue", "fail"]


class TextPart(Struct, frozen=True, tag_field="type", tag="text"):
    text: str


class ImagePart(Struct, frozen=True, tag_field="type", tag="image", omit_defaults=True):
    """An image by URL, or inline as base64 `data` with its `media_type` (image/png, ...);
    `detail` is OpenAI's resolution hint (providers without one ignore it)."""

    url: str | None = None
    data: str | None = None
    media_type: str | None = None
    detail: Literal["auto", "low", "high"] | None = None

    def __post_init__(self) -> None:
        if (self.url is None) == (self.data is None):
            raise ValueError("an image part needs exactly one of url and data")
        if self.data is not None and not (self.media_type or "").startswith("image/"):
            raise ValueError("an image part with data needs its media_type, e.g. image/png")


# An image inline as a data: URL, OpenAI's form (data:image/png;base64,...): its media type
# and base64 data. The gateway reads OpenAI's image_url parts with it, and a worker whose API
# takes inline images otherwise (Anthropic's base64 source) a URL part in this form.
DATA_URL = re.compile(
    r"data:(?P<type>[\w.+-]+/[\w.+-]+)(?:;[^,;]*)*;base64,(?P<data>.*)", re.DOTALL
)

Part = TextPart | ImagePart


class ToolCall(Struct, frozen=True):
    """A call the model asks for: `arguments` is a JSON object, encoded (as OpenAI sends it)."""

    id: str
    name: str
    arguments: str = "{}"


class ToolCallDelta(Struct, frozen=True, omit_defaults=True):
    """A piece of a tool call as it streams: call `index`'s first piece has its id and name;
    the pieces' `arguments` joined are the call's arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


def delta_bytes(delta: str | ToolCallDelta) -> int:
    """What a delta counts against a provider's max_response_bytes: a text's UTF-8 bytes; a
    tool-call piece's arguments, name and id (not its JSON framing); at least 1, so that
    endless empty pieces are bounded too. Workers and the dispatcher count the same way, so
    a worker within the bound is never cut by either."""
    if isinstance(delta, str):
        return len(delta.encode()) or 1
    return len(delta.arguments.encode()) + len(delta.name or "") + len(delta.id or "") or 1


class ChatMessage(Struct, frozen=True, omit_defaults=True):
    role: Role
    # A string, or parts (text and images); an assistant message with tool_calls may have none.
    content: str | list[Part] | None = ""
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it asked for
    tool_call_id: str | None = None  # tool: the call this message answers

    def __post_init__(self) -> None:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")

    @property
    def text(self) -> str:
        """The message's text: its string, or its text parts joined (images left out)."""
        content = self.content
        if content is None or isinstance(content, str):
            return content or ""
        return "".join(part.text for part in content if isinstance(part, TextPart))

    @property
    def images(self) -> int:
        content = self.content
        if content is None or isinstance(content, str):
            return 0
        return sum(1 for part in content if isinstance(part, ImagePart))


# What the __post_init__ checks above enforce, and the rules a dispatcher checks whatever its
# config when it plans a request (service.shaping.output_validator), said in JSON Schema for
# other languages: msgspec's schemas cannot carry them, so service/wire_spec.py adds these to
# the definitions. (A named tool_choice must name one of the request's tools: no JSON Schema
# says that; NamedTool's description does.)
SCHEMA_RULES: dict[str, dict[str, Any]] = {
    "ImagePart": {
        "oneOf": [
            {"required": ["url"], "properties": {"url": {"type": "string"}}},
            {"required": ["data"], "properties": {"data": {"type": "string"}}},
        ],
        "if": {"required": ["data"], "properties": {"data": {"type": "string"}}},
        "then": {
            "required": ["media_type"],
            "properties": {"media_type": {"type": "string", "pattern": "^image/"}},
        },
    },
    "ChatMessage": {
        "if": {"required": ["role"], "properties": {"role": {"const": "tool"}}},
        "then": {
            "required": ["tool_call_id"],
            "properties": {"tool_call_id": {"type": "string", "minLength": 1}},
        },
    },
    "ResponseFormat": {
        "allOf": [
            {
                "if": {"required": ["type"], "properties": {"type": {"const": "json_schema"}}},
                "then": {
                    "required": ["json_schema"],
                    "properties": {"json_schema": {"type": "object"}},
                },
            },
            {
                "if": {"required": ["type"], "properties": {"type": {"const": "regex"}}},
                "then": {
                    "required": ["pattern"],
                    "properties": {"pattern": {"type": "string", "minLength": 1}},
                },
            },
        ]
    },
    "CompletionRequest": {  # "required" or a named tool needs tools to call
        "if": {
            "required": ["tool_choice"],
            "properties": {"tool_choice": {"anyOf": [{"const": "required"}, {"type": "object"}]}},
        },
        "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}},
    },
}
# Fields of a Struct shared with the config that only the config may set, with why: the wire's
# schema allows them only null (as msgspec encodes a TargetSpec's defaults) or left out, since
# service.routing refuses a request that sets one.
CONFIG_ONLY: dict[str, dict[str, str]] = {
    "TargetSpec": {
        "breaker": "circuit breakers are set in the config, not per request: null or left out"
    }
}


class Tool(Struct, frozen=True, omit_defaults=True):
    """A function the model may call; `parameters` is its JSON Schema (an object schema)."""

    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}(?!\n)$")]
    description: str | None = None
    parameters: dict[str, Any] = {}


class NamedTool(Struct, frozen=True):
    """tool_choice naming one tool: the model must call that one. It must be one of the
    request's tools: a request naming another is refused (invalid_request)."""

    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}(?!\n)$")]  # as Tool's


# "auto": the model decides; "none": no tool call; "required": at least one; or one named tool.
ToolChoice = Literal["auto", "none", "required"] | NamedTool
# Normalised across providers: why the model stopped.
FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


Temperature = Annotated[float, Meta(ge=0, le=2)]
TopP = Annotated[float, Meta(ge=0, le=1)]
MaxTokens = Annotated[int, Meta(ge=1)]
# An HTTP error status, as the schema says it: the rule is checked when a request is planned
# (schemas.errors.kind_or_status_problem), not by the decoder.
HttpErrorStatus = Annotated[int, Meta(extra_json_schema={"minimum": 400, "maximum": 599})]
# An error kind (ERROR_KINDS) or an HTTP error status, as in fallback_on and retry_on.
KindOrStatus = (
    Annotated[str, Meta(max_length=64, extra_json_schema={"enum": list(ERROR_KINDS)})]
    | HttpErrorStatus
)
# A worker's error kind, as the contract (and the schema) says it: the dispatcher decodes any
# string and takes one not in ERROR_KINDS as a server_error (service.transport).
WorkerKind = Annotated[str, Meta(extra_json_schema={"enum": list(ERROR_KINDS)})]

# A route's, a target's, a provider's, a model's or a template's name. Each comes back in
# replies, attempts and audit events (and in the error that refuses it): bounded, so no name
# makes those larger than a NATS message may be.
MAX_NAME_LENGTH = 256
Name = Annotated[str, Meta(max_length=MAX_NAME_LENGTH)]
# The names a config gives its routes, providers, targets and templates (service/config.py),
# which requests and subjects carry: letters, digits, '_' and '-'. (?!\n): no "name\n".
CONFIG_NAME = re.compile(rf"^[A-Za-z0-9_-]{{1,{MAX_NAME_LENGTH}}}(?!\n)$")
# What a worker's failure message may carry into replies, audit events and spans: its texts
# are untrusted input (its model name is bounded as a name).
MAX_MESSAGE_CHARS = 1000
# What a request may list (targets, fallback_on, faults): more than any chain needs, few
# enough that a reply listing an attempt or an error for each stays small.
MAX_LIST_LENGTH = 64
MAX_TOOLS = 128  # tools in one request, as OpenAI's Chat Completions allows


# The request parameters a target may drop (`drop = ["seed", "stop"]`): never sent to it.
DROPPABLE = (
    "temperature",
    "top_p",
    "max_tokens",
    "stop",
    "seed",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
)
# One of DROPPABLE, as the schema says it (the config's check, service.config, refuses others).
Droppable = Annotated[str, Meta(extra_json_schema={"enum": list(DROPPABLE)})]
# Those a target may set itself, and what dropping one leaves unsent besides: a target that
# sets one and drops it contradicts itself, as does one with tools = false (it skips every
# request with tools) that drops tools. service.config refuses them, and the schema so.
TARGET_SETS = ("temperature", "top_p", "max_tokens", "stop", "seed", "parallel_tool_calls")
UNSENT_WITH = {"tools": ("parallel_tool_calls",)}


def _dropping(dropped: str, field: str, value: dict[str, Any]) -> dict[str, Any]:
    return {
        "required": [field, "drop"],
        "properties": {field: value, "drop": {"contains": {"const": dropped}}},
    }


SCHEMA_RULES["TargetSpec"] = {
    "not": {
        "anyOf": [
            *(
                _dropping(dropped, field, {"not": {"type": "null"}})
                for dropped in DROPPABLE
                for field in (dropped, *UNSENT_WITH.get(dropped, ()))
                if field in TARGET_SETS
            ),
            _dropping("tools", "tools", {"const": False}),
        ]
    }
}


class TargetSpec(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One step of a chain: a provider plus how to call it. Used in config and in requests.

    Parameters set here win over the request's: they exist because this model needs them.
    """

    provider: Name
    name: Name | None = None  # label in replies, attempts and faults; default: provider[:model]
    model: Name | None = None  # default: the provider's configured model
    temperature: Temperature | None = None
    max_tokens: MaxTokens | None = None
    top_p: TopP | None = None
    template: Name | None = None  # a [templates.<name>] of the config
    # default: the provider's timeout_s. Under MIN_CALL_S the config's check refuses it, with a
    # message saying why (a worker gets its deadline in whole milliseconds); the schema says so.
    timeout_s: Annotated[float, Meta(gt=0, extra_json_schema={"minimum": MIN_CALL_S})] | None = None
    # Capabilities, checked before any call.
    max_input_tokens: Annotated[int, Meta(ge=1)] | None = None
    json_output: bool = True
    tools: bool = True  # false: it cannot call tools, so a request with tools skips it
    vision: bool = True  # false: it cannot read images, so a request with images skips it
    # Retries on this target, before falling back.
    retries: Annotated[int, Meta(ge=0, le=10)] = 0
    retry_on: list[KindOrStatus] | None = (
        None  # default: rate_limit, server_error, timeout, connection
    )
    backoff_s: Annotated[float, Meta(ge=0, le=60)] = (
        0.25  # first retry's backoff; doubles, full jitter
    )
    max_backoff_s: Annotated[float, Meta(ge=0, le=300)] = (
        10.0  # a longer Retry-After falls back instead
    )
    # Opt in to get the error kinds of the attempts before this one in
    # metadata["lifeline_previous_errors"].
    pass_failures: bool = False
    # Its share within a load-balanced group (finite: weights are compared as shares).
    weight: Annotated[float, Meta(gt=0, le=1e9)] = 1.0
    # Circuit-breaker settings for this target, over the route's and [breaker]'s (config only;
    # checked against service.health.BreakerSettings at start-up).
    breaker: dict[str, Any] | None = None
    # Streaming only: no first chunk within ttft_s, or no chunk for idle_s once it streams, fails
    # the attempt as a timeout (None: only timeout_s bounds it).
    ttft_s: Annotated[float, Meta(gt=0, le=365 * 86_400.0)] | None = None  # a year at most
    idle_s: Annotated[float, Meta(gt=0, le=365 * 86_400.0)] | None = None
    # The model continues a partial answer given as a last assistant message (on_midstream =
    # "continue"); Anthropic's older models do, newer ones and OpenAI's do not.
    prefill: bool = False
    # Set here, they win over the request's (as temperature does).
    stop: list[str] | None = None
    seed: int | None = None
    parallel_tool_calls: bool | None = None
    # Request parameters never sent to this target (DROPPABLE), e.g. ["seed"].
    drop: list[Droppable] = []


class JsonSchemaFormat(Struct, frozen=True, omit_defaults=True):
    name: str
    schema: dict[str, Any] = {}
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """OpenAI's response_format, and Lifeline's "regex" (the whole answer must match
    `pattern`). An answer that does not parse, validate or match is an invalid_output
    failure."""

    type: Literal["text", "json_object", "json_schema", "regex"]
    json_schema: JsonSchemaFormat | None = None
    pattern: str | None = None  # for "regex": Python's re syntax, matched against the whole answer


# The metadata key under which a target with pass_failures gets the error kinds of the
# attempts before it (LangChain's exception_key), e.g. ["rate_limit", "timeout"].
PREVIOUS_ERRORS = "lifeline_previous_errors"

# A simulated failure for one target (see CompletionRequest.faults): "timeout", an error
# kind, "invalid_output" or an HTTP status; "ok" or null lets the real call through; on
# llm.stream, "<error kind or status> after N" (service.faults, which checks them).
Fault = (
    Annotated[
        str,
        Meta(
            max_length=64,
            extra_json_schema={
                "anyOf": [
                    {"enum": ["ok", *ERROR_KINDS]},
                    {
                        "pattern": "^(?:"
                        + "|".join(k for k in ERROR_KINDS if k != "timeout")
                        + r"|[45][0-9]{2}) after [0-9]+$"
                    },
                ]
            },
        ),
    ]
    | HttpErrorStatus
    | None
)


# A request id travels in the body, in a header and in every reply and audit event.
MAX_ID_LENGTH = 256
RequestId = Annotated[str, Meta(max_length=MAX_ID_LENGTH)]


class CompletionRequest(Struct, frozen=True, forbid_unknown_fields=True):
    """What a client sends to llm.complete (and to llm.stream, llm.jobs.submit). A field it
    does not know is refused, not ignored: a misspelt `max_token` must not pass unnoticed."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    id: RequestId = ""
    route: Name = "default"
    # Instead of the route's chain.
    targets: Annotated[list[Name | TargetSpec], Meta(max_length=MAX_LIST_LENGTH)] | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    timeout_s: Annotated[float, Meta(gt=0)] | None = None  # bounds the whole chain
    deadline_unix_ms: Annotated[int, Meta(gt=0)] | None = (
        None  # absolute; the earlier of the two wins
    )
    metadata: dict[str, Any] = {}
    response_format: ResponseFormat | None = None
    fallback: bool = True  # false: only the first target is tried (its own retries still apply)
    max_attempts: Annotated[int, Meta(ge=1)] | None = (
        None  # cap on physical attempts, at most the config's
    )
    # Narrows the route's fallback_on.
    fallback_on: Annotated[list[KindOrStatus], Meta(max_length=MAX_LIST_LENGTH)] | None = None
    # Per target name (or provider name): a Fault, or a list applied to its attempts in turn.
    # Refused unless the config sets dispatcher.allow_fault_injection.
    faults: (
        Annotated[
            dict[Name, Fault | Annotated[list[Fault], Meta(max_length=MAX_LIST_LENGTH)]],
            Meta(max_length=MAX_LIST_LENGTH),
        ]
        | None
    ) = None
    # On llm.stream: what a failure after the first chunk leads to (None: the route's, "reset").
    on_midstream: OnMidstream | None = None
    # OpenAI's own bound: each tool's parameters are compiled to check the calls against.
    tools: Annotated[list[Tool], Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None  # None: the provider's default ("auto" with tools)
    parallel_tool_calls: bool | None = None
    stop: list[str] | None = None  # stop sequences
    seed: int | None = None
    # An answer cut short by max_tokens (finish_reason "length") fails as invalid_output.
    fail_on_length: bool = False


# A count of tokens: never negative, and one any JSON reader holds exactly (JavaScript's
# largest safe integer; an OpenTelemetry attribute takes at most 2**63 - 1, and a larger one
# made a span exporter drop the attribute with a traceback).
TokenCount = Annotated[int, Meta(ge=0, le=2**53 - 1)]


class Usage(Struct, frozen=True):
    input_tokens: TokenCount = 0
    output_tokens: TokenCount = 0
    cached_input_tokens: TokenCount = 0  # of input_tokens, read from the provider's prompt cache
    reasoning_tokens: TokenCount = 0  # of output_tokens, spent on reasoning the answer hides


class Attempt(Struct, frozen=True):
    """One call of one target (or one target passed over), as the client, the audit and the
    trace see it."""

    provider: str
    model: str
    outcome: Literal["ok", "timeout", "no_responders", "error", "skipped", "cancelled"]
    latency_ms: float
    error_type: str | None = None
    status_code: int | None = None
    message: str | None = None
    target: str | None = None  # the target's name (differs from provider when a chain shapes it)
    retry: int = 0  # 0 for the first call of this target, 1 for its first retry, ...
    # Why it was skipped (SKIP_REASONS), not retried (retry_budget, ...) or cancelled (hedge_lost;
    # aborted or shutting_down: still running when its request was).
    reason: str | None = None
    next: Literal["retry", "fallback", "stop"] | None = (
        None  # what the dispatcher did after this failure
    )
    hedge: bool = False  # started as a hedge while the attempt before it was still running
    chunks: int = 0  # on llm.stream: the chunks of this attempt the client received


class StreamStats(Struct, frozen=True):
    """How a request on llm.stream streamed (in its end event and its audit event)."""

    ttft_ms: float | None = None  # from the request's arrival to its first chunk
    chunks: int = 0  # text chunks sent, including those a reset later voided
    resets: int = 0  # reset events sent


class ErrorInfo(Struct, frozen=True, omit_defaults=True):
    type: str
    message: str
    # With an error worth resending (errors.RESEND), or a chain whose every call a provider
    # rate limited (all_failed, ...: the soonest Retry-After they gave): when to send it again.
    retry_after_s: float | None = None


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
    target: str | None = None  # the name of the target that served
    template: str | None = None  # the prompt template that target used, if any
    stream: StreamStats | None = None  # set on llm.stream, where content is null (it streamed)
    tool_calls: list[ToolCall] | None = None  # the calls the model asked for, if any
    finish_reason: FinishReason | None = None


class Progress(Struct, frozen=True):
    """The body of a heartbeat on an llm.complete reply subject: how long the dispatcher has
    had the request, and the attempts finished so far (failures, each as the reply will list
    it; the one running now is not among them). An older dispatcher's heartbeat is empty."""

    elapsed_ms: float
    attempts: list[Attempt] = []


class AuditEvent(Struct, frozen=True):
    """One per request on llm.audit.<status>. Never carries prompt, answer or credentials: its
    attempts carry no `message` (a provider's may quote the prompt) unless the dispatcher's
    config sets audit.error_text."""

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
    target: str | None = None
    template: str | None = None
    stream: StreamStats | None = None
    finish_reason: FinishReason | None = None
    tools_called: list[str] = []  # the names of the tools the answer calls (never the arguments)


# ---- dispatcher <-> provider worker -------------------------------------------------


class ProviderRequest(Struct, frozen=True):
    """What the dispatcher sends to llm.provider.<name>."""

    id: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    temperature: float | None = None
    model: str | None = None  # overrides the worker's configured model when set
    metadata: dict[str, Any] = {}
    top_p: float | None = None
    response_format: ResponseFormat | None = None  # passed on where the provider supports it
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    stop: list[str] | None = None
    seed: int | None = None


class ProviderOk(Struct, frozen=True, tag_field="status", tag="ok", omit_defaults=True):
    """A call's answer. When it streamed, `content` holds only what was not sent as a chunk
    (normally ""), and `chunks` says how many were, so the dispatcher can tell one was lost."""

    content: str
    model: str
    usage: Usage = Usage()
    latency_ms: float = 0.0
    chunks: int = 0
    tool_calls: list[ToolCall] | None = None
    finish_reason: FinishReason | None = None


class ProviderFailure(Struct, frozen=True, tag_field="status", tag="error"):
    """A failed call on the wire; inside a worker it is raised as schemas.errors.ProviderError."""

    kind: WorkerKind
    message: str
    status_code: int | None = None
    retry_after_s: float | None = None
    latency_ms: float = 0.0


ProviderReply = ProviderOk | ProviderFailure


encoder = msgspec.json.Encoder()
request_decoder = msgspec.json.Decoder(CompletionRequest)
reply_decoder = msgspec.json.Decoder(CompletionReply)
audit_decoder = msgspec.json.Decoder(AuditEvent)
progress_decoder = msgspec.json.Decoder(Progress)
provider_request_decoder = msgspec.json.Decoder(ProviderRequest)
provider_reply_decoder = msgspec.json.Decoder(ProviderReply)
tool_call_delta_decoder = msgspec.json.Decoder(ToolCallDelta)


_EXAMPLE = '{"messages": [{"role": "user", "content": "Hello"}], "route": "default"}'
_HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")
# msgspec's words for a field CompletionRequest does not have (at the top: nested structs say
# where, with " - at `$...`").
_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `(.*)`", re.DOTALL)


def not_a_request(exc: Exception, data: bytes) -> str:
    """Why `request_decoder` could not read `data` (its DecodeError, or RecursionError for
    nesting deeper than it follows), in the words a client needs: what a dispatcher answers
    as an invalid_request, and what `lifeline batch` says of a line before submitting any."""
    if isinstance(exc, RecursionError):
        return "invalid request: JSON nested too deeply"
    detail = clipped(str(exc), 300) or ""
    if (unknown := _UNKNOWN_FIELD.fullmatch(detail)) is not None:
        return f"invalid request: {_unknown_field(unknown[1])}"
    if detail == "Input data was truncated" and _HIGH_SURROGATE.search(data):
        # msgspec's words for a lone high surrogate escape too (JSON allows the escape, but no
        # text holds half a character)
        detail = (
            "a \\uD800-\\uDBFF escape without the low surrogate that must follow it "
            "(a lone half of a UTF-16 pair), or the JSON ends early"
        )
    return f"invalid request: {detail}. Expected JSON like {_EXAMPLE}"


def _unknown_field(name: str) -> str:
    """A field the request may not carry, named with the closest it may (a misspelt one), or
    with every field when none is close."""
    fields = CompletionRequest.__struct_fields__
    close = difflib.get_close_matches(name, fields, n=1)
    hint = f"did you mean `{close[0]}`?" if close else f"the fields are {', '.join(fields)}"
    return (
        f"unknown field `{name}` ({hint}): a field is refused, not ignored, and one added to "
        "the wire later needs a dispatcher that knows it"
    )


class _IdOnly(Struct):
    id: RequestId = ""


_id_decoder = msgspec.json.Decoder(_IdOnly)


def clipped(text: str | None, most: int) -> str | None:
    """At most `most` characters of `text`: when cut, its start and its end, joined by "…"
    where the middle went (an error message that quotes what a client or a worker sent says
    what is wrong at its start and where, or what to do, at its end)."""
    if text is None or len(text) <= most:
        return text
    head = (most - 1) // 2
    return text[:head] + "…" + text[len(text) - (most - 1 - head) :]


def salvage_id(data: bytes) -> str:
    """The request id of a message that failed full validation, if it has a readable one
    (and a sane length). Never raises: it runs on the error path."""
    try:
        return _id_decoder.decode(data).id
    except msgspec.DecodeError:
        return ""
    except RecursionError:  # msgspec's answer to nesting deeper than it follows, even when skipping
        return _scan_id(data[:_SCAN_BYTES])


_SCAN_BYTES = 64 * 1024  # how far into a too-deeply-nested message the id is looked for
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_ID_VALUE = re.compile(rb'\s*:\s*("(?:[^"\\]|\\.)*")')


def _scan_id(data: bytes) -> str:
    """The top-level "id" of a JSON object msgspec could not walk: the first `"id": "..."` at
    depth 1, found in one pass over the strings and brackets (a pass per "id" seen made 166
    KB of `{"id": "x"},` cost 15 s of the event loop)."""
    depth = 0
    for token in _TOKENS.finditer(data):
        text = token.group()
        if text in (b"{", b"["):
            depth += 1
        elif text in (b"}", b"]"):
            depth -= 1
        elif depth == 1 and text == b'"id"':
            value = _ID_VALUE.match(data, token.end())
            if value is not None:
                try:
                    return msgspec.json.decode(value.group(1), type=RequestId)
                except msgspec.DecodeError:
                    return ""
    return ""


def message_bytes(payload: bytes, headers: Mapping[str, str] | None = None) -> int:
    """What a NATS message counts against the server's max_payload: headers and payload.

    nats-py checks only the payload before publishing; a message whose headers push it over
    max_payload is refused by the server, which then closes the whole connection. So every
    publish of Lifeline's is measured here first. The header block is nats-py's encoding:
    "NATS/1.0\r\n", "key: value\r\n" per header, "\r\n". A test publishes at the limit and
    one byte over it to prove it counts as the server does (tests/test_limits.py).
    """
    if not headers:
        return len(payload)
    size = 12
    for key, value in headers.items():
        size += len(key.encode()) + len(value.encode()) + 4
    return size + len(payload)
