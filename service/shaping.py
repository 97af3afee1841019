"""What a request looks like to one target, and whether an answer is what it asked for.

Shaping / shape()        a target's model, parameters and prompt template applied to the
                         request, and the request parameters it drops, giving that target's
                         ProviderRequest
estimate_tokens()        input size in tokens, estimated offline (for max_input_tokens):
                         text, images, tool calls and the tools' definitions
output_validator()       what the request asks of an answer, as checks: response_format
                         (JSON that parses and validates against its JSON Schema, formats
                         such as date-time included; or a regular expression the whole
                         answer matches), tool_choice (a tool call, of the named tool), tool
                         calls whose arguments validate against their tool's parameters, and
                         with fail_on_length an answer not cut short by max_tokens
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jsonschema
import jsonschema._keywords
import jsonschema._utils
import msgspec
import regex
from msgspec import Struct

from schemas import ChatMessage, CompletionRequest, ProviderFailure, ProviderOk, ProviderRequest
from schemas.wire import ImagePart, NamedTool, ResponseFormat, TextPart, Tool


class Template(Struct, frozen=True, forbid_unknown_fields=True):
    """A per-target prompt. Placeholders are replaced literally (braces in prompts are safe);
    {previous_errors} works in both fields: the error kinds of the attempts before this one,
    comma-separated, for a target with pass_failures (empty otherwise)."""

    # Replaces the request's system messages; {system} stands for their text.
    system: str | None = None
    user: str | None = None  # replaces the last user message; must contain {input}, its text

    def __post_init__(self) -> None:
        if self.system is None and self.user is None:
            raise ValueError("a template needs `system`, `user` or both")
        if self.user is not None and "{input}" not in self.user:
            raise ValueError("`user` must contain {input}, or the user's message would be dropped")


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


class Shaping(NamedTuple):
    """A target's own request parameters; None leaves the request's value."""

    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    template: Template | None = None
    template_name: str | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    parallel_tool_calls: bool | None = None
    drop: frozenset[str] = frozenset()  # of DROPPABLE: left out of what this target is sent


def shape(
    base: ProviderRequest, shaping: Shaping, previous_errors: Sequence[str] = ()
) -> ProviderRequest:
    messages = base.messages
    if shaping.template is not None:
        messages = apply_template(messages, shaping.template, previous_errors)
    own = {
        "model": shaping.model,
        "temperature": shaping.temperature,
        "max_tokens": shaping.max_tokens,
        "top_p": shaping.top_p,
        "stop": list(shaping.stop) if shaping.stop is not None else None,
        "seed": shaping.seed,
        "parallel_tool_calls": shaping.parallel_tool_calls,
    }
    changes: dict[str, Any] = {name: value for name, value in own.items() if value is not None}
    for name in shaping.drop:
        changes[name] = None
    if "tools" in shaping.drop:  # a choice among no tools means nothing to the provider
        changes["tool_choice"] = changes["parallel_tool_calls"] = None
    return msgspec.structs.replace(base, messages=messages, **changes)


def apply_template(
    messages: Sequence[ChatMessage], template: Template, previous_errors: Sequence[str] = ()
) -> list[ChatMessage]:
    """`system` replaces the request's system messages ({system} stands for their text);
    `user` replaces the last user message ({input} stands for its text). In both,
    {previous_errors} stands for the error kinds of the attempts before (pass_failures)."""
    out = list(messages)
    errors = ", ".join(previous_errors)
    if template.system is not None:
        own = "\n\n".join(m.text for m in out if m.role == "system")
        text = template.system.replace("{previous_errors}", errors).replace("{system}", own).strip()
        out = ([ChatMessage("system", text)] if text else []) + [
            m for m in out if m.role != "system"
        ]
    if template.user is not None:
        for i in range(len(out) - 1, -1, -1):
            if out[i].role == "user":
                text = template.user.replace("{previous_errors}", errors).replace(
                    "{input}", out[i].text
                )
                out[i] = ChatMessage("user", _with_text(out[i], text))
                break
    return out


def _with_text(message: ChatMessage, text: str) -> str | list[Any]:
    """The message's content with its text replaced by `text`; its images stay."""
    content = message.content
    if content is None or isinstance(content, str):
        return text
    return [TextPart(text), *(part for part in content if isinstance(part, ImagePart))]


def template_tokens(template: Template) -> int:
    """What a template adds to a request, estimated like the input itself."""
    text = "".join(part for part in (template.system, template.user) if part)
    for placeholder in ("{system}", "{input}", "{previous_errors}"):
        text = text.replace(placeholder, "")
    return text_tokens(text)


# ---- token estimate ----------------------------------------------------------------

