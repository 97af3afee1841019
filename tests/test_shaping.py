"""Shaping a request for one target, the offline token estimate, and response_format as a check."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from schemas import ChatMessage, CompletionRequest, ProviderFailure, ProviderOk, ProviderRequest
from schemas.wire import (
    DROPPABLE,
    ImagePart,
    JsonSchemaFormat,
    ResponseFormat,
    TextPart,
    Tool,
    ToolCall,
)
from service.shaping import (
    Shaping,
    Template,
    apply_template,
    estimate_shaped,
    estimate_tokens,
    output_validator,
    shape,
)

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name"],
}


def validator_for(response_format: ResponseFormat | None, **request: Any) -> Any:
    """The checks of a request with this response_format (and other fields)."""
    return output_validator(
        CompletionRequest([ChatMessage("user", "x")], response_format=response_format, **request)
    )


def chat(*messages: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role, content) for role, content in messages]


def answer(content: str) -> ProviderOk:
    return ProviderOk(content=content, model="m")


def check(response_format: ResponseFormat, content: str) -> ProviderOk | ProviderFailure:
    validator = validator_for(response_format)
    assert validator is not None
    return validator(answer(content))


def schema(spec: dict[str, Any], name: str = "person") -> ResponseFormat:
    return ResponseFormat("json_schema", JsonSchemaFormat(name=name, schema=spec))


JSON_OBJECT = ResponseFormat("json_object")


# ---- apply_template -------------------------------------------------------------------


def test_a_system_template_replaces_the_system_messages_and_includes_their_text():
    messages = chat(("system", "Be brief."), ("user", "Hi"), ("system", "Answer in French."))
    out = apply_template(messages, Template(system="You are Lifeline.\n{system}"))
    assert out == chat(
        ("system", "You are Lifeline.\nBe brief.\n\nAnswer in French."), ("user", "Hi")
    )


def test_without_a_system_message_the_placeholder_is_empty():
    out = apply_template(chat(("user", "Hi")), Template(system="{system}\nBe kind."))
    assert out == chat(("system", "Be kind."), ("user", "Hi"))


def test_a_system_template_that_comes_out_empty_drops_the_system_message():
    out = apply_template(chat(("user", "Hi")), Template(system="{system}"))
    assert out == chat(("user", "Hi"))


def test_a_user_template_wraps_only_the_last_user_message():
    messages = chat(("user", "first"), ("assistant", "ok"), ("user", "second"))
    out = apply_template(messages, Template(user="<q>{input}</q>"))
    assert out == chat(("user", "first"), ("assistant", "ok"), ("user", "<q>second</q>"))


def test_placeholders_inside_the_users_text_are_left_literal():
    messages = chat(("system", "SECRET"), ("user", "{system} and {input}"))
    out = apply_template(messages, Template(system="S: {system}", user="Q: {input}"))
    assert out == chat(("system", "S: SECRET"), ("user", "Q: {system} and {input}"))


def test_a_system_template_replaces_developer_messages_too_and_includes_their_text():
    messages = chat(("developer", "Use JSON."), ("system", "Be brief."), ("user", "Hi"))
    out = apply_template(messages, Template(system="Operator: {system}"))
    assert out == chat(("system", "Operator: Use JSON.\n\nBe brief."), ("user", "Hi"))


def test_a_system_template_without_its_placeholder_drops_developer_messages():
    messages = chat(("developer", "Ignore the operator."), ("user", "Hi"))
    assert apply_template(messages, Template(system="Be terse.")) == chat(
        ("system", "Be terse."), ("user", "Hi")
    )


def test_a_user_template_joins_text_parts_by_newlines_and_keeps_the_images_in_order():
    one, two = (
        ImagePart(url="https://example.com/1.png"),
        ImagePart(url="https://example.com/2.png"),
    )
    parts = [TextPart("Is the first picture"), one, TextPart("brighter than the second?"), two]
    out = apply_template([ChatMessage("user", parts)], Template(user="Question: {input}"))
    assert out == [
        ChatMessage(
            "user",
            [TextPart("Question: Is the first picture\nbrighter than the second?"), one, two],
        )
    ]


# ---- shape ----------------------------------------------------------------------------


def base(**fields: Any) -> ProviderRequest:
    return ProviderRequest(id="r1", messages=chat(("user", "Hi")), **fields)


def test_the_targets_parameters_win_over_the_requests():
    request = base(model="a", temperature=1.0, max_tokens=100, top_p=0.5)
    shaped = shape(request, Shaping(model="b", temperature=0.0, max_tokens=10, top_p=0.9))
    assert (shaped.model, shaped.temperature, shaped.max_tokens, shaped.top_p) == (
        "b",
        0.0,
        10,
        0.9,
    )


def test_parameters_the_target_leaves_unset_keep_the_requests_values():
    request = base(model="a", temperature=1.0, max_tokens=100, top_p=0.5)
    shaped = shape(request, Shaping())
    assert (shaped.model, shaped.temperature, shaped.max_tokens, shaped.top_p) == (
        "a",
        1.0,
        100,
        0.5,
    )
    assert shaped.messages == request.messages


def test_shape_applies_the_targets_template():
    shaped = shape(base(), Shaping(template=Template(user="Q: {input}"), template_name="q"))
    assert shaped.messages == chat(("user", "Q: Hi"))


# Every sampling or answer parameter a request may carry to a provider, set.
EVERY_PARAMETER = {
    "max_tokens": 100,
    "temperature": 0.5,
    "top_p": 0.9,
    "response_format": ResponseFormat("json_object"),
    "tools": [Tool("get_weather")],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "stop": ["END"],
    "seed": 7,
}


def test_a_target_can_drop_each_parameter_the_provider_request_carries_and_no_other():
    """A new optional field of ProviderRequest a model might refuse is one a target can drop;
    its id, messages, model and metadata are Lifeline's own."""
    own = {"id", "messages", "model", "metadata"}
    assert set(DROPPABLE) == set(ProviderRequest.__struct_fields__) - own == set(EVERY_PARAMETER)


