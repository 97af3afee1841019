"""What a request looks like to one target, and whether an answer is what it asked for.

Shaping / shape()        a target's model, parameters and prompt template applied to the
                         request, and the request parameters it drops, giving that target's
                         ProviderRequest
estimate_tokens()        input size in tokens, estimated offline (for max_input_tokens):
                         text, images, tool calls and the tools' definitions
output_validator()       what the request asks of an answer, as checks: response_format
                         (JSON that parses and validates against its JSON Schema, formats
                         such as date-time included; or a regular expression the whole
                         answer matches), tool_choice (a tool call, of the named tool; or
                         none with none), tool calls whose arguments validate against their
                         tool's parameters, and with fail_on_length an answer not cut short
                         by max_tokens
"""

from __future__ import annotations

import difflib
import math
import re
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jsonschema_rs
import msgspec
import regex
from msgspec import Struct

from schemas import ChatMessage, CompletionRequest, ProviderFailure, ProviderOk, ProviderRequest
from schemas.wire import ImagePart, NamedTool, Part, ResponseFormat, TextPart, Tool

# The placeholders each field of a Template fills (apply_template); {previous_errors} is the
# error kinds of the attempts before this one, comma-separated, for a target with pass_failures
# (empty otherwise).
PLACEHOLDERS = {"system": ("system", "previous_errors"), "user": ("input", "previous_errors")}
# A bare name in braces reads as a placeholder: one a field does not fill would reach the
# provider as written ({sytem}), the prompt it was meant to bring left out. Other braces (JSON,
# `{a, b}`, `{ name }`) are prompt text.
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class Template(Struct, frozen=True, forbid_unknown_fields=True):
    """A per-target prompt. Placeholders (PLACEHOLDERS) are replaced literally; braces around
    anything but a bare name are sent as written."""

    # Replaces the request's system messages; {system} stands for their text.
    system: str | None = None
    user: str | None = None  # replaces the last user message; must contain {input}, its text

    def __post_init__(self) -> None:
        if self.system is None and self.user is None:
            raise ValueError("a template needs `system`, `user` or both")
        if self.user is not None and "{input}" not in self.user:
            raise ValueError("`user` must contain {input}, or the user's message would be dropped")
        for field, known in PLACEHOLDERS.items():
            problem = _unknown_placeholder(field, getattr(self, field) or "", known)
            if problem is not None:
                raise ValueError(problem)


def _unknown_placeholder(field: str, text: str, known: tuple[str, ...]) -> str | None:
    """What is wrong with the first placeholder in `text` that `field` does not fill."""
    for name in _PLACEHOLDER.findall(text):
        if name in known:
            continue
        other = next((f for f, names in PLACEHOLDERS.items() if f != field and name in names), "")
        close = difflib.get_close_matches(name.lower(), known, n=1)
        if other:
            hint = f"{{{name}}} is filled in `{other}` only"
        elif close:
            hint = f"did you mean {{{close[0]}}}?"
        else:
            hint = "use one of those"
        fills = ", ".join(f"{{{k}}}" for k in known)
        return (
            f"`{field}` has {{{name}}}, not a placeholder it fills ({fills}): {hint} (for braces "
            f"sent as written, put a space inside: {{ {name} }})"
        )
    return None


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
    drop: frozenset[str] = frozenset()  # of schemas.wire.DROPPABLE: left out of what it is sent


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
    """`system` replaces the request's system and developer messages ({system} stands for
    their text, in order); `user` replaces the last user message ({input} stands for its text,
    its text parts joined by newlines; its images follow the templated text, in their order).
    In both, {previous_errors} stands for the error kinds of the attempts before
    (pass_failures)."""
    out = list(messages)
    errors = ", ".join(previous_errors)
    if template.system is not None:
        own = "\n\n".join(_text(m) for m in out if m.role in _SYSTEM_ROLES)
        text = template.system.replace("{previous_errors}", errors).replace("{system}", own).strip()
        out = ([ChatMessage("system", text)] if text else []) + [
            m for m in out if m.role not in _SYSTEM_ROLES
        ]
    if template.user is not None:
        for i in range(len(out) - 1, -1, -1):
            if out[i].role == "user":
                text = template.user.replace("{previous_errors}", errors).replace(
                    "{input}", _text(out[i])
                )
                out[i] = ChatMessage("user", _with_text(out[i], text))
                break
    return out