_PER_MESSAGE = 4  # role and separators, as OpenAI's chat format counts them
_ASCII_CHARS_PER_TOKEN = 4  # English prose in the GPT and Claude tokenizers
# An image: OpenAI counts 765 tokens for a high-detail 1024x1024 one, Anthropic about 1,600
# for its largest (1092x1092); without decoding the image, a middle figure.
_IMAGE_TOKENS = 1000


def estimate_tokens(messages: Sequence[ChatMessage], tools: Sequence[Tool] | None = None) -> int:
    """About how many tokens the messages (and the tools' definitions) take, without a
    tokenizer or the network.

    ASCII text counts 4 characters per token; every other character counts a whole token,
    which is close for CJK scripts and errs high for accented Latin text. Errors either
    way are caught: an estimate too high sends the request to a longer-context target; one
    too low gets a context_length failure, which has its own fallback chain.
    """
    total = 3
    for m in messages:
        total += _PER_MESSAGE + text_tokens(m.text) + _IMAGE_TOKENS * m.images
        for call in m.tool_calls or ():
            total += _PER_MESSAGE + text_tokens(call.name) + text_tokens(call.arguments)
    if tools:
        total += text_tokens(msgspec.json.encode(tools).decode())
    return total


def text_tokens(text: str) -> int:
    ascii_chars = len(text.encode("ascii", "ignore"))
    return math.ceil(ascii_chars / _ASCII_CHARS_PER_TOKEN) + (len(text) - ascii_chars)


# ---- output validation -------------------------------------------------------------

_decode = msgspec.json.decode
_validators: OrderedDict[bytes, jsonschema.protocols.Validator] = OrderedDict()
_VALIDATORS_KEPT = 256  # compiled schemas, most recently used; requests usually repeat a few
# A larger schema is compiled per request: 256 of them could hold 256 MiB.
_CACHED_SCHEMA_BYTES = 16 * 1024
# A regular expression from a request runs on the event loop: a pathological one (nested
# quantifiers on a long answer) must not stall every other request for long.
_REGEX_TIMEOUT_S = 0.05
_MAX_PATTERN_CHARS = 1000
_MAX_REPEATS = 100_000  # counted repeats multiplied: about 40 ms to compile, at the most
_COUNTED_REPEAT = re.compile(r"(?<!\\)\{(\d*)(?:,(\d*))?\}")

Check = Callable[[ProviderOk], ProviderOk | str]  # the answer (perhaps unfenced), or what failed


class _Patterns(threading.local):
    """Stands in for the `re` module inside jsonschema's keyword code, which runs a schema's
    regular expressions (`pattern`, and `patternProperties` for its own keyword and for
    `additionalProperties` and `unevaluatedProperties`) with re, which cannot be stopped: a
    request's schema with nested quantifiers, such as "^(a+)+$", on an answer of 30 letters
    would hold the event loop, and every other request, for minutes. While an answer is
    checked (`within`), each such search runs on the regex module with what is left of the
    answer's budget, and past it raises TimeoutError; at any other time it is re's own.
    Upstream, jsonschema has no way to choose the engine yet (python-jsonschema/jsonschema
    #1142, PR #1561); tests/test_shaping.py fails if the modules stop calling re.search."""

    deadline: float | None = None

    def search(self, pattern: str, string: str, flags: int = 0) -> Any:
        if self.deadline is None:
            return re.search(pattern, string, flags)
        left = self.deadline - time.perf_counter()
        if left <= 0:
            raise TimeoutError
        return regex.search(pattern, string, flags, timeout=left)

    def __getattr__(self, name: str) -> Any:
        return getattr(re, name)


_PATTERNS = _Patterns()
jsonschema._keywords.re = _PATTERNS  # type: ignore[attr-defined]
jsonschema._utils.re = _PATTERNS  # type: ignore[attr-defined]


class Validator:
    """Checks a good answer against what the request asked; the first check that fails makes
    it an invalid_output failure. Messages say where the answer failed, never quote it (the
    attempts reach the audit event, which carries no answer text)."""

    __slots__ = ("checks",)

    def __init__(self, checks: Sequence[Check]) -> None:
        self.checks = tuple(checks)

    def __call__(self, answer: ProviderOk) -> ProviderOk | ProviderFailure:
        _PATTERNS.deadline = time.perf_counter() + _REGEX_TIMEOUT_S  # for the whole answer
        try:
            for check in self.checks:
                result = check(answer)
                if isinstance(result, str):
                    return ProviderFailure("invalid_output", result)
                answer = result
        finally:
            _PATTERNS.deadline = None
        return answer


