"""The wire contract, machine-readable: the AsyncAPI 3.0 document of every subject Lifeline
uses, and the JSON Schema (draft 2020-12) of every JSON message, for clients and workers in
other languages. Generated from the Structs (schemas/wire.py, schemas/streaming.py) and the
names in schemas/subjects.py; checked in under schemas/spec/ (`lifeline spec --out
schemas/spec`, kept current by tests/test_wire_spec.py).

A tool, off the hot path: only `lifeline spec` and the tests import it (it loads FastStream's
generator and pydantic). CHANNELS declares the wire; each message becomes an endpoint of a
FastStream NatsBroker that never connects, and FastStream's AsyncAPI generator writes the
document: servers, channels, operations, messages, and the payload schemas, which are each
Struct's own msgspec schema handed to pydantic (MsgspecSchema). FastStream 0.7.8 writes one
message per endpoint and no headers, replies or parameters, so _finish regroups and adds:

- one channel per subject with every message it carries (the five stream events, ...);
- a request's `reply`, and the subjects a sender names (reply subjects, Lifeline-Notify,
  Lifeline-Events, Lifeline-Stream-To) as channels without an address;
- each message's headers, the {name} and {status} channel parameters, names and summaries;
- the queue group as the NATS operation binding 0.1.0 (FastStream writes it into a channel
  binding, which the NATS bindings do not define, with bindingVersion "custom"); and no
  correlationId (FastStream adds one on a header Lifeline neither sends nor reads).
"""

from __future__ import annotations

import json
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import unquote

import msgspec
from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI
from pydantic import Field, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import CoreSchema, core_schema

from schemas import subjects, wire
from schemas.streaming import (
    END,
    ERROR,
    HEARTBEAT,
    HEARTBEAT_MS_BOUNDS,
    RESET,
    TOOL_CALL,
    StreamReset,
)
from schemas.subjects import (
    ATTEMPT_ID,
    ATTEMPT_NO,
    DEADLINE_MS,
    EVENT,
    JOB_ERROR,
    JOB_EVENTS,
    MSG_ID,
    NOTIFY,
    REQUEST_ID,
    SEQ,
    STREAM_TO,
    TRACEPARENT,
    TRACESTATE,
)
from service.config import AuditSettings, JobsSettings

ASYNCAPI_VERSION = "3.0.0"
WIRE_VERSION = "1"  # README: Wire contract v1
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
REGENERATE = "lifeline spec --out schemas/spec"
NATS_BINDING = "0.1.0"


class MsgspecSchema:
    """A msgspec type as pydantic sees it, for FastStream: its JSON Schema is msgspec's.

    Annotated[Any, MsgspecSchema(T)]. Every Struct T refers to becomes a pydantic definition
    of its own, so pydantic (and FastStream after it) names and places the shared schemas
    (ChatMessage, Usage, ...) as it does for its models. Validates nothing: only the schema
    is used. tests/test_wire_spec.py checks that the document's schemas are msgspec's.
    """

    def __init__(self, tp: Any) -> None:
        self.tp = tp

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        (top,), components = schema_components([self.tp], "{name}")
        if "$ref" in top:  # a Struct: its own schema, not a reference to it
            top = components.pop(top["$ref"])
        # The definitions' JSON Schemas are set the way pydantic sets those of its hooks
        # (__get_pydantic_json_schema__ ends up in this metadata key).
        definitions = [
            core_schema.any_schema(ref=name, metadata={"pydantic_js_functions": [_schema(s)]})
            for name, s in components.items()
        ]
        top_schema = core_schema.any_schema(metadata={"pydantic_js_functions": [_schema(top)]})
        return core_schema.definitions_schema(top_schema, definitions)