# developer is OpenAI's name for system instructions: a template's `system` replaces it too
_SYSTEM_ROLES = ("system", "developer")


def _text(message: ChatMessage) -> str:
    """The message's text, its text parts joined by newlines (ChatMessage.text glues them)."""
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(part.text for part in content if isinstance(part, TextPart))


def _with_text(message: ChatMessage, text: str) -> str | list[Any]:
    """The message's content with its text replaced by `text`; its images follow, in order."""
    content = message.content
    if content is None or isinstance(content, str):
        return text
    return [TextPart(text), *(part for part in content if isinstance(part, ImagePart))]


def estimate_shaped(
    messages: Sequence[ChatMessage], tools: Sequence[Tool] | None, template: Template
) -> int:
    """estimate_tokens of the messages as `template` makes them (it may repeat {input}, or
    replace a long system prompt; {previous_errors} counted empty)."""
    return estimate_tokens(apply_template(messages, template), tools)


# ---- token estimate ----------------------------------------------------------------

_BASE_TOKENS = 3  # the reply's priming, as OpenAI's chat format counts it
_PER_MESSAGE = 4  # role and separators, as OpenAI's chat format counts them
_ASCII_CHARS_PER_TOKEN = 4  # English prose in the GPT and Claude tokenizers
# An image: OpenAI counts 765 tokens for a high-detail 1024x1024 one, Anthropic about 1,600
# for its largest (1092x1092); without decoding the image, a middle figure. In low detail,
# OpenAI's fixed 85 whatever its size (its vision guide; Anthropic, which has no detail,
# counts it as any other, an estimate too low that a context_length failure catches).
_IMAGE_TOKENS = 1000
_LOW_DETAIL_TOKENS = 85


def estimate_tokens(messages: Sequence[ChatMessage], tools: Sequence[Tool] | None = None) -> int:
    """About how many tokens the messages (and the tools' definitions) take, without a
    tokenizer or the network: 3, plus per message 4, its text and 1,000 per image (85 in low
    detail), plus per tool call 4, its name and arguments, plus the tools' definitions as JSON.

    ASCII text counts 4 characters per token; every other character counts a whole token,
    which is close for CJK scripts and errs high for accented Latin text. Errors either
    way are caught: an estimate too high sends the request to a longer-context target; one
    too low gets a context_length failure, which has its own fallback chain.

    """
    total = _BASE_TOKENS
    for m in messages:
        total += _PER_MESSAGE + text_tokens(m.text) + _image_tokens(m.content)
        for call in m.tool_calls or ():
            total += _PER_MESSAGE + text_tokens(call.name) + text_tokens(call.arguments)
    if tools:
        total += text_tokens(msgspec.json.encode(tools).decode())
    return total


def _image_tokens(content: str | list[Part] | None) -> int:
    if content is None or isinstance(content, str):
        return 0
    return sum(
        _LOW_DETAIL_TOKENS if part.detail == "low" else _IMAGE_TOKENS
        for part in content
        if isinstance(part, ImagePart)
    )


def text_tokens(text: str) -> int:
    ascii_chars = len(text.encode("ascii", "ignore"))
    return math.ceil(ascii_chars / _ASCII_CHARS_PER_TOKEN) + (len(text) - ascii_chars)


# ---- output validation -------------------------------------------------------------