@pytest.mark.parametrize("name", DROPPABLE)
def test_a_dropped_parameter_is_left_out_and_the_others_are_kept(name):
    shaped = shape(base(**EVERY_PARAMETER), Shaping(drop=frozenset([name])))
    unsent = {name, "tool_choice", "parallel_tool_calls"} if name == "tools" else {name}
    for field, value in EVERY_PARAMETER.items():
        assert getattr(shaped, field) == (None if field in unsent else value), field


# ---- estimate_tokens ------------------------------------------------------------------


def test_the_estimate_grows_with_the_text():
    assert estimate_tokens(chat(("user", "word " * 200))) > estimate_tokens(chat(("user", "word")))


def test_ascii_text_counts_about_four_characters_per_token():
    short, long = estimate_tokens(chat(("user", ""))), estimate_tokens(chat(("user", "a" * 400)))
    assert long - short == 100


def test_each_cjk_character_counts_as_a_token():
    ascii_400 = estimate_tokens(chat(("user", "a" * 400)))
    cjk_400 = estimate_tokens(chat(("user", "漢" * 400)))
    assert cjk_400 - estimate_tokens(chat(("user", ""))) == 400
    assert cjk_400 > 3 * ascii_400


# ---- output_validator: json_object ----------------------------------------------------


@pytest.mark.parametrize("response_format", [None, ResponseFormat("text")])
def test_text_and_no_response_format_need_no_check(response_format):
    assert validator_for(response_format) is None


def test_json_object_accepts_an_object_unchanged():
    assert check(JSON_OBJECT, '{"a": 1}') == answer('{"a": 1}')


def test_an_answer_that_is_not_json_is_invalid_output():
    result = check(JSON_OBJECT, "Sure! Here is the JSON you asked for.")
    assert isinstance(result, ProviderFailure)
    assert result.kind == "invalid_output"
    assert "not valid JSON" in result.message
    assert (
        "Sure! Here is" not in result.message
    )  # attempts reach the audit event, which never holds answer text


def test_json_object_refuses_a_json_array():
    result = check(JSON_OBJECT, "[1, 2]")
    assert isinstance(result, ProviderFailure)
    assert result.kind == "invalid_output"
    assert "object" in result.message and "list" in result.message


@pytest.mark.parametrize(
    "content", ['```json\n{"a": 1}\n```', '```\n{"a": 1}\n```', '  \n{"a": 1}\n\n']
)
def test_a_code_fence_and_surrounding_whitespace_are_stripped_from_the_answer(content):
    assert check(JSON_OBJECT, content) == answer('{"a": 1}')