def schema_components(
    types: Sequence[Any], ref_template: str
) -> tuple[tuple[dict[str, Any], ...], dict[str, dict[str, Any]]]:
    """msgspec's JSON Schemas of `types` and the Structs they use, with the rules their
    checks add (schemas.wire.SCHEMA_RULES) in their definitions, the fields only the config
    may set (schemas.wire.CONFIG_ONLY) allowed only null, and each integer said to be written
    without a fraction."""
    tops, components = msgspec.json.schema_components(types, ref_template=ref_template)
    for name, fields in wire.CONFIG_ONLY.items():
        if name in components:
            schema = components[name]
            properties = {
                key: {"type": "null", "description": fields[key], "default": None}
                if key in fields
                else value
                for key, value in schema["properties"].items()
            }
            components[name] = {**schema, "properties": properties}
    for name, rules in wire.SCHEMA_RULES.items():
        if name in components:
            components[name] = {**components[name], **rules}
    return tops, {name: _integers_described(s) for name, s in components.items()}


INTEGER = "an integer, written without a fraction: 256, not 256.0 (which Lifeline refuses)"


def _integers_described(node: Any) -> Any:
    """`node` with INTEGER as the description of each integer schema in it (JSON Schema counts
    256.0 as an integer; msgspec's decoders, strict, do not)."""
    if isinstance(node, list):
        return [_integers_described(value) for value in node]
    if not isinstance(node, dict):
        return node
    out = {
        key: value if key in ("enum", "const", "default") else _integers_described(value)
        for key, value in node.items()
    }
    if out.get("type") == "integer":
        out.setdefault("description", INTEGER)
    return out


def _schema(schema: dict[str, Any]) -> Callable[[CoreSchema, GetJsonSchemaHandler], Any]:
    """A pydantic JSON Schema function giving `schema`, with msgspec's references (by
    name) turned into pydantic's."""

    def js_function(_: CoreSchema, handler: GetJsonSchemaHandler) -> Any:
        def convert(node: Any) -> Any:
            if isinstance(node, dict):
                converted = {key: convert(value) for key, value in node.items() if key != "$ref"}
                if "$ref" in node:  # its siblings (a default) kept
                    ref = core_schema.definition_reference_schema(node["$ref"])
                    return {**handler(ref), **converted}
                return converted
            if isinstance(node, list):
                return [convert(value) for value in node]
            return node

        return convert(schema)

    return js_function


# ---- the wire --------------------------------------------------------------------------

# A body that is UTF-8 text, not JSON.
Text = Annotated[str, Field(title="Text", description="UTF-8 text, not JSON")]
AttemptId = Annotated[
    str, Field(title="AttemptId", description=f"the {ATTEMPT_ID} of the attempt to stop")
]
AbortKey = Annotated[
    str,
    Field(title="AbortKey", description=f"the {subjects.ABORT_KEY} the request was sent with"),
]
NoResult = Annotated[str, Field(title="NoResult", description="an empty body", max_length=0)]
OCTETS = "application/octet-stream"
# A dead letter's body: whatever the job's was.
SubmittedJob = Annotated[
    bytes,
    Field(
        title="SubmittedJob",
        description="the job's body, byte for byte as it was submitted: normally a "
        "CompletionRequest's JSON, but any bytes (not JSON, not UTF-8: whatever failed); "
        "empty when the body was left out because the message would not fit max_payload "
        "with it",
    ),
]
JobId = Annotated[
    str, Field(title="JobId", description="a job's id: its body's id, else its Nats-Msg-Id")
]
DIGITS = r"^[0-9]+$"


@dataclass(frozen=True)
class Header:
    name: str
    description: str
    required: bool = False
    const: str | None = None
    pattern: str | None = None
    max_length: int | None = None


@dataclass(frozen=True)
class Message:
    name: str  # its key in the channel
    payload: Any  # a Struct, or Text (any annotated str): the body as it is sent
    summary: str
    headers: tuple[Header, ...] = ()
    without: tuple[str, ...] = ()  # headers it never carries (what tells it from the others)
    content_type: str | None = None  # default: JSON for a Struct, else UTF-8 text


