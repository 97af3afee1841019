"""The machine-readable wire contract (schemas/spec/, made by service/wire_spec.py): current,
made of the Structs' own schemas, accepted by the official AsyncAPI parser, and true of the
messages a running Lifeline sends."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from typing import Any

import jsonschema
import msgspec
import nats
import pytest
from helpers import ROOT, config, fake, run_lifeline, settled, wait_for
from nats.aio.msg import Msg
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from schemas import subjects
from schemas.errors import ERROR_KINDS
from schemas.streaming import StreamReset
from schemas.wire import (
    Attempt,
    AuditEvent,
    ChatMessage,
    CompletionReply,
    CompletionRequest,
    ErrorInfo,
    ImagePart,
    JsonSchemaFormat,
    NamedTool,
    ProviderFailure,
    ProviderOk,
    ProviderRequest,
    ResponseFormat,
    StreamStats,
    TargetSpec,
    TextPart,
    Tool,
    ToolCall,
    ToolCallDelta,
    Usage,
    encoder,
)
from service import cli, wire_spec
from service.client import Lifeline, stream_text
from service.config import parse_config
from service.natsio import ensure_subscribed
from service.routing import Rejected, Router

SPEC = ROOT / "schemas" / "spec"
NODE = shutil.which("node")
VALIDATE = ROOT / "tests" / "node" / "asyncapi-validate.mjs"
PARSER = ROOT / "tests" / "node" / "node_modules" / "@asyncapi" / "parser"


@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    return wire_spec.generate(cli.LOCAL_NATS)


@pytest.fixture(scope="module")
def document(generated: dict[str, str]) -> dict[str, Any]:
    return json.loads(generated["asyncapi.json"])


def schema_file(name: str) -> dict[str, Any]:
    return json.loads((SPEC / f"{name}.schema.json").read_text())


# ---- current, and made of the Structs ---------------------------------------------------


def test_the_checked_in_spec_is_what_the_code_generates(generated):
    on_disk = {path.name: path.read_text(encoding="utf-8") for path in SPEC.iterdir()}
    differ = sorted(name for name in generated if on_disk.get(name) != generated[name])
    extra = sorted(set(on_disk) - set(generated))
    assert not differ and not extra, (
        f"schemas/spec/ is not what the code generates (differ or missing: {differ}; no longer "
        f"generated, delete them: {extra}). Run `.venv/bin/{wire_spec.REGENERATE}` and commit it"
    )


def test_lifeline_spec_prints_the_document_or_writes_every_file(generated, tmp_path):
    printed = run_lifeline("spec")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == generated["asyncapi.json"]
    out = tmp_path / "new" / "spec"
    written = run_lifeline("spec", "--out", str(out))
    assert written.returncode == 0, written.stderr
    assert f"wrote asyncapi.json and {len(generated) - 1} JSON Schemas to {out}" in written.stdout
    assert {p.name: p.read_text(encoding="utf-8") for p in out.iterdir()} == generated


def test_the_documents_schemas_are_msgspecs_own(document):
    """No second definition of a message: FastStream's payload schemas are the Structs' (with
    the rules of their __post_init__ checks, schemas.wire.SCHEMA_RULES)."""
    _, components = wire_spec.schema_components(
        wire_spec.message_types(), "#/components/schemas/{name}"
    )

    def as_asyncapi(node: Any) -> Any:  # AsyncAPI's discriminator is the property's name
        if isinstance(node, dict):
            return {
                k: v["propertyName"] if k == "discriminator" else as_asyncapi(v)
                for k, v in node.items()
            }
        return [as_asyncapi(v) for v in node] if isinstance(node, list) else node

    schemas = document["components"]["schemas"]
    for name, schema in components.items():
        assert schemas[name] == as_asyncapi(schema), name
    assert set(schemas) - set(components) == {  # UTF-8 bodies
        "Text",
        "AttemptId",
        "AbortKey",
        "JobId",
        "NoResult",
        "SubmittedJob",  # a dead letter's body: any bytes
    }


def test_each_json_schema_file_is_a_draft_2020_12_schema_of_its_struct():
    for tp in wire_spec.message_types():
        schema = schema_file(tp.__name__)
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        _, generated = wire_spec.schema_components([tp], "#/$defs/{name}")
        assert {k: v for k, v in schema.items() if k not in ("$schema", "$comment", "$defs")} == (
            generated[tp.__name__]
        )
        assert schema.get("$defs", {}) == {k: v for k, v in generated.items() if k != tp.__name__}


def test_every_subject_queue_group_and_header_comes_from_subjects_py(document):
    addresses = {c["address"] for c in document["channels"].values()} - {None}
    assert addresses == {
        subjects.COMPLETE,
        subjects.STREAM,
        subjects.ABORT,
        subjects.JOBS_SUBMIT,
        subjects.JOBS_RESULT,
        subjects.JOBS_DEAD,
        subjects.audit_subject("{status}"),
        subjects.provider_subject("{name}"),
        subjects.cancel_subject("{name}"),
    }
    # Every subject (or prefix of one) named in subjects.py is in the document.
    for name, value in vars(subjects).items():
        if isinstance(value, str) and value.startswith(subjects.NAMESPACE):
            stem = value.rstrip(">")
            assert any(a == value or a.startswith(stem) for a in addresses), name
    queues = {
        key: op["bindings"]["nats"]["queue"]
        for key, op in document["operations"].items()
        if "bindings" in op
    }
    assert queues == {
        "complete": subjects.DISPATCHER_QUEUE,
        "stream": subjects.DISPATCHER_QUEUE,
        "provider": subjects.provider_queue("{name}"),
        "jobsResult": subjects.JOBS_RESULT_QUEUE,
    }
    # Every header named in subjects.py (Capitalised-With-Dashes, and W3C's trace context).
    messages = document["components"]["messages"]
    headers = {h for m in messages.values() for h in m.get("headers", {}).get("properties", {})}
    named = {
        value
        for name, value in vars(subjects).items()
        if isinstance(value, str) and (value[:1].isupper() and "-" in value or "TRACE" in name)
    }
    assert headers == named
    assert len(named) == 15
    assert set(messages["provider.request"]["headers"]["required"]) == {
        subjects.DEADLINE_MS,
        subjects.REQUEST_ID,
        subjects.ATTEMPT_ID,
    }


def test_the_generator_stays_off_the_hot_path():
    """`lifeline run`, a dispatcher and a worker never load FastStream or pydantic."""
    code = (
        "import sys, service.cli, service.app, workers.runtime; print(sorted(m for m in "
        "sys.modules if m.split('.')[0] in ('faststream', 'pydantic') or m == 'service.wire_spec'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ---- real messages against the JSON Schemas ----------------------------------------------

WEATHER = Tool(
    "get_weather",
    "The weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
CALL = ToolCall("call_1", "get_weather", '{"city": "Lyon"}')
MESSAGES = [
    ChatMessage("system", "You are a weather assistant."),
    ChatMessage(
        "user",
        [
            TextPart("Weather here and in Paris?"),
            ImagePart(url="https://example.com/street.jpg"),
            ImagePart(data="iVBORw0KGgo=", media_type="image/png"),
        ],
    ),
    ChatMessage("assistant", None, tool_calls=[CALL]),
    ChatMessage("tool", "21 °C, clear", tool_call_id="call_1"),
    ChatMessage("developer", "Answer in French."),
]
ATTEMPTS = [
    Attempt(
        "flaky",
        "fake-gpt",
        "error",
        0.7,
        "rate_limit",
        429,
        "slow down",
        "flaky",
        0,
        None,
        "fallback",
    ),
    Attempt("small", "fake-mini", "skipped", 0.0, reason="vision", target="small"),
    Attempt("sleepy", "fake-claude", "cancelled", 12.5, reason="hedge_lost", hedge=True),
    Attempt("backup", "fake-echo", "ok", 3.1, target="backup", chunks=4),
]
USAGE = Usage(412, 38, cached_input_tokens=128, reasoning_tokens=7)
REPLY = CompletionReply(
    "r7",
    "ok",
    "",
    "backup",
    "fake-echo",
    ATTEMPTS,
    USAGE,
    912.4,
    "d8bb6fa5730bbc1cb654805ff7b3752e",
    target="backup",
    template="terse",
    stream=StreamStats(ttft_ms=40.2, chunks=4, resets=1),
    tool_calls=[CALL],
    finish_reason="tool_calls",
)

REAL = [
    CompletionRequest(
        MESSAGES,
        id="r7",
        route="tools",
        targets=[
            "backup",
            TargetSpec(provider="openai", model="gpt-4o", retry_on=[429, "timeout"], drop=["seed"]),
        ],
        max_tokens=256,
        temperature=0.2,
        top_p=0.9,
        timeout_s=20,
        deadline_unix_ms=1893456000000,
        metadata={"ticket": 42, "lifeline_previous_errors": ["rate_limit"]},
        response_format=ResponseFormat(
            "json_schema", JsonSchemaFormat("weather", {"type": "object"})
        ),
        fallback_on=["rate_limit", 503],
        faults={"flaky": [429, "ok", None], "sleepy": "timeout", "backup": "503 after 2"},
        on_midstream="continue",
        tools=[WEATHER],
        tool_choice=NamedTool("get_weather"),
        parallel_tool_calls=False,
        stop=["\n\n"],
        seed=7,
    ),
    CompletionRequest([ChatMessage("user", "hi")], tools=[WEATHER], tool_choice="required"),
    REPLY,
    CompletionReply("", "error", attempts=[], error=ErrorInfo("overloaded", "busy", 0.05)),
    AuditEvent(
        "r7",
        "ok",
        "tools",
        "backup",
        "fake-echo",
        ATTEMPTS,
        912.4,
        None,
        1893456000000,
        usage=USAGE,
        request_bytes=2048,
        stream=REPLY.stream,
        tools_called=["get_weather"],
    ),
    ProviderRequest(
        "r7",
        MESSAGES,
        256,
        0.2,
        "gpt-4o",
        {"a": 1},
        0.9,
        ResponseFormat("regex", pattern="^[A-Z]"),
        [WEATHER],
        "auto",
        True,
        ["STOP"],
        7,
    ),
    ProviderOk("", "gpt-4o", USAGE, 812.0, 5, [CALL], "tool_calls"),
    ProviderFailure("rate_limit", "429 from the provider", 429, 2.5, 31.0),
    ToolCallDelta(0, "call_1", "get_weather", '{"ci'),
    ToolCallDelta(0, arguments='ty": "Paris"}'),
    StreamReset(1, 5, ErrorInfo("server_error", "503 after 5 chunks")),
]


def validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        schema_file(name), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


@pytest.mark.parametrize("message", REAL, ids=lambda m: type(m).__name__)
def test_real_messages_are_valid_under_their_json_schema(message):
    validator(type(message).__name__).validate(json.loads(encoder.encode(message)))


def request_with(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], **fields}


# Each is refused by the wire's own decoder too, so the schema says what the code enforces.
INVALID = [
    ("CompletionRequest", {"messages": []}, "minItems"),
    ("CompletionRequest", {"route": "default"}, "required"),
    ("CompletionRequest", {"messages": [{"role": "robot", "content": "hi"}]}, "enum"),
    ("CompletionRequest", request_with(temperature=3), "maximum"),
    ("CompletionRequest", request_with(id="x" * 257), "maxLength"),
    ("CompletionRequest", request_with(tools=[{"name": "get weather"}]), "pattern"),
    ("CompletionRequest", request_with(tool_choice="always"), "anyOf"),
    ("CompletionRequest", request_with(targets=[{"provider": "a", "colour": "red"}]), "anyOf"),
    (
        "CompletionRequest",
        {"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]},
        "anyOf",
    ),
    (
        "CompletionRequest",
        {"messages": [{"role": "user", "content": [{"type": "image", "url": "u", "data": "x"}]}]},
        "oneOf",
    ),
    (
        "CompletionRequest",
        {"messages": [{"role": "user", "content": [{"type": "image"}]}]},
        "oneOf",
    ),
    (
        "CompletionRequest",
        {"messages": [{"role": "user", "content": [{"type": "image", "data": "iVBOR"}]}]},
        "required",
    ),
    (
        "ProviderRequest",
        {
            "id": "r1",
            "messages": [
                {"role": "user", "content": [{"type": "image", "data": "x", "media_type": "text"}]}
            ],
        },
        "pattern",
    ),
    ("CompletionRequest", {"messages": [{"role": "tool", "content": "sunny"}]}, "required"),
    (
        "CompletionRequest",
        {"messages": [{"role": "tool", "content": "sunny", "tool_call_id": ""}]},
        "minLength",
    ),
    ("CompletionReply", {"id": "r1", "status": "maybe"}, "enum"),
    ("AuditEvent", {"id": "r1", "status": "ok"}, "required"),
    (  # the reply's finish_reason, normalised: the same type
        "AuditEvent",
        {
            "id": "r1",
            "status": "ok",
            "route": None,
            "provider": None,
            "model": None,
            "attempts": [],
            "latency_ms": 1.0,
            "trace_id": None,
            "ts_unix_ms": 1,
            "finish_reason": "end_turn",
        },
        "enum",
    ),
    ("ProviderOk", {"status": "error", "content": "", "model": "m"}, "enum"),
    ("ProviderFailure", {"status": "error", "kind": "timeout"}, "required"),
    (
        "StreamReset",
        {"attempt": 1, "discard": "all", "error": {"type": "t", "message": ""}},
        "type",
    ),
]
DECODE = {tp.__name__: tp for tp in wire_spec.message_types()}


def _keywords(errors: Any) -> set[str]:
    """The keywords that failed, at any depth (an anyOf's branches are its error's context)."""
    return {e.validator for e in errors} | {k for e in errors for k in _keywords(e.context)}


@pytest.mark.parametrize(("name", "body", "keyword"), INVALID, ids=lambda v: str(v)[:40])
def test_invalid_messages_are_refused_by_the_schema_as_by_the_decoder(name, body, keyword):
    errors = list(validator(name).iter_errors(body))
    assert errors, f"{name} schema accepted {body}"
    assert keyword in _keywords(errors)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(json.dumps(body), type=DECODE[name])


# What a dispatcher refuses whatever its config, after decoding (service.routing,
# service.shaping, service.faults): the schema refuses it too.
ROUTER = Router(parse_config(config({"echo": fake()}, allow_fault_injection=True)))
REFUSED_WHATEVER_THE_CONFIG = [
    (request_with(fallback_on=["bogus"]), "enum"),
    (request_with(fallback_on=[200]), "minimum"),
    (request_with(targets=[{"provider": "echo", "retry_on": ["bogus"]}]), "enum"),
    (request_with(targets=[{"provider": "echo", "retry_on": [600]}]), "maximum"),
    (request_with(targets=[{"provider": "echo", "drop": ["bogus"]}]), "enum"),
    (request_with(targets=[{"provider": "echo", "seed": 7, "drop": ["seed"]}]), "not"),
    (request_with(targets=[{"provider": "echo", "tools": False, "drop": ["tools"]}]), "not"),
    (
        request_with(
            targets=[{"provider": "echo", "parallel_tool_calls": True, "drop": ["tools"]}]
        ),
        "not",
    ),
    (request_with(targets=[{"provider": "echo", "timeout_s": 0.0005}]), "minimum"),
    (request_with(targets=[{"provider": "echo", "breaker": {"cooldown_s": 1}}]), "type"),
    (request_with(faults={"echo": "bogus"}), "anyOf"),
    (request_with(faults={"echo": 200}), "minimum"),
    (request_with(faults={"echo": ["ok", "timeout after 2"]}), "pattern"),
    (request_with(response_format={"type": "json_schema"}), "required"),
    (request_with(response_format={"type": "json_schema", "json_schema": None}), "type"),
    (request_with(response_format={"type": "regex"}), "required"),
    (request_with(response_format={"type": "regex", "pattern": ""}), "minLength"),
    (request_with(tool_choice="required"), "required"),
    (request_with(tool_choice={"name": "get_weather"}), "required"),
    (request_with(tool_choice="required", tools=[]), "minItems"),
]
# Their accepted neighbours: valid under the schema, and planned.
ACCEPTED = [
    request_with(fallback_on=["rate_limit", 503]),
    request_with(
        targets=[{"provider": "echo", "retry_on": ["timeout", 429], "drop": ["seed", "tools"]}]
    ),
    request_with(targets=[{"provider": "echo", "breaker": None}]),
    request_with(targets=[{"provider": "echo", "seed": None, "stop": ["END"], "drop": ["seed"]}]),
    request_with(targets=[{"provider": "echo", "timeout_s": 0.001}]),
    request_with(faults={"echo": ["ok", None, "timeout", "invalid_output", 429]}),
    request_with(faults={"echo": ["503 after 2", "rate_limit after 0"]}),
    request_with(response_format={"type": "json_schema", "json_schema": {"name": "w"}}),
    request_with(response_format={"type": "regex", "pattern": "^[0-9]+$"}),
    request_with(response_format={"type": "text"}),
    request_with(tool_choice="required", tools=[{"name": "get_weather"}]),
    request_with(tool_choice={"name": "get_weather"}, tools=[{"name": "get_weather"}]),
    request_with(tool_choice="auto"),
    request_with(tool_choice="none", tools=[]),
]


@pytest.mark.parametrize(
    ("body", "keyword"), REFUSED_WHATEVER_THE_CONFIG, ids=lambda v: str(v)[-60:]
)
def test_a_request_lifeline_always_refuses_is_invalid_under_the_schema(body, keyword):
    errors = list(validator("CompletionRequest").iter_errors(body))
    assert errors, f"the schema accepts {body}"
    assert keyword in _keywords(errors)
    msgspec.json.decode(json.dumps(body), type=CompletionRequest)  # decoded, then refused:
    with pytest.raises(Rejected) as refused:
        ROUTER.plan(json.dumps(body).encode())
    assert refused.value.error.type == "invalid_request"


@pytest.mark.parametrize("body", ACCEPTED, ids=lambda v: str(v)[-60:])
def test_its_accepted_neighbours_are_valid_and_planned(body):
    validator("CompletionRequest").validate(body)
    ROUTER.plan(json.dumps(body).encode())


def test_a_named_tool_the_request_does_not_offer_is_a_documented_refusal():
    """What JSON Schema cannot say (a value among another field's) is said in words."""
    body = request_with(tool_choice={"name": "other"}, tools=[{"name": "get_weather"}])
    validator("CompletionRequest").validate(body)
    with pytest.raises(Rejected, match="not one of the request's tools"):
        ROUTER.plan(json.dumps(body).encode())
    named = schema_file("CompletionRequest")["$defs"]["NamedTool"]
    assert "a request naming another is refused" in " ".join(named["description"].split())


def test_a_worker_failure_of_a_kind_not_in_error_kinds_is_invalid_under_its_schema():
    """The contract's rule (a worker's `kind` is one of the error kinds, which the conformance
    kit checks) is in the schema that workers in other languages validate their replies by;
    the dispatcher, lenient, still takes an unknown kind as a server_error."""
    failure = {"status": "error", "kind": "overheated", "message": "too hot"}
    errors = list(validator("ProviderFailure").iter_errors(failure))
    assert "enum" in _keywords(errors)
    for kind in ERROR_KINDS:
        validator("ProviderFailure").validate({**failure, "kind": kind})
    msgspec.json.decode(json.dumps(failure), type=ProviderFailure)  # decoded, then mapped


def test_integers_are_said_to_be_written_without_a_fraction(document):
    """JSON Schema counts 256.0 as an integer, Lifeline's decoders do not (and stay strict):
    each integer's schema says so, and so does the document."""
    body = request_with(max_tokens=256.0)
    validator("CompletionRequest").validate(body)  # valid JSON Schema, yet:
    with pytest.raises(msgspec.ValidationError, match="got `float`"):
        msgspec.json.decode(json.dumps(body), type=CompletionRequest)
    integers: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "integer":
                integers.append(node)
            for key, value in node.items():
                if key not in ("enum", "const", "default"):
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for tp in wire_spec.message_types():
        walk(schema_file(tp.__name__))
    walk(document["components"]["schemas"])
    assert len(integers) > 20
    assert all(node["description"] == wire_spec.INTEGER for node in integers)
    assert "Integers are written without a fraction" in document["info"]["description"]


def test_a_dead_letter_is_any_bytes_with_the_jobs_headers_as_submitted(document):
    tap = Wiretap(document)
    ref = document["channels"]["jobsDead"]["messages"]["job"]["$ref"]
    message = document["components"]["messages"]["jobsDead.job"]
    assert message["contentType"] == "application/octet-stream"
    headers = {subjects.JOB_ERROR: "RuntimeError: boom", subjects.MSG_ID: "j1", "X-Own": "kept"}
    for body in (b"this is not JSON", b"", b"\xff\xfe", encoder.encode(REAL[0])):
        assert tap.fits(ref, headers, body), body
    assert not tap.fits(ref, {subjects.MSG_ID: "j1"}, b"{}")  # Lifeline-Error, always


def test_the_abort_key_header_has_its_length_limit(document):
    for key in ("complete.request", "stream.request"):
        header = document["components"]["messages"][key]["headers"]["properties"][
            subjects.ABORT_KEY
        ]
        assert header["maxLength"] == subjects.MAX_ABORT_KEY_LENGTH == 256
        assert "cannot be aborted" in header["description"]


def test_only_an_error_event_may_name_attempt_0(document):
    messages = document["components"]["messages"]
    for name in ("delta", "toolCall", "reset", "end", "error"):
        attempt = messages[f"streamEvents.{name}"]["headers"]["properties"][subjects.ATTEMPT_NO]
        assert ("0 when no attempt started" in attempt["description"]) == (name == "error")


def test_a_heartbeat_carries_neither_an_events_number_nor_its_attempt(document):
    """A heartbeat is unnumbered: the document refused only one carrying both Lifeline-Seq and
    Lifeline-Attempt (`not` all of them required), and took one with either alone."""
    tap = Wiretap(document)
    ref = document["channels"]["streamEvents"]["messages"]["heartbeat"]["$ref"]
    beat = {subjects.EVENT: "heartbeat"}
    assert tap.fits(ref, beat, b"")
    for numbered in ({subjects.SEQ: "3"}, {subjects.ATTEMPT_NO: "1"}):
        assert not tap.fits(ref, {**beat, **numbered}, b""), numbered


README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readmes_request_examples_are_valid_requests():
    examples = [
        json.loads(block)
        for block in re.findall(r"```json\n(.*?)```", README, re.DOTALL)
        if '"messages"' in block
    ]
    assert len(examples) >= 4
    for example in examples:
        validator("CompletionRequest").validate(example)
        msgspec.json.decode(json.dumps(example), type=CompletionRequest)


# ---- the official AsyncAPI parser --------------------------------------------------------


def run_parser(path: Any) -> subprocess.CompletedProcess[str]:
    if not PARSER.is_dir():
        pytest.fail(
            "tests/node's packages are missing: `make test` installs them, or run "
            "`npm ci --prefix tests/node --no-audit --no-fund --ignore-scripts`"
        )
    assert NODE is not None
    return subprocess.run(
        [NODE, str(VALIDATE), str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


needs_node = pytest.mark.skipif(
    NODE is None, reason="node is not installed: the official AsyncAPI parser runs on Node.js 20"
)


@needs_node
def test_the_official_asyncapi_parser_accepts_the_document(generated, tmp_path):
    path = tmp_path / "asyncapi.json"
    path.write_text(generated["asyncapi.json"], encoding="utf-8")
    result = run_parser(path)
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(generated["asyncapi.json"])
    channels, operations = len(document["channels"]), len(document["operations"])
    messages = len(document["components"]["messages"])
    assert (
        f"valid AsyncAPI 3.0.0, {channels} channels, {operations} operations, {messages} messages"
    ) in result.stdout


@needs_node
def test_the_parser_check_fails_on_a_broken_document(document, tmp_path):
    """The check can fail: an operation on a channel that does not exist is reported."""
    broken = json.loads(json.dumps(document))
    broken["operations"]["audit"]["channel"] = {"$ref": "#/channels/nowhere"}
    del broken["channels"]["audit"]["parameters"]["status"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken), encoding="utf-8")
    result = run_parser(path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "'#/channels/nowhere' does not exist" in result.stdout
    assert "asyncapi3-channel-parameters" in result.stdout


# ---- true of the wire ---------------------------------------------------------------------


class Wiretap:
    """Every message a `>` subscription sees, sorted into the document's channels: by address,
    or by the subject a message before it named for its reply. Each must be exactly one of its
    channel's messages, headers and body."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        registry = Registry().with_resource("urn:asyncapi", Resource(document, DRAFT7))
        self.valid = lambda schema, value: jsonschema.Draft7Validator(
            schema, registry=registry
        ).is_valid(value)
        self.addressed = [
            (re.compile("^" + re.sub(r"\\{\w+\\}", r"[^.]+", re.escape(c["address"])) + "$"), key)
            for key, c in document["channels"].items()
            if c["address"] is not None
        ]
        self.named: dict[str, str] = {}  # a subject named by an earlier message -> its channel
        self.seen: set[str] = set()
        self.wrong: list[str] = []
        self.audit_ids: list[str] = []  # the Nats-Msg-Id of each audit event that has one

    async def on_msg(self, msg: Msg) -> None:
        if msg.subject.startswith("$"):  # JetStream's API, key-value buckets
            return
        key = self.named.get(msg.subject) or next(
            (key for pattern, key in self.addressed if pattern.match(msg.subject)), None
        )
        if key is None:
            if msg.subject.startswith(subjects.NAMESPACE):
                self.wrong.append(f"{msg.subject}: in no channel")
            return  # a JetStream acknowledgement, a pull's status, ...
        headers = dict(msg.headers or {})
        messages = self.document["channels"][key]["messages"]
        fits = [name for name, ref in messages.items() if self.fits(ref["$ref"], headers, msg.data)]
        if len(fits) != 1:
            self.wrong.append(f"{key} on {msg.subject}: fits {fits}: {headers} {msg.data[:300]!r}")
            return
        self.seen.add(f"{key}.{fits[0]}")
        if key == "audit" and subjects.MSG_ID in headers:
            self.audit_ids.append(headers[subjects.MSG_ID])
        operation = self.document["operations"].get(key, {})
        if "reply" in operation:
            reply = operation["reply"]
            to = reply["channel"]["$ref"].rpartition("/")[2]
            location = reply.get("address", {}).get("location")
            subject = headers.get(location.rpartition("/")[2]) if location else msg.reply
            if subject:
                self.named[subject] = to
        # Subjects named in a header, as the header's description says.
        for header, channel in (
            (subjects.STREAM_TO, "providerChunks"),
            (subjects.JOB_EVENTS, "jobEvents"),
        ):
            if header in headers:
                self.named[headers[header]] = channel

    def fits(self, ref: str, headers: dict[str, str], data: bytes) -> bool:
        message = self.document["components"]["messages"][ref.rpartition("/")[2]]
        if not self.valid(message.get("headers", {}), headers):
            return False
        ref = "urn:asyncapi" + message["payload"]["$ref"]
        if message.get("contentType") == "application/octet-stream":
            return True  # any bytes
        if message.get("contentType", "").startswith("text/plain"):
            return self.valid({"$ref": ref}, data.decode())
        try:
            value = json.loads(data)
        except ValueError:  # an empty body, say: no JSON message fits it
            return False
        return self.valid({"$ref": ref}, value)


async def test_every_message_a_running_lifeline_sends_is_in_the_document(
    document, lifeline, client, audit, nats_url
):
    tap = Wiretap(document)
    wiretap = await nats.connect(nats_url)
    try:
        await wiretap.subscribe(">", cb=tap.on_msg)
        await ensure_subscribed(wiretap)
        providers = {
            "sleepy": fake(hang=True, timeout_s=0.3),  # times out: a cancel
            "flaky": fake(fail_on_request=True, chunks=4),  # an error, or a reset mid-stream
            "agent": fake(
                reply="It is sunny.",
                chunks=3,
                tool_calls=[{"name": "get_weather", "arguments": '{"city": "Paris"}'}],
            ),
            "slowpoke": fake(latency_ms=600),  # heartbeats before its reply
        }
        stack = await lifeline(config(providers))
        trace = {subjects.TRACEPARENT: "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"}
        ask = {"messages": [{"role": "user", "content": "fail 503"}], "tools": [WEATHER]}
        headers = {**trace, subjects.ABORT_KEY: "k-wiretap"}
        msg = await client.request(subjects.COMPLETE, encoder.encode(ask), 5, headers=headers)
        assert json.loads(msg.data)["tool_calls"][0]["name"] == "get_weather"
        await client.publish(subjects.ABORT, b"k-wiretap")  # answered already: nothing happens
        wrong_route = encoder.encode({**ask, "route": "nowhere"})
        assert b"unknown_route" in (await client.request(subjects.COMPLETE, wrong_route, 5)).data
        request = CompletionRequest([ChatMessage("user", "fail 503 after 2")], tools=[WEATHER])
        text, reply = await stream_text(client, request)
        assert (text, reply.stream.resets) == ("It is sunny.", 1)  # type: ignore[union-attr]
        _, reply = await stream_text(client, msgspec.structs.replace(request, route="nowhere"))
        assert reply.status == "error"
        # Two jobs, each with its result and its events on subjects of the client's (the tap
        # sees them).
        results = await client.subscribe("results.wiretap", max_msgs=3)
        js = client.jetstream()
        for job_id, route in (("wiretap-job", "default"), ("wiretap-bad-job", "nowhere")):
            job = {"id": job_id, "route": route, "messages": request.messages, "tools": [WEATHER]}
            headers = {
                subjects.MSG_ID: job_id,
                subjects.NOTIFY: "results.wiretap",
                subjects.JOB_EVENTS: "events.wiretap",
            }
            await js.publish(subjects.JOBS_SUBMIT, encoder.encode(job), headers=headers)
            assert json.loads((await results.next_msg(timeout=10)).data)["id"] == job_id
        # A job with no id at all: answered as seq-<N>, audited under job:anon.<N>.<µs>.
        anonymous = {"messages": request.messages, "tools": [WEATHER]}
        headers = {subjects.NOTIFY: "results.wiretap"}
        await js.publish(subjects.JOBS_SUBMIT, encoder.encode(anonymous), headers=headers)
        assert json.loads((await results.next_msg(timeout=10)).data)["id"].startswith("seq-")
        # Results read by id: one stored, one there is none of.
        reading = Lifeline(client)
        slow = await reading.complete("slow", targets=["slowpoke"], heartbeat_s=0.2)
        assert slow.provider == "slowpoke"
        assert (await reading.result("wiretap-job")).id == "wiretap-job"  # type: ignore[union-attr]
        assert await reading.result("no-such-job") is None
        await audit.wait_for(8)
        await settled(wiretap, stack)
        # Everything in the document went by, but the dead letter (it takes a bug in Lifeline).
        every = {f"{c}.{m}" for c, ch in document["channels"].items() for m in ch["messages"]}
        await wait_for(
            lambda: tap.seen == every - {"jobsDead.job"} or tap.wrong,
            what=lambda: f"seen only {sorted(tap.seen)}",
        )
        assert tap.wrong == []
        assert tap.seen == every - {"jobsDead.job"}
        digest = re.compile("^job:[0-9a-f]{40}$")
        assert sorted(bool(digest.match(i)) for i in tap.audit_ids) == [False, True, True]
        assert [i for i in tap.audit_ids if i.startswith("job:anon.")]
    finally:
        await wiretap.close()