def output_validator(request: CompletionRequest) -> Validator | None:
    """The checks for what `request` asks of an answer (None: it asks nothing); raises
    ValueError for an unusable response_format or tool schema."""
    checks: list[Check] = []
    response_format = request.response_format
    if response_format is not None and response_format.type != "text":
        checks.append(_format_check(response_format))
    if request.tools:
        checks.append(_ToolCheck(request.tools, request.tool_choice))
    elif isinstance(request.tool_choice, NamedTool) or request.tool_choice == "required":
        raise ValueError("tool_choice asks for a tool call, but the request has no tools")
    if request.fail_on_length:
        checks.append(_not_cut_short)
    return Validator(checks) if checks else None


def wants_json(response_format: ResponseFormat | None) -> bool:
    """Whether the answer must be JSON (a target with json_output = false cannot give it)."""
    return response_format is not None and response_format.type in ("json_object", "json_schema")


def _format_check(response_format: ResponseFormat) -> Check:
    if response_format.type == "regex":
        return _regex_check(response_format.pattern)
    if response_format.type == "json_object":
        return _JsonCheck(None, None)
    spec = response_format.json_schema
    if spec is None:
        raise ValueError(
            'response_format type "json_schema" needs a json_schema object: '
            '{"name": ..., "schema": {...}}'
        )
    return _JsonCheck(spec.name, _compiled(spec.schema, "response_format.json_schema.schema"))


def _compiled(schema: dict[str, Any], where: str) -> jsonschema.protocols.Validator:
    """A validator for `schema` with format checking on (date-time, email, ...), compiled once
    per schema while it stays in use."""
    key = msgspec.json.encode(schema)
    validator = _validators.get(key)
    if validator is not None:
        _validators.move_to_end(key)
        return validator
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise ValueError(f"{where} is not a valid JSON Schema: {exc.message}") from None
    except RecursionError:  # msgspec reads deeper JSON than jsonschema can walk
        raise ValueError(f"{where} is nested too deeply to check answers against") from None
    for pattern in _schema_patterns(schema):  # compiled now, and by the regex module's cache
        _regex_of(pattern, f"{where}: the pattern {pattern[:40]!r}")
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    if len(key) <= _CACHED_SCHEMA_BYTES:
        _validators[key] = validator
        if len(_validators) > _VALIDATORS_KEPT:
            _validators.popitem(last=False)
    return validator


def _schema_error(validator: jsonschema.protocols.Validator, value: Any) -> str | None:
    """Where `value` fails `validator`, said from the schema's side (jsonschema's own message
    quotes the value)."""
    try:
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    except TimeoutError:
        return (
            f"the schema's patterns took over {_REGEX_TIMEOUT_S * 1000:g} ms on the answer; "
            "simplify them (nested quantifiers such as (a+)+ take time exponential in the text)"
        )
    except RecursionError:
        return "the answer is nested too deeply to check against the schema"
    if error is None:
        return None
    # The place in the schema, not in the value: a value's own keys (under
    # additionalProperties, say) are answer text or tool arguments, which the message, and so
    # the audit event, must not carry.
    where = "/".join(str(p) for p in list(error.absolute_schema_path)[:-1])  # less the rule
    place = f"at schema {where}" if where else "at the top level"
    rule = msgspec.json.encode(error.validator_value).decode()[:120]
    return f"{place}, {error.validator} {rule} fails"


class _JsonCheck:
    """response_format json_object or json_schema: JSON that parses (from inside a Markdown
    fence too), an object, and valid against the schema."""

    __slots__ = ("schema_name", "validator")

    def __init__(
        self, schema_name: str | None, validator: jsonschema.protocols.Validator | None
    ) -> None:
        self.schema_name = schema_name
        self.validator = validator

    def __call__(self, answer: ProviderOk) -> ProviderOk | str:
        if answer.tool_calls and not answer.content:
            return answer  # it calls tools instead of answering: the tool checks judge that
        text = _unfenced(answer.content)
        try:
            value = _decode(text)
        except msgspec.DecodeError as exc:
            return f"the answer is not valid JSON ({exc}; {len(text)} characters)"
        except RecursionError:  # msgspec's answer to JSON nested deeper than it can follow
            return f"the answer's JSON is nested too deeply to read ({len(text)} characters)"
        if self.validator is None:
            if not isinstance(value, dict):
                return f"json_object asks for an object; the answer is a {type(value).__name__}"
        else:
            error = _schema_error(self.validator, value)
            if error is not None:
                return f"the answer does not match schema {self.schema_name!r}: {error}"
        return msgspec.structs.replace(answer, content=text) if text != answer.content else answer