@dataclass(frozen=True)
class Channel:
    key: str
    address: str | None  # None: a subject an earlier message names (its reply subject, a header)
    description: str
    messages: tuple[Message, ...]
    # Lifeline's operation on the channel; None: its messages are only another one's reply.
    action: Literal["receive", "send"] | None = None
    summary: str = ""  # the operation's
    queue: str = ""  # the receivers' queue group
    reply: str | None = None  # the channel the operation's replies go to
    reply_location: str | None = None  # where the reply's subject is read, else msg.reply
    parameters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


TRACE = (
    Header(TRACEPARENT, "W3C trace context: the receiver's spans join this trace"),
    Header(TRACESTATE, "W3C trace context, the vendors' part"),
)
ABORTABLE = (
    Header(
        subjects.ABORT_KEY,
        f"a random key (at most {subjects.MAX_ABORT_KEY_LENGTH} characters, new for each "
        "request) that makes the request abortable: publish it on llm.abort to stop the "
        "request. A longer key, or one a request in flight already uses, is accepted and the "
        "request served, but it cannot be aborted",
        max_length=subjects.MAX_ABORT_KEY_LENGTH,
    ),
)
HEARTBEATS = Header(
    subjects.HEARTBEAT_MS,
    "ask for heartbeats on the reply subject, every this many milliseconds (kept within "
    f"{HEARTBEAT_MS_BOUNDS[0]} to {HEARTBEAT_MS_BOUNDS[1]:,}) while the dispatcher works on "
    "the request: on llm.complete one each interval until the reply; on llm.stream one at "
    "once, then one whenever the stream sent nothing that long, until the end event. Once one "
    "came, a silence of three intervals and a second means its dispatcher died or lost NATS "
    "(no other takes a request over): send it again",
    pattern=DIGITS,
)


def heartbeat(on: str, payload: Any = NoResult, body: str = "") -> Message:
    return Message(
        "heartbeat",
        payload,
        f"Only for a request that asked ({subjects.HEARTBEAT_MS}): its dispatcher is alive and "
        f"working on it{body}. No part of the answer; never after {on}",
        (event(HEARTBEAT),),
        without=(SEQ, ATTEMPT_NO),
    )


SEQ_HEADER = Header(
    SEQ,
    "the event's number: 1, 2, 3, ... per request; a gap means an event was lost",
    required=True,
    pattern=DIGITS,
)
ATTEMPT_BELONGS = (
    "the attempt the event belongs to: 1, 2, ... in the order attempts started, as the "
    "non-skipped entries of the reply's attempts"
)
EVENT_NUMBERS = (SEQ_HEADER, Header(ATTEMPT_NO, ATTEMPT_BELONGS, required=True, pattern=DIGITS))
# An error event may come before any attempt started.
ERROR_NUMBERS = (
    SEQ_HEADER,
    Header(
        ATTEMPT_NO,
        f"{ATTEMPT_BELONGS}; 0 when no attempt started (the request was refused: an unknown "
        "route, an invalid request, overloaded, ...; or every target was skipped)",
        required=True,
        pattern=DIGITS,
    ),
)


def event(kind: str) -> Header:
    return Header(EVENT, f"the event's kind: {kind}", required=True, const=kind)


DESCRIPTION = f"""\
Lifeline, an LLM fallback service on NATS: its wire contract v1. Bodies are JSON unless a \
message says otherwise; NATS header values are strings. Integers are written without a \
fraction (256, not 256.0): Lifeline refuses 256.0 where an integer is expected, in requests \
and workers' replies alike. Fields added after v1 always have defaults, so v1 senders stay \
valid.

Operations are Lifeline's side: `receive` where others publish (clients; on \
llm.provider.{{name}} and llm.cancel.{{name}}, Lifeline's dispatchers, received by a provider \
worker), `send` where Lifeline publishes. A provider worker written in another language \
implements the provider, providerChunks (if it streams) and cancel operations.

Generated from the Structs in schemas/wire.py and schemas/streaming.py and the names in \
schemas/subjects.py by `{REGENERATE}`; do not edit."""