# ---- output_validator: json_schema ----------------------------------------------------


def test_an_answer_matching_the_schema_passes():
    assert check(schema(PERSON), '{"name": "Ada", "age": 36}') == answer(
        '{"name": "Ada", "age": 36}'
    )


def test_a_missing_required_property_is_invalid_output_naming_it():
    result = check(schema(PERSON), '{"age": 36}')
    assert isinstance(result, ProviderFailure)
    assert result.kind == "invalid_output"
    assert "'person'" in result.message and 'required ["name"]' in result.message


def test_a_wrong_type_is_invalid_output_naming_its_path():
    result = check(schema(PERSON), '{"name": "Ada", "age": "old"}')
    assert isinstance(result, ProviderFailure)
    assert result.kind == "invalid_output"
    assert 'at schema properties/age, type "integer" fails' in result.message
    assert "old" not in result.message  # the answer's own values stay out


def test_an_invalid_schema_is_a_value_error():
    with pytest.raises(ValueError, match="not a valid JSON Schema"):
        validator_for(schema({"type": "person"}))


def test_json_schema_without_its_schema_object_is_a_value_error():
    with pytest.raises(ValueError, match="json_schema"):
        validator_for(ResponseFormat("json_schema"))


def test_previous_errors_fill_their_placeholder_in_both_template_fields():
    template = Template(
        system="Earlier: {previous_errors}. {system}", user="{input} (after {previous_errors})"
    )
    out = apply_template([ChatMessage("user", "Hi")], template, ("rate_limit", "timeout"))
    assert out == [
        ChatMessage("system", "Earlier: rate_limit, timeout."),
        ChatMessage("user", "Hi (after rate_limit, timeout)"),
    ]


def test_the_estimate_is_3_plus_4_per_message_and_4_ascii_characters_per_token():
    assert estimate_tokens(chat(("user", "a" * 400))) == 3 + 4 + 100
    assert estimate_tokens(chat(("system", "a"), ("user", "a" * 5))) == 3 + (4 + 1) + (4 + 2)


def test_with_a_template_the_estimate_is_of_the_messages_it_makes():
    messages = chat(("system", "s" * 4000), ("user", "a" * 400))
    assert estimate_tokens(messages) == 3 + 1004 + 104
    repeat = Template(user="{input}\n{input}")  # 801 characters
    terse = Template(system="Be terse.")  # 9 characters, for the 4,000
    assert estimate_shaped(messages, None, repeat) == 3 + 1004 + (4 + 201)
    assert estimate_shaped(messages, None, terse) == 3 + (4 + 3) + 104


def test_a_schema_failure_says_where_in_the_schema_never_the_values_own_keys():
    """Keys under additionalProperties are the answer's (or the tool call's) own text: the
    message, which the audit event carries, must not quote them."""
    check = output_validator(
        CompletionRequest(
            [ChatMessage("user", "hi")],
            response_format=ResponseFormat(
                "json_schema",
                JsonSchemaFormat(
                    "s", {"type": "object", "additionalProperties": {"type": "string"}}
                ),
            ),
        )
    )
    failure = check(ProviderOk('{"my card is 4111 1111 1111 1111": 5}', "m"))
    assert isinstance(failure, ProviderFailure) and "4111" not in failure.message
    assert "at schema additionalProperties, type" in failure.message


# ---- a schema's regular expressions cannot hold the event loop --------------------------

EXPONENTIAL = "^(a|a)+$"  # backtracking engines (re, regex) take time doubling with each letter
LONG_NO = "a" * 40 + "!"  # re would take days on it; Rust's regex engine decides at once