def _regex_of(pattern: str, where: str) -> regex.Pattern[str]:
    """A request's regular expression, compiled by the regex module once it is known to
    compile quickly: the module builds every counted repeat out ({n}, {m,n}), in time and
    memory that grow with the counts multiplied and cannot be stopped (19 characters,
    "(?:a{60000}){60000}", never finish), so their product is capped; ValueError says why
    not."""
    if len(pattern) > _MAX_PATTERN_CHARS:
        raise ValueError(f"{where} is over {_MAX_PATTERN_CHARS} characters")
    repeats = 1
    for low, high in _COUNTED_REPEAT.findall(pattern):
        count = high or low or "1"
        repeats *= max(int(count), 1) if len(count) < 10 else _MAX_REPEATS + 1
        if repeats > _MAX_REPEATS:
            raise ValueError(
                f"{where} has counted repeats ({{n}}, {{m,n}}) that multiply to over "
                f"{_MAX_REPEATS:,}; use + or * for long runs"
            )
    try:
        return regex.compile(pattern)
    except regex.error as exc:
        raise ValueError(f"{where} is not a regular expression: {exc}") from None
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply") from None


def _schema_patterns(node: Any) -> Iterator[str]:
    """Every regular expression in a JSON Schema: `pattern` values, `patternProperties` keys."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                yield value
            elif key == "patternProperties" and isinstance(value, dict):
                yield from value
            yield from _schema_patterns(value)
    elif isinstance(node, list):
        for item in node:
            yield from _schema_patterns(item)


def _regex_check(pattern: str | None) -> Check:
    """response_format regex: the whole answer (without surrounding whitespace) matches."""
    if not pattern:
        raise ValueError('response_format type "regex" needs a pattern')
    compiled = _regex_of(pattern, "response_format.pattern")

    def check(answer: ProviderOk) -> ProviderOk | str:
        text = answer.content.strip()
        try:
            matched = compiled.fullmatch(text, timeout=_REGEX_TIMEOUT_S)
        except TimeoutError:
            return (
                f"response_format.pattern took over {_REGEX_TIMEOUT_S * 1000:g} ms on the answer "
                f"({len(text)} characters); simplify the pattern"
            )
        if matched is None:
            return f"the answer ({len(text)} characters) does not match response_format.pattern"
        return msgspec.structs.replace(answer, content=text) if text != answer.content else answer

    return check


class _ToolCheck:
    """tool_choice kept (required: a tool call; a named tool: calls of that tool only), and
    every tool call names one of the request's tools with arguments that are a JSON object
    valid against the tool's parameters."""

    __slots__ = ("choice", "tools")

    def __init__(self, tools: Sequence[Tool], choice: object) -> None:
        self.tools = {
            tool.name: _compiled(tool.parameters, f"tools[{i}].parameters")
            if tool.parameters
            else None
            for i, tool in enumerate(tools)
        }
        if isinstance(choice, NamedTool) and choice.name not in self.tools:
            raise ValueError(
                f"tool_choice names {choice.name!r}, which is not one of the request's tools "
                f"({', '.join(self.tools)})"
            )
        self.choice = choice

    def __call__(self, answer: ProviderOk) -> ProviderOk | str:
        calls = answer.tool_calls or []
        choice = self.choice
        if not calls and (choice == "required" or isinstance(choice, NamedTool)):
            wanted = "a call of " + choice.name if isinstance(choice, NamedTool) else "a tool call"
            return f"tool_choice asks for {wanted}; the answer calls no tool"
        for call in calls:
            if isinstance(choice, NamedTool) and call.name != choice.name:
                return f"tool_choice asks for {choice.name}; the answer calls another tool"
            if call.name not in self.tools:
                return f"tool call {call.id!r} names a tool the request does not offer"
            try:
                arguments = _decode(call.arguments)
            except msgspec.DecodeError as exc:
                return f"the arguments of tool call {call.id!r} are not valid JSON ({exc})"
            except RecursionError:
                return f"the arguments of tool call {call.id!r} are nested too deeply to read"
            if not isinstance(arguments, dict):
                return f"the arguments of tool call {call.id!r} are not a JSON object"
            validator = self.tools[call.name]
            error = _schema_error(validator, arguments) if validator is not None else None
            if error is not None:
                return (
                    f"the arguments of tool call {call.id!r} ({call.name}) fail its "
                    f"parameters: {error}"
                )
        return answer


def _not_cut_short(answer: ProviderOk) -> ProviderOk | str:
    if answer.finish_reason == "length":
        return "the answer was cut short by max_tokens (finish_reason length; fail_on_length)"
    return answer


def _unfenced(text: str) -> str:
    """The JSON inside a Markdown code fence, which models add even when asked for JSON."""
    stripped = text.strip()
    if stripped.startswith("```") and stripped.endswith("```") and len(stripped) > 6:
        body = stripped[3:-3]
        newline = body.find("\n")
        if newline != -1 and body[:newline].strip().isalpha():  # ```json
            body = body[newline + 1 :]
        return body.strip()
    return stripped