# llm.stream's events (schemas/streaming.py), also a job's with a Lifeline-Events header.
STREAM_EVENTS = (
    Message("delta", Text, "A piece of the answer's text", EVENT_NUMBERS, without=(EVENT,)),
    Message(
        "toolCall",
        wire.ToolCallDelta,
        "A piece of a tool call: call `index`'s first piece has its id and name, the "
        "pieces' arguments joined are its arguments",
        (*EVENT_NUMBERS, event(TOOL_CALL)),
    ),
    Message(
        "reset",
        StreamReset,
        "Attempt `attempt` failed after its deltas were sent: drop the last `discard` "
        "deltas (text and tool-call pieces alike); the answer goes on with the next ones",
        (*EVENT_NUMBERS, event(RESET)),
    ),
    Message(
        "end",
        wire.CompletionReply,
        "The reply llm.complete would send, with content null (the text came as "
        "deltas), its tool calls whole, and `stream`",
        (*EVENT_NUMBERS, event(END)),
    ),
    Message(
        "error",
        wire.CompletionReply,
        "The error reply llm.complete would send, with `stream` as on end (its chunks sent before it)",
        (*ERROR_NUMBERS, event(ERROR)),
    ),
)

_JOBS = JobsSettings()
_STATUSES = list(typing.get_args(typing.get_type_hints(wire.AuditEvent)["status"]))
_PROVIDER_NAME = {
    "name": {"description": "the provider's name: a [providers.<name>] table of the config"}
}