_decode = msgspec.json.decode
_schemas: OrderedDict[bytes, _Schema] = OrderedDict()
_SCHEMAS_KEPT = 64  # compiled schemas, most recently used; requests usually repeat a few
# A larger schema is compiled per request: 64 of them could hold 64 MiB.
_CACHED_SCHEMA_BYTES = 16 * 1024
# A request's schema is the client's code run on the dispatcher's event loop, for every
# answer; these bound its work and memory whatever the client writes:
# - patterns run on Rust's linear-time regex engine (no backreferences, no lookaround), each
#   compiled into at most this many bytes (and as many for its matching cache): 24 KB of
#   `[\p{L}\p{N}]{200}` patterns took 440 MiB to compile, and kept it in the cache;
_PATTERN_BYTES = 256 * 1024
# - at most this many patterns in one schema, and a cached schema this many;
_MAX_PATTERNS, _CACHED_PATTERNS = 64, 8
# - at most this many subschemas once its $refs are followed: each $ref is the schema it
#   names, so 28 levels of two refs to the next made 2**28 checks per answer (6 s of a
#   stalled event loop, for a schema under 2 KB).
_MAX_EXPANDED = 10_000
# The message of a failed check says where it failed; finding that collects the failures of
# every branch tried, which for a large schema costs far more than the check: past this
# many subschemas, a failure says only that the answer does not match.
_EXPLAINED_UP_TO = 1_000
# A regular expression from a request runs on the event loop: a pathological one (nested
# quantifiers on a long answer) must not stall every other request for long. Python's `re` has
# no timeout; `regex` (Matthew Barnett's `re`-compatible engine, on PyPI since 2010 and
# released every few months) takes a timeout per match.
_REGEX_TIMEOUT_S = 0.05
_MAX_PATTERN_CHARS = 1000
_MAX_REPEATS = 100_000  # counted repeats multiplied: about 40 ms to compile, at the most
# A { after an even run of backslashes (none, or escaped ones: \\{1000} is a backslash a
# thousand times) opens a counted repeat; after an odd run (\{) it is a literal brace.
_COUNTED_REPEAT = re.compile(r"(?<!\\)(?:\\\\)*\{(\d*)(?:,(\d*))?\}")

Check = Callable[[ProviderOk], ProviderOk | str]  # the answer (perhaps unfenced), or what failed


class Validator:
    """Checks a good answer against what the request asked; the first check that fails makes
    it an invalid_output failure. Messages say where the answer failed, never quote it (the
    attempts reach the audit event, which carries no answer text)."""

    __slots__ = ("checks",)

    def __init__(self, checks: Sequence[Check]) -> None:
        self.checks = tuple(checks)

    def __call__(self, answer: ProviderOk) -> ProviderOk | ProviderFailure:
        for check in self.checks:
            result = check(answer)
            if isinstance(result, str):
                return ProviderFailure("invalid_output", result)
            answer = result
        return answer


def output_validator(request: CompletionRequest) -> Validator | None:
    """The checks for what `request` asks of an answer (None: it asks nothing); raises
    ValueError for an unusable response_format or tool schema."""
    response_format = request.response_format
    if (  # most requests ask nothing: told without the list (a few hundred instructions less)
        response_format is None
        and request.tool_choice is None
        and not request.tools
        and not request.fail_on_length
    ):
        return None
    checks: list[Check] = []
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