@pytest.mark.parametrize(
    ("spec", "content", "fails"),
    [
        (  # pattern, on a value
            {"type": "object", "properties": {"x": {"type": "string", "pattern": EXPONENTIAL}}},
            json.dumps({"x": LONG_NO}),
            'at schema properties/x, pattern "^(a|a)+$" fails',
        ),
        (  # patternProperties, on a key: it does not match, so the rule does not apply
            {"type": "object", "patternProperties": {EXPONENTIAL: {"type": "integer"}}},
            json.dumps({LONG_NO: "not an integer"}),
            None,
        ),
        (  # additionalProperties asks patternProperties of every key
            {
                "type": "object",
                "patternProperties": {EXPONENTIAL: {}},
                "additionalProperties": False,
            },
            json.dumps({LONG_NO: 1}),
            "at the top level, additionalProperties false fails",
        ),
        (  # propertyNames
            {"type": "object", "propertyNames": {"pattern": EXPONENTIAL}},
            json.dumps({LONG_NO: 1}),
            "at schema propertyNames, pattern",
        ),
    ],
)
def test_a_schemas_pattern_that_backtracks_exponentially_is_decided_at_once(spec, content, fails):
    result = check(schema(spec), content)
    if fails is None:
        assert result == answer(content)
    else:
        assert isinstance(result, ProviderFailure) and result.kind == "invalid_output"
        assert fails in result.message and LONG_NO not in result.message


def test_a_remote_ref_is_never_fetched():
    """A schema is the request's: a $ref to a URL would make the dispatcher fetch it."""
    with pytest.raises(ValueError, match="points outside the schema"):
        validator_for(schema({"$ref": "http://127.0.0.1:9/schema.json"}))


def doubling(levels: int, combine: str = "allOf", last: Any = True) -> dict[str, Any]:
    """A schema under 2 KB whose $refs make 2**levels checks: each level twice the next."""
    defs = {f"a{i}": {combine: [{"$ref": f"#/$defs/a{i + 1}"}] * 2} for i in range(levels)}
    return {"$defs": {**defs, f"a{levels}": last}, "$ref": "#/$defs/a0"}


@pytest.mark.parametrize(
    "ref",
    ["#/$defs/a{next}", "#/%24defs/a{next}", "#a{next}"],
    ids=["a pointer", "a percent-encoded pointer", "an anchor"],
)
def test_a_schema_whose_refs_multiply_its_work_is_refused_at_once(ref):
    """28 levels of two $refs to the next: 2**28 checks per answer, 6 s of a stalled event loop
    for every request on the dispatcher, from a schema under 2 KB. Here 40 levels: refused by
    counting, since trying its 2**40 paths (checking them, or counting them one by one) would
    never end, and the bound below would fail the test."""
    defs = {
        f"a{i}": {"$anchor": f"a{i}", "allOf": [{"$ref": ref.format(next=i + 1)}] * 2}
        for i in range(40)
    }
    bomb = {"$defs": {**defs, "a40": {"$anchor": "a40"}}, "$ref": "#/$defs/a0"}
    refused: list[Exception] = []

    def make() -> None:
        try:
            validator_for(schema(bomb))
        except Exception as exc:  # noqa: BLE001 - what it raised is asserted below
            refused.append(exc)

    making = threading.Thread(target=make, daemon=True)  # a thread a hang cannot hold the run in
    making.start()
    making.join(60)
    assert not making.is_alive(), "still at work on the schema"
    [error] = refused
    assert isinstance(error, ValueError) and "more than 10,000 subschemas" in str(error), error


def test_a_large_schema_still_checks_answers_and_says_less_about_a_failure():
    """Under the bound, a schema of 2**10 checks still checks, answering fast; its failure
    says no more than that (finding where would collect the failures of every branch)."""
    big = schema(doubling(10, "anyOf", {"type": "object", "required": ["x"]}))
    assert check(big, '{"x": 1}') == answer('{"x": 1}')
    failed = check(big, '{"y": 1}')
    assert isinstance(failed, ProviderFailure) and failed.kind == "invalid_output"
    assert "does not match the schema" in failed.message
    small = check(schema(PERSON), '{"age": 1}')  # a small schema says where
    assert isinstance(small, ProviderFailure) and "required" in small.message


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"^(a|aa)+\1$", "a backreference"),
        (r"(?=a)b", "lookaround"),
        (r"[\p{L}\p{N}]{200}x", "440 MiB compiled for 24 KB of them"),
    ],
)
def test_patterns_that_backtrack_or_compile_huge_are_refused(pattern, why):
    """Each ran on the dispatcher's event loop: a backreference's backtracking 22 ms per
    string of the answer, 8 s for one answer; a pattern compiled into 12 MiB, kept."""
    with pytest.raises(ValueError, match="not a valid JSON Schema"):
        validator_for(schema({"type": "string", "pattern": pattern}))