CHANNELS: tuple[Channel, ...] = (
    Channel(
        "complete",
        subjects.COMPLETE,
        "Chat requests, core NATS request/reply. A request with a reply subject Lifeline may "
        "answer on gets exactly one CompletionReply there, errors included; every request "
        f"has one audit event. Dispatchers share the queue group {subjects.DISPATCHER_QUEUE}.",
        (
            Message(
                "request",
                wire.CompletionRequest,
                "A chat request",
                (*ABORTABLE, HEARTBEATS, *TRACE),
            ),
        ),
        action="receive",
        summary="Answer a chat request with the first good result of its route's targets",
        queue=subjects.DISPATCHER_QUEUE,
        reply="completeReply",
    ),
    Channel(
        "completeReply",
        None,
        "The request's reply subject, its sender's own (an inbox, or a subject of its "
        f"service; subjects under {subjects.NAMESPACE} and the server's $... are refused).",
        (
            Message(
                "reply",
                wire.CompletionReply,
                "The request's one reply, ok or error",
                without=(EVENT,),
            ),
            heartbeat(
                "the reply",
                wire.Progress,
                "; its body is the request's progress (how long the dispatcher has had it, the "
                "attempts that failed so far), empty from a dispatcher older than that",
            ),
        ),
    ),
    Channel(
        "stream",
        subjects.STREAM,
        "The same requests as on llm.complete, answered with a stream of events on the "
        "request's reply subject: subscribe to it before publishing (a request helper that "
        f"keeps the first message only will not do). Dispatchers share the queue group "
        f"{subjects.DISPATCHER_QUEUE}.",
        (
            Message(
                "request",
                wire.CompletionRequest,
                "A chat request",
                (*ABORTABLE, HEARTBEATS, *TRACE),
            ),
        ),
        action="receive",
        summary="Stream the answer to a chat request as it comes",
        queue=subjects.DISPATCHER_QUEUE,
        reply="streamEvents",
    ),
    Channel(
        "streamEvents",
        None,
        "The reply subject of a request on llm.stream: one message per event, in order. "
        "Exactly one end or error event closes the stream.",
        (*STREAM_EVENTS, heartbeat("the end or error event")),
    ),
    Channel(
        "abort",
        subjects.ABORT,
        f"Stop a request on llm.complete or llm.stream its client no longer waits for (its "
        f"user left, its stream was closed early), named by the {subjects.ABORT_KEY} it was "
        "sent with. Every dispatcher subscribes (no queue group); the one running the request "
        "cancels its attempts at their workers, HTTP calls included, answers it with the error "
        "`aborted` and audits it. A key no request in flight was sent with does nothing.",
        (Message("key", AbortKey, "The abort key of the request to stop"),),
        action="receive",
        summary="Abort a request",
    ),
    Channel(
        "jobsSubmit",
        subjects.JOBS_SUBMIT,
        "Durable jobs: the same requests, published through JetStream (the work-queue stream "
        f"{_JOBS.stream}, jobs.stream) with the job's id as {MSG_ID}; the same id within the "
        "dedup window is acknowledged as a duplicate and kept once. Dispatchers pull from "
        f"its durable consumer {subjects.JOBS_CONSUMER}. The result, the reply llm.complete "
        f"would send, is kept in the key-value bucket {_JOBS.results_bucket} "
        "(jobs.results_bucket) under job. + the first 40 hex digits of the id's SHA-256, and "
        f"published on the subject in {NOTIFY} when the job names one.",
        (
            Message(
                "job",
                wire.CompletionRequest,
                "A chat request, as a durable job",
                (
                    Header(
                        MSG_ID,
                        "the job's id, for JetStream's deduplication (the body's id wins when "
                        "both are set)",
                    ),
                    Header(
                        NOTIFY,
                        "a subject to publish the job's result on too (not under "
                        f"{subjects.NAMESPACE} or $)",
                    ),
                    Header(
                        JOB_EVENTS,
                        "a subject to stream the job's answer to while it runs, as llm.stream's "
                        f"events (not under {subjects.NAMESPACE} or $)",
                    ),
                    *TRACE,
                ),
            ),
        ),
        action="receive",
        summary="Run a durable job and keep its result by id",
        reply="jobResult",
        reply_location=f"$message.header#/{NOTIFY}",
    ),
    Channel(
        "jobResult",
        None,
        f"The subject a job names in its {NOTIFY} header.",
        (Message("result", wire.CompletionReply, "The job's result, as kept in the bucket"),),
    ),
    Channel(
        "jobsResult",
        subjects.JOBS_RESULT,
        "A job's result by its id, from a dispatcher: what a client reads results with, needing "
        "no permission on the results bucket (whose stream would let it list and read every "
        "job's). The reply is the stored result, or an empty body while there is none (not "
        f"yet, or no more: results expire). Dispatchers share the queue group "
        f"{subjects.JOBS_RESULT_QUEUE}; with none running nobody answers, and a client with "
        "bucket permissions reads the bucket instead.",
        (Message("id", JobId, "The job's id, as submitted"),),
        action="receive",
        summary="Read a job's result by id",
        queue=subjects.JOBS_RESULT_QUEUE,
        reply="storedResult",
    ),
    Channel(
        "storedResult",
        None,
        f"The reply subject of a request on {subjects.JOBS_RESULT}.",
        (
            Message("result", wire.CompletionReply, "The job's stored result"),
            Message("none", NoResult, "An empty body: no result (not yet, or no more)"),
        ),
    ),
    Channel(
        "jobEvents",
        None,
        f"The subject a job names in its {JOB_EVENTS} header: its answer while it runs, as "
        "the events of llm.stream; the end event carries the stored result. Core NATS, so "
        "only for whoever listens then; a job delivered again streams again from event 1.",
        STREAM_EVENTS,
        action="send",
        summary="Stream a job's answer while it runs",
    ),
    Channel(
        "jobsDead",
        subjects.JOBS_DEAD,
        f"A job whose handling failed {_JOBS.max_deliver} times (jobs.max_deliver) by a bug "
        "in Lifeline, not by a provider (provider failures give an error result): published "
        f"as it was submitted, its headers kept, with the error in {JOB_ERROR}; it then "
        "leaves the jobs stream. Its body is the job's bytes as they came, which need not be "
        "a valid request or JSON, or empty when they would not fit max_payload with the "
        f"error; then, if its headers would not fit either, {JOB_ERROR} is its only header. "
        "Its result is an internal error saying so, stored and pushed as any result.",
        (
            Message(
                "job",
                SubmittedJob,
                "The job as it was submitted: its body and headers (any, as they came), with "
                f"{JOB_ERROR} added",
                (
                    Header(
                        JOB_ERROR,
                        "what went wrong, at most 500 characters; when the body was left out, "
                        'followed by " (the job\'s body left out: too large with it)"',
                        required=True,
                    ),
                    Header(MSG_ID, "as submitted"),
                    Header(NOTIFY, "as submitted"),
                    Header(JOB_EVENTS, "as submitted"),
                    Header(TRACEPARENT, "as submitted"),
                    Header(TRACESTATE, "as submitted"),
                ),
                content_type=OCTETS,
            ),
        ),
        action="send",
        summary="Dead-letter a job that kept failing",
    ),
    Channel(
        "audit",
        subjects.audit_subject("{status}"),
        "One audit event per request, core or job (subscribe to "
        f"{subjects.AUDIT_ALL}); the stream {AuditSettings().stream} (audit.stream) keeps "
        "them. A job delivered again after its result was stored sends its event again, "
        f"under the same {MSG_ID}, which the stream keeps once. It never carries the prompt, "
        "the answer, tool arguments or any credential.",
        (
            Message(
                "event",
                wire.AuditEvent,
                "A request's audit event",
                (
                    Header(
                        MSG_ID,
                        "on a job's event only, so that the audit stream keeps one per job: "
                        "job:<the first 40 hex digits of the SHA-256 of its id, a line break "
                        "and its place in the jobs stream (<its stream sequence>.<the time it "
                        "was stored, in Unix microseconds>), the same on each delivery>, or "
                        "for a job sent "
                        "with no id (answered as seq-<its stream sequence>) job:anon.<its "
                        "stream sequence>.<the time it was stored, in Unix microseconds>: a "
                        "sequence can come again once the jobs stream is made anew, and its "
                        "place does not",
                        pattern=r"^job:(?:[0-9a-f]{40}|anon\.[0-9]+\.[0-9]+)$",
                    ),
                ),
            ),
        ),
        action="send",
        summary="Publish a request's audit event",
        parameters={"status": {"enum": _STATUSES, "description": "the request's status"}},
    ),
    Channel(
        "provider",
        subjects.provider_subject("{name}"),
        "One subject per provider, each attempt of a request one message, sent by a "
        "dispatcher. The worker makes exactly one provider call (retries and fallback are the "
        "dispatcher's) and answers on the reply subject, unless the deadline passed or the "
        "attempt was cancelled. The replicas of a provider's worker share its queue group. "
        "This and llm.cancel.{name} are what a worker written in another language implements.",
        (
            Message(
                "request",
                wire.ProviderRequest,
                "One attempt: the request with its target's shaping applied",
                (
                    Header(
                        DEADLINE_MS,
                        "Unix time in ms after which the dispatcher no longer waits: drop work "
                        "past it, cancel a call still running at it",
                        required=True,
                        pattern=DIGITS,
                    ),
                    Header(REQUEST_ID, "the request's id", required=True),
                    Header(
                        ATTEMPT_ID,
                        "unique per physical attempt (a retry gets a new one); what a cancel names",
                        required=True,
                    ),
                    Header(
                        STREAM_TO,
                        "on a streaming attempt: the subject to publish the answer's pieces on "
                        "as they come, before the reply; a worker that does not stream ignores "
                        "it",
                    ),
                    *TRACE,
                ),
            ),
        ),
        action="receive",
        summary="Make one provider call",
        queue=subjects.provider_queue("{name}"),
        reply="providerReply",
        parameters=_PROVIDER_NAME,
    ),
    Channel(
        "providerReply",
        None,
        "The attempt's reply subject: its one answer, ok or error by `status`.",
        (
            Message("ok", wire.ProviderOk, "The provider's answer"),
            Message("error", wire.ProviderFailure, "A failed call, with its error kind"),
        ),
    ),
    Channel(
        "providerChunks",
        None,
        f"The subject in a streaming attempt's {STREAM_TO} header: the answer's pieces, in "
        "order, before the attempt's one reply (whose `chunks` says how many were sent). Keep "
        "each piece under the server's max_payload less 1 KiB.",
        (
            Message("text", Text, "A piece of the answer's text", without=(EVENT,)),
            Message(
                "toolCall",
                wire.ToolCallDelta,
                "A piece of a tool call (as the toolCall stream event)",
                (event(TOOL_CALL),),
            ),
        ),
        action="send",
        summary="Stream an attempt's answer as it comes",
    ),
    Channel(
        "cancel",
        subjects.cancel_subject("{name}"),
        "Stop an attempt the dispatcher no longer waits for. Every replica of the provider's "
        "worker subscribes (no queue group); the one running the attempt cancels it, its HTTP "
        "call included, and sends no reply.",
        (Message("attempt", AttemptId, "The attempt to stop"),),
        action="receive",
        summary="Cancel an attempt",
        parameters=_PROVIDER_NAME,
    ),
)