class _Schema:
    """A request's JSON Schema, compiled by jsonschema-rs (the `jsonschema` Rust crate's Python
    binding, draft 2020-12, released every few weeks), whose patterns run on Rust's regex
    engines (linear time, or a backtracking limit where lookaround needs one: no pattern
    stalls the loop), and which never fetches a remote $ref (offline). It replaced Python's
    `jsonschema` (still what the test suite checks the published wire schemas with), which took
    3.75 s of the event loop to check a request with a 900 KB schema and 4.6 s for one with
    12,000 tools (now 0.10 and 0.11 s), and ran a schema's patterns with `re`, where one
    request's `"^(a|a)+$"` could hold the dispatcher for days."""

    __slots__ = ("explained", "patterns", "schema", "validator")

    def __init__(self, schema: dict[str, Any], where: str) -> None:
        expanded, self.patterns = _measure(schema, where)
        self.explained = expanded <= _EXPLAINED_UP_TO
        try:
            self.validator = jsonschema_rs.validator_for(
                schema,
                validate_formats=True,
                offline=True,
                pattern_options=jsonschema_rs.RegexOptions(
                    size_limit=_PATTERN_BYTES, dfa_size_limit=_PATTERN_BYTES
                ),
            )
        except ValueError as exc:  # ValidationError (the schema's own), or its recursion limit
            first = str(exc).split("\n", 1)[0][:200]
            if first.startswith("Recursion limit"):  # tests/test_bad_input.py holds this text
                raise ValueError(f"{where} is nested too deeply to check answers against") from None
            raise ValueError(f"{where} is not a valid JSON Schema: {first}") from None
        self.schema = schema

    def error(self, value: Any) -> str | None:
        """Where `value` fails, said from the schema's side (the library's own message quotes
        the value): the place in the schema, never the value's own keys (under
        additionalProperties, say, they are answer text or tool arguments, which the message,
        and so the audit event, must not carry)."""
        try:
            if self.validator.is_valid(value):  # stops at the first failure; collects none
                return None
            if not self.explained:
                return "the answer does not match the schema (too large a schema to say where)"
            error = next(iter(self.validator.iter_errors(value)), None)
        except ValueError:  # its recursion limit, on an answer nested deeper than it follows
            return "the answer is nested too deeply to check against the schema"
        if error is None:
            return None
        path = list(error.schema_path)
        keyword = str(path[-1]) if path else "schema"
        where = "/".join(str(p) for p in path[:-1])
        place = f"at schema {where}" if where else "at the top level"
        rule = _rule(self.schema, path)
        return f"{place}, {keyword} {rule} fails" if rule else f"{place}, {keyword} fails"


# Keywords whose values are data, not subschemas: not walked.
_DATA_KEYWORDS = frozenset(("enum", "const", "default", "examples", "example"))


def _measure(schema: Any, where: str) -> tuple[int, int]:
    """How many subschemas checking an answer against `schema` may visit, its local $refs
    followed (a $ref back into one being followed counts once: the answer's own depth bounds
    that), and how many patterns it has; ValueError when past _MAX_EXPANDED or _MAX_PATTERNS."""
    sizes: dict[str, int] = {}  # a $ref's target -> its size once followed
    following: set[str] = set()
    anchors: dict[str, Any] = {}
    patterns = 0

    def survey(node: Any) -> None:  # every part, used or not: each is compiled
        nonlocal patterns
        if isinstance(node, list):
            for item in node:
                survey(item)
        elif isinstance(node, dict):
            for keyword, value in node.items():
                if keyword in _DATA_KEYWORDS:
                    continue
                if keyword in ("$anchor", "$dynamicAnchor") and isinstance(value, str):
                    anchors["#" + value] = node
                elif keyword == "pattern" and isinstance(value, str):
                    patterns += 1
                elif keyword == "patternProperties" and isinstance(value, dict):
                    patterns += len(value)
                survey(value)

    def size(node: Any) -> int:  # the parts an answer is checked against
        if isinstance(node, list):
            return sum(size(item) for item in node)
        if not isinstance(node, dict):
            return 0
        total = 1
        for keyword, value in node.items():
            if keyword in _DATA_KEYWORDS or keyword in _DEFINITIONS:
                continue  # data; definitions count where a $ref uses them
            if keyword == "$id" and node is not schema:
                # It would make "#..." below it mean that subschema: what it costs could not
                # be told from here.
                raise _Refused(f"{where}: $id is taken only at its top; use $defs and $ref")
            if keyword in _REF_KEYWORDS and isinstance(value, str):
                total += followed(value)
            else:
                total += size(value)
            if total > _MAX_EXPANDED:
                raise _TooLarge
        return total

    def followed(ref: str) -> int:
        if ref in sizes:
            return sizes[ref]
        if ref in following:
            return 1
        if ref in anchors:
            target = anchors[ref]
        elif ref.startswith("#"):
            target = _pointer(schema, urllib.parse.unquote(ref))
            if target is None:
                return 1  # nothing there: jsonschema-rs says what is wrong with it
        else:
            raise _Refused(
                f"{where}: $ref {ref[:100]!r} points outside the schema; a $ref is a place in "
                'it ("#/$defs/name", "#") or an $anchor ("#name")'
            )
        following.add(ref)
        sizes[ref] = size(target)
        following.discard(ref)
        return sizes[ref]

    try:
        survey(schema)
        expanded = size(schema)
    except _Refused as exc:
        raise ValueError(str(exc)) from None
    except _TooLarge:
        raise ValueError(
            f"{where} is too large to check answers against: following its $refs, it has more "
            f"than {_MAX_EXPANDED:,} subschemas (each $ref counts as the schema it names)"
        ) from None
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply to check answers against") from None
    if patterns > _MAX_PATTERNS:
        raise ValueError(f"{where} has {patterns} patterns; at most {_MAX_PATTERNS} are checked")
    return expanded, patterns


