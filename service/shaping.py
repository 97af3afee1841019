"""What a request looks like to one target, and whether an answer is what it asked for.

Shaping / shape()        a target's model, parameters and prompt template applied to the
                         request, giving that target's ProviderRequest
estimate_tokens()        input size in tokens, estimated offline (for max_input_tokens)
output_validator()       response_format as a check: JSON that parses, and validates
                         against the request's JSON Schema (jsonschema, draft 2020-12)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import jsonschema
import msgspec
from msgspec import Struct

from schemas import ChatMessage, ProviderFailure, ProviderOk, ProviderRequest
from schemas.wire import ResponseFormat


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


class Shaping(NamedTuple):
    """A target's own request parameters; None leaves the request's value."""

    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    template: Template | None = None
    template_name: str | None = None


def shape(
    base: ProviderRequest, shaping: Shaping, previous_errors: Sequence[str] = ()
) -> ProviderRequest:
    messages = base.messages
    if shaping.template is not None:
        messages = apply_template(messages, shaping.template, previous_errors)
    return msgspec.structs.replace(
        base,
        model=shaping.model if shaping.model is not None else base.model,
        temperature=shaping.temperature if shaping.temperature is not None else base.temperature,
        max_tokens=shaping.max_tokens if shaping.max_tokens is not None else base.max_tokens,
        top_p=shaping.top_p if shaping.top_p is not None else base.top_p,
        messages=messages,
    )


def apply_template(
    messages: Sequence[ChatMessage], template: Template, previous_errors: Sequence[str] = ()
) -> list[ChatMessage]:
    """`system` replaces the request's system messages ({system} stands for their text);
    `user` replaces the last user message ({input} stands for its text). In both,
    {previous_errors} stands for the error kinds of the attempts before (pass_failures)."""
    out = list(messages)
    errors = ", ".join(previous_errors)
    if template.system is not None:
        own = "\n\n".join(m.content for m in out if m.role == "system")
        text = template.system.replace("{previous_errors}", errors).replace("{system}", own).strip()
        out = ([ChatMessage("system", text)] if text else []) + [
            m for m in out if m.role != "system"
        ]
    if template.user is not None:
        for i in range(len(out) - 1, -1, -1):
            if out[i].role == "user":
                text = template.user.replace("{previous_errors}", errors).replace(
                    "{input}", out[i].content
                )
                out[i] = ChatMessage("user", text)
                break
    return out


def template_tokens(template: Template) -> int:
    """What a template adds to a request, estimated like the input itself."""
    text = "".join(part for part in (template.system, template.user) if part)
    for placeholder in ("{system}", "{input}", "{previous_errors}"):
        text = text.replace(placeholder, "")
    return text_tokens(text)


# ---- token estimate ----------------------------------------------------------------

_PER_MESSAGE = 4  # role and separators, as OpenAI's chat format counts them
_ASCII_CHARS_PER_TOKEN = 4  # English prose in the GPT and Claude tokenizers


def estimate_tokens(messages: Sequence[ChatMessage]) -> int:
    """About how many tokens the messages take, without a tokenizer or the network.

    ASCII text counts 4 characters per token; every other character counts a whole token,
    which is close for CJK scripts and errs high for accented Latin text. Errors either
    way are caught: an estimate too high sends the request to a longer-context target; one
    too low gets a context_length failure, which has its own fallback chain.
    """
    return 3 + sum(_PER_MESSAGE + text_tokens(m.content) for m in messages)


def text_tokens(text: str) -> int:
    ascii_chars = len(text.encode("ascii", "ignore"))
    return math.ceil(ascii_chars / _ASCII_CHARS_PER_TOKEN) + (len(text) - ascii_chars)


# ---- output validation -------------------------------------------------------------

_decode = msgspec.json.decode
_validators: OrderedDict[bytes, jsonschema.protocols.Validator] = OrderedDict()
_VALIDATORS_KEPT = 256  # compiled schemas, most recently used; requests usually repeat a few
# A larger schema is compiled per request: 256 of them could hold 256 MiB.
_CACHED_SCHEMA_BYTES = 16 * 1024


class Validator:
    """Checks a good answer against response_format; a failed check is an invalid_output failure."""

    __slots__ = ("schema_name", "validator")

    def __init__(
        self, schema_name: str | None, validator: jsonschema.protocols.Validator | None
    ) -> None:
        self.schema_name = schema_name
        self.validator = validator

    def __call__(self, answer: ProviderOk) -> ProviderOk | ProviderFailure:
        text = _unfenced(answer.content)
        try:
            value = _decode(text)
        except msgspec.DecodeError as exc:
            # The answer's text stays out: attempts reach the audit event, which never carries it.
            return ProviderFailure(
                "invalid_output", f"the answer is not valid JSON ({exc}; {len(text)} characters)"
            )
        if self.validator is None:
            if not isinstance(value, dict):
                return ProviderFailure(
                    "invalid_output",
                    f"json_object asks for an object; the answer is a {type(value).__name__}",
                )
        else:
            error = jsonschema.exceptions.best_match(self.validator.iter_errors(value))
            if error is not None:
                # Said from the schema's side: jsonschema's own message quotes the answer's values.
                where = "/".join(str(p) for p in error.absolute_path) or "the top level"
                rule = msgspec.json.encode(error.validator_value).decode()[:120]
                return ProviderFailure(
                    "invalid_output",
                    f"the answer does not match schema {self.schema_name!r}: "
                    f"at {where}, {error.validator} {rule} fails",
                )
        return msgspec.structs.replace(answer, content=text) if text != answer.content else answer


def output_validator(response_format: ResponseFormat | None) -> Validator | None:
    """The check for a request's response_format; raises ValueError for an unusable one."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return Validator(None, None)
    spec = response_format.json_schema
    if spec is None:
        raise ValueError(
            'response_format type "json_schema" needs a json_schema object: '
            '{"name": ..., "schema": {...}}'
        )
    key = msgspec.json.encode(spec.schema)
    validator = _validators.get(key)
    if validator is None:
        try:
            jsonschema.Draft202012Validator.check_schema(spec.schema)
        except jsonschema.exceptions.SchemaError as exc:
            raise ValueError(
                f"response_format.json_schema.schema is not a valid JSON Schema: {exc.message}"
            ) from None
        validator = jsonschema.Draft202012Validator(spec.schema)
        if len(key) <= _CACHED_SCHEMA_BYTES:
            _validators[key] = validator
            if len(_validators) > _VALIDATORS_KEPT:
                _validators.popitem(last=False)
    else:
        _validators.move_to_end(key)
    return Validator(spec.name, validator)


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