def message_types() -> list[type[msgspec.Struct]]:
    """Every JSON message's type, once each, in the order CHANNELS names them."""
    types: dict[type[msgspec.Struct], None] = {}
    for channel in CHANNELS:
        for message in channel.messages:
            if _is_struct(message.payload):
                types[message.payload] = None
    return list(types)


# ---- generating -----------------------------------------------------------------------


def generate(server: str) -> dict[str, str]:
    """Every file of the machine-readable contract, by name: asyncapi.json and one
    <Name>.schema.json per JSON message. `server` is the NATS URL the document names."""
    files = {"asyncapi.json": _dumps(asyncapi(server))}
    for name, schema in json_schemas().items():
        files[f"{name}.schema.json"] = _dumps(schema)
    return files


def asyncapi(server: str) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of every subject Lifeline uses."""
    broker = NatsBroker(
        server,
        protocol_version=None,
        description="Every lifeline command's default NATS server (`lifeline run` starts one "
        "when no other is named); JetStream is needed for jobs and the audit stream.",
    )
    for channel in CHANNELS:
        for message in channel.messages:
            _declare(broker, channel, message)
    made = AsyncAPI(
        broker,
        title="Lifeline",
        version=WIRE_VERSION,
        description=DESCRIPTION,
        schema_version=ASYNCAPI_VERSION,
    ).to_specification()
    return _finish(json.loads(made.to_json()))


def _declare(broker: NatsBroker, channel: Channel, message: Message) -> None:
    """One FastStream endpoint per message (FastStream's channel key: channel:message)."""
    title = f"{channel.key}:{message.name}"
    payload = _pydantic(message.payload)
    if channel.action == "receive":
        assert channel.address is not None, channel.key

        async def handler(body: Any) -> None:
            """Never called: the broker only describes."""

        handler.__annotations__ = {"body": payload, "return": None}
        subscriber = broker.subscriber(
            channel.address, queue=channel.queue, title=title, description=channel.description
        )
        subscriber(handler)
    else:
        broker.publisher(
            channel.address or "", title=title, description=channel.description, schema=payload
        )


def _pydantic(payload: Any) -> Any:
    if _is_struct(payload):
        # The title names the schema (FastStream otherwise titles it after the parameter).
        return Annotated[Any, MsgspecSchema(payload), Field(title=payload.__name__)]
    return payload


def _finish(made: dict[str, Any]) -> dict[str, Any]:
    """FastStream's document regrouped by CHANNELS, with what FastStream leaves out."""
    made_channels, made_operations = made["channels"], made["operations"]
    made_messages = made["components"]["messages"]
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for channel in CHANNELS:
        endpoints = [made_channels[f"{channel.key}:{m.name}"] for m in channel.messages]
        first = endpoints[0]
        refs = {}
        for message, endpoint in zip(channel.messages, endpoints, strict=True):
            (ref,) = endpoint["messages"].values()
            generated = made_messages[unquote(ref["$ref"].rpartition("/")[2])]
            key = f"{channel.key}.{message.name}"
            messages[key] = _message(message, generated["payload"])
            refs[message.name] = {"$ref": f"#/components/messages/{key}"}
        channels[channel.key] = {
            "address": first["address"] or None,
            "description": first["description"],
            "servers": first["servers"],
            "messages": refs,
        }
        if channel.parameters:
            channels[channel.key]["parameters"] = channel.parameters
        if channel.action is not None:
            queue = first.get("bindings", {}).get("nats", {}).get("queue")
            action = made_operations[f"{channel.key}:{channel.messages[0].name}"]["action"]
            assert action == channel.action, (channel.key, action)
            operations[channel.key] = _operation(channel, action, queue)
    schemas = made["components"]["schemas"]
    return {
        "asyncapi": made["asyncapi"],
        "info": made["info"],
        "defaultContentType": made["defaultContentType"],
        "servers": {name: _server(server) for name, server in made["servers"].items()},
        "channels": channels,
        "operations": operations,
        # By name: pydantic's order varies from one process to the next (hash seeds).
        "components": {"messages": messages, "schemas": dict(sorted(schemas.items()))},
    }


def _message(message: Message, payload: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": message.name, "summary": message.summary}
    if message.content_type is not None:
        out["contentType"] = message.content_type
    elif not _is_struct(message.payload):
        out["contentType"] = "text/plain; charset=utf-8"
    if message.headers or message.without:
        headers: dict[str, Any] = {"type": "object"}
        if message.headers:
            headers["properties"] = {h.name: _header_schema(h) for h in message.headers}
        if required := [h.name for h in message.headers if h.required]:
            headers["required"] = required
        if len(message.without) == 1:
            headers["not"] = {"required": list(message.without)}
        elif message.without:  # none of them: `required` of them all refuses only all at once
            headers["not"] = {"anyOf": [{"required": [name]} for name in message.without]}
        out["headers"] = headers
    out["payload"] = payload
    return out


def _header_schema(header: Header) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "description": header.description}
    if header.const is not None:
        schema["const"] = header.const
    if header.pattern is not None:
        schema["pattern"] = header.pattern
    if header.max_length is not None:
        schema["maxLength"] = header.max_length
    return schema


def _operation(channel: Channel, action: str, queue: str | None) -> dict[str, Any]:
    key = channel.key
    operation: dict[str, Any] = {
        "action": action,
        "channel": {"$ref": f"#/channels/{key}"},
        "summary": channel.summary,
        "messages": [{"$ref": f"#/channels/{key}/messages/{m.name}"} for m in channel.messages],
    }
    if queue:
        operation["bindings"] = {"nats": {"queue": queue, "bindingVersion": NATS_BINDING}}
    if channel.reply is not None:
        replies = next(c for c in CHANNELS if c.key == channel.reply)
        reply: dict[str, Any] = {}
        if channel.reply_location is not None:
            reply["address"] = {"location": channel.reply_location}
        reply["channel"] = {"$ref": f"#/channels/{replies.key}"}
        reply["messages"] = [
            {"$ref": f"#/channels/{replies.key}/messages/{m.name}"} for m in replies.messages
        ]
        operation["reply"] = reply
    return operation


def _server(server: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in server.items() if value not in ("", None)}


def _is_struct(payload: Any) -> bool:
    return isinstance(payload, type) and issubclass(payload, msgspec.Struct)


def json_schemas() -> dict[str, dict[str, Any]]:
    """Each JSON message's JSON Schema (draft 2020-12), by type name: msgspec's schema of the
    Struct, the Structs it uses under $defs."""
    schemas = {}
    for tp in message_types():
        name = tp.__name__
        _, definitions = schema_components([tp], "#/$defs/{name}")
        top = definitions.pop(name)
        schemas[name] = {
            "$schema": DRAFT_2020_12,
            "$comment": f"Lifeline wire contract v{WIRE_VERSION}, generated from "
            f"{tp.__module__.replace('.', '/')}.py by `{REGENERATE}`; do not edit.",
            **top,
            **({"$defs": definitions} if definitions else {}),
        }
    return schemas


def _dumps(document: Any) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