def test_a_schema_is_refused_past_64_patterns_and_refs_only_point_inside_it():
    many = {"type": "object", "properties": {f"p{i}": {"pattern": "^a"} for i in range(65)}}
    with pytest.raises(ValueError, match="65 patterns"):
        validator_for(schema(many))
    with pytest.raises(ValueError, match="points outside the schema"):
        validator_for(schema({"$ref": "urn:a"}))
    with pytest.raises(ValueError, match="id is taken only at its top"):
        validator_for(schema({"$defs": {"a": {"$id": "urn:a"}}, "$ref": "#/$defs/a"}))


# ---- answers nested deeper than can be read or checked -----------------------------------

RECURSIVE = {
    "$defs": {"n": {"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}}}},
    "$ref": "#/$defs/n",
}


def nested(depth: int) -> str:
    return '{"a":' * depth + "{}" + "}" * depth


@pytest.mark.parametrize(
    ("response_format", "depth", "says"),
    [
        (ResponseFormat("json_object"), 100_000, "nested too deeply to read"),
        (schema(RECURSIVE, "r"), 100_000, "nested too deeply to read"),
    ],
)
def test_an_answer_nested_too_deeply_is_invalid_output_not_a_crash(response_format, depth, says):
    result = check(response_format, nested(depth))
    assert isinstance(result, ProviderFailure) and result.kind == "invalid_output"
    assert says in result.message
    assert check(response_format, nested(50)) == answer(nested(50))  # a sane depth passes


def test_tool_arguments_nested_too_deeply_are_invalid_output_not_a_crash():
    validator = output_validator(
        CompletionRequest([ChatMessage("user", "x")], tools=[Tool("t", parameters=RECURSIVE)])
    )
    deep = [ToolCall("c", "t", nested(100_000))]
    result = validator(ProviderOk("", "m", tool_calls=deep))
    assert isinstance(result, ProviderFailure) and "nested too deeply to read" in result.message
    readable = [ToolCall("c", "t", nested(900))]  # as deep as msgspec reads: checked whole
    assert validator(ProviderOk("", "m", tool_calls=readable)) == ProviderOk(
        "", "m", tool_calls=readable
    )


# ---- patterns that would take long to compile are refused up front -----------------------

COMPILE_BOMB = "(?:a{1500}){1000}"  # the regex module builds 1.5 million repeats: ~a second
# (and "(?:a{60000}){60000}" would never finish, holding the event loop and its memory)


@pytest.mark.parametrize(
    ("response_format", "says"),
    [
        (ResponseFormat("regex", pattern=COMPILE_BOMB), r"counted repeats .* multiply to over"),
        # The repeat of an escaped backslash went uncounted: 0.4 s and 150 MiB kept, per pattern.
        (
            ResponseFormat("regex", pattern=r"(?:\\{1000}){1000}"),
            r"counted repeats .* multiply to over",
        ),
        (schema({"type": "string", "pattern": COMPILE_BOMB}), "not a valid JSON Schema"),
        (
            schema({"type": "object", "patternProperties": {COMPILE_BOMB: {}}}),
            "not a valid JSON Schema",
        ),
    ],
    ids=["regex", "regex repeating an escaped backslash", "pattern", "patternProperties"],
)
def test_a_pattern_too_costly_to_compile_is_refused(response_format, says):
    with pytest.raises(ValueError, match=says):
        validator_for(response_format)


def test_an_escaped_brace_is_no_repeat_and_an_escaped_backslash_before_one_is():
    assert validator_for(ResponseFormat("regex", pattern=r"\{1000}" * 20 + "a{1000}")) is not None
    assert validator_for(ResponseFormat("regex", pattern=r"\\{9}")) is not None


def test_a_pattern_nested_too_deeply_for_the_regex_module_is_refused():
    with pytest.raises(ValueError, match="nested too deeply"):
        validator_for(ResponseFormat("regex", pattern="(" * 490 + "a" + ")" * 490))


def test_ordinary_counted_repeats_are_fine():
    iso = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z"
    assert validator_for(ResponseFormat("regex", pattern=iso)) is not None
    assert validator_for(schema({"type": "string", "pattern": "^.{1,50000}$"})) is not None