class _TooLarge(Exception):
    pass


class _Refused(Exception):
    pass


_REF_KEYWORDS = frozenset(("$ref", "$dynamicRef", "$recursiveRef"))
_DEFINITIONS = frozenset(("$defs", "definitions"))


def _pointer(schema: Any, ref: str) -> Any:
    """The part of `schema` a local $ref ("#", "#/$defs/a") names; None if none."""
    node = schema
    for raw in ref[1:].lstrip("/").split("/") if ref != "#" else ():
        step = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and step.isdigit() and int(step) < len(node):
            node = node[int(step)]
        else:
            return None
    return node


def _rule(schema: Any, path: list[Any]) -> str:
    """The value of the keyword at `path` in `schema`, as JSON, cut to 120 characters; empty
    where the path does not lead through the schema as written (a $ref's target)."""
    node = schema
    for step in path:
        if (isinstance(node, dict) and step in node) or (
            isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node)
        ):
            node = node[step]
        else:
            return ""
    return msgspec.json.encode(node).decode()[:120]


def _compiled(schema: dict[str, Any], where: str) -> _Schema:
    """`schema` compiled (format checking on: date-time, email, ...), once per schema while it
    stays in use."""
    key = msgspec.json.encode(schema)
    compiled = _schemas.get(key)
    if compiled is not None:
        _schemas.move_to_end(key)
        return compiled
    compiled = _Schema(schema, where)
    if len(key) <= _CACHED_SCHEMA_BYTES and compiled.patterns <= _CACHED_PATTERNS:
        _schemas[key] = compiled
        if len(_schemas) > _SCHEMAS_KEPT:
            _schemas.popitem(last=False)
    return compiled


class _JsonCheck:
    """response_format json_object or json_schema: JSON that parses (from inside a Markdown
    fence too), an object, and valid against the schema."""

    __slots__ = ("schema_name", "validator")

    def __init__(self, schema_name: str | None, validator: _Schema | None) -> None:
        self.schema_name = schema_name
        self.validator = validator

    def __call__(self, answer: ProviderOk) -> ProviderOk | str:
        if answer.tool_calls:  # it calls tools instead of answering (a model may say so in a
            return answer  # sentence first, as Claude does): the tool checks judge that
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
            error = self.validator.error(value)
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
    try:  # not kept in the module's own cache (500 patterns): each could hold hundreds of MiB
        return regex.compile(pattern, cache_pattern=False)
    except regex.error as exc:
        raise ValueError(f"{where} is not a regular expression: {exc}") from None
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply") from None


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
    """tool_choice kept (none: no tool call; required: a tool call; a named tool: calls of
    that tool only), and every tool call names one of the request's tools with arguments that
    are a JSON object valid against the tool's parameters."""

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
        if calls and choice == "none":
            return "tool_choice none asks for no tool call; the answer calls a tool"
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
            error = validator.error(arguments) if validator is not None else None
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
