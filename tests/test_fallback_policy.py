"""Fallback policy over a real nats-server: each capability as a user configures and sees it.

The `fake` provider with reply="request" answers with the ProviderRequest its worker got,
so a test can see what a target's shaping sent over NATS.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from helpers import USER_HELLO, ask, config, fake
from msgspec import structs
from opentelemetry.trace import SpanKind

from schemas import subjects
from service.natsio import ensure_subscribed

LONG_INPUT = {
    "messages": [
        {"role": "user", "content": "Summarise this: " + "lorem ipsum dolor sit amet " * 200}
    ]
}


def sent(reply) -> dict[str, Any]:
    """The ProviderRequest a reply="request" fake provider received."""
    assert reply.status == "ok", reply.error
    return json.loads(reply.content)


def outcomes(reply) -> list[tuple]:
    return [(a.target, a.outcome, a.error_type or a.reason, a.next) for a in reply.attempts]


# ---- the seeds ---------------------------------------------------------------------


async def test_seed_a_rate_limit_moves_to_the_second_provider(lifeline, client):
    await lifeline(config({"gpt": fake(fail_status=429), "claude": fake(reply="from claude")}))
    reply = await ask(client, USER_HELLO)
    assert (reply.content, reply.provider) == ("from claude", "claude")
    assert outcomes(reply) == [
        ("gpt", "error", "rate_limit", "fallback"),
        ("claude", "ok", None, None),
    ]


async def test_two_targets_of_one_name_are_each_sent_their_own_shaping(lifeline, client):
    """One provider twice in a chain (both named after it), the second with a larger
    max_tokens: the fallback is sent its own parameters, not the first target's."""
    await lifeline(
        config(
            {"p": fake(reply="request", latency_ms=300)},
            {
                "default": {
                    "targets": [
                        {"provider": "p", "max_tokens": 5, "timeout_s": 0.1},  # times out
                        {"provider": "p", "max_tokens": 999, "temperature": 0.5},
                    ]
                }
            },
        )
    )
    reply = await ask(client, USER_HELLO)
    got = sent(reply)
    assert (got["max_tokens"], got["temperature"]) == (999, 0.5)
    assert [a.target for a in reply.attempts] == ["p", "p"]  # one name, two targets


async def test_seed_each_model_gets_its_own_prompt_and_the_reply_names_the_template(
    lifeline, client
):
    await lifeline(
        {
            "providers": {
                "gpt": fake(fail_status=503),
                "claude": fake(model="claude-default", reply="request"),
            },
            "templates": {
                "for-gpt": {"system": "You are GPT. {system}"},
                "for-claude": {"system": "<role>Claude</role> {system}", "user": "<q>{input}</q>"},
            },
            "routes": {
                "default": {
                    "targets": [
                        {"provider": "gpt", "template": "for-gpt"},
                        {
                            "provider": "claude",
                            "model": "claude-big",
                            "template": "for-claude",
                            "temperature": 0.2,
                            "max_tokens": 77,
                        },
                    ]
                }
            },
        }
    )
    reply = await ask(
        client,
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Why?"},
            ],
            "temperature": 1.5,
        },
    )
    got = sent(reply)
    assert got["messages"] == [
        {"role": "system", "content": "<role>Claude</role> Be brief."},
        {"role": "user", "content": "<q>Why?</q>"},
    ]
    assert (got["model"], got["temperature"], got["max_tokens"]) == ("claude-big", 0.2, 77)
    assert (reply.target, reply.template, reply.model) == (
        "claude:claude-big",
        "for-claude",
        "claude-big",
    )


async def test_seed_a_long_input_goes_straight_to_the_long_context_model(lifeline, client, audit):
    await lifeline(
        {
            "providers": {"small": fake(reply="small"), "large": fake(reply="large")},
            "targets": {
                "small-8k": {"provider": "small", "max_input_tokens": 200},
                "large-1m": {"provider": "large", "max_input_tokens": 1_000_000},
            },
            "routes": {"default": {"targets": ["small-8k", "large-1m"]}},
        }
    )
    reply = await ask(client, LONG_INPUT)
    assert (reply.content, reply.target) == ("large", "large-1m")
    skipped = reply.attempts[0]
    assert (skipped.target, skipped.outcome, skipped.reason) == (
        "small-8k",
        "skipped",
        "max_input_tokens",
    )
    assert "takes at most 200" in (skipped.message or "")
    [(_, event)] = await audit.wait_for(1)
    assert [(a.outcome, a.reason) for a in event.attempts] == [
        ("skipped", "max_input_tokens"),
        ("ok", None),
    ]
    # A short input still goes to the cheap model first.
    assert (await ask(client, USER_HELLO)).target == "small-8k"


async def test_seed_unparseable_output_moves_to_the_better_model(lifeline, client, audit):
    await lifeline(
        config(
            {
                "cheap": fake(reply="Sure! Here is the JSON you asked for: {answer: 42"),
                "better": fake(reply='```json\n{"answer": 42}\n```'),
            }
        )
    )
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
    }
    request = {
        **USER_HELLO,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema},
        },
    }
    reply = await ask(client, request)
    assert (reply.provider, json.loads(reply.content or "")) == ("better", {"answer": 42})
    assert reply.attempts[0].error_type == "invalid_output"
    assert "not valid JSON" in (reply.attempts[0].message or "")
    await audit.wait_for(1)
    assert b"Sure! Here is" not in audit.raw[0]  # the rejected answer's text stays out of the audit


async def test_an_answer_that_parses_but_breaks_the_schema_is_invalid_output(lifeline, client):
    await lifeline(
        config(
            {"cheap": fake(reply='{"answer": "forty-two"}'), "better": fake(reply='{"answer": 42}')}
        )
    )
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
    }
    reply = await ask(
        client,
        {
            **USER_HELLO,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "a", "schema": schema},
            },
        },
    )
    assert reply.provider == "better"
    assert reply.attempts[0].error_type == "invalid_output"
    assert 'at schema properties/answer, type "integer" fails' in (reply.attempts[0].message or "")
    assert "forty-two" not in (reply.attempts[0].message or "")


# ---- fallback by error class -------------------------------------------------------


def _class_chain_config(**route: Any) -> dict[str, Any]:
    return {
        "providers": {
            "main": fake(),
            "next": fake(reply="next"),
            "long": fake(reply="long"),
            "safe": fake(reply="safe"),
        },
        "dispatcher": {"allow_fault_injection": True},
        "fallbacks": {"content_filter": ["safe"]},
        "routes": {"default": {"targets": ["main", "next"], **route}},
    }


async def test_a_context_length_failure_goes_to_the_routes_long_context_chain(
    lifeline, client, exporter
):
    await lifeline(_class_chain_config(context_length_fallbacks=["long"]))
    reply = await ask(client, {**USER_HELLO, "faults": {"main": "context_length"}})
    assert reply.content == "long"
    assert outcomes(reply) == [
        ("main", "error", "context_length", "fallback"),
        ("long", "ok", None, None),
    ]
    span = next(s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER)
    [event] = [e for e in span.events if e.name == "lifeline.fallback"]
    assert (
        event.attributes["lifeline.fallback.to"],
        event.attributes["lifeline.fallback.chain"],
    ) == ("long", "context_length")


async def test_a_content_filter_failure_uses_the_default_chain_when_the_route_names_none(
    lifeline, client
):
    await lifeline(_class_chain_config())
    reply = await ask(client, {**USER_HELLO, "faults": {"main": "content_filter"}})
    assert reply.content == "safe"


async def test_an_empty_default_chain_is_none_for_a_requests_own_targets_too(lifeline, client):
    """`[fallbacks] context_length = []` is no chain for a route; a request naming its own
    targets switched to it, found nothing there, and ended all_failed without its next one."""
    await lifeline({**_class_chain_config(), "fallbacks": {"context_length": []}})
    for asked in ({}, {"targets": ["main", "next"]}):
        reply = await ask(client, {**USER_HELLO, **asked, "faults": {"main": "context_length"}})
        assert (reply.status, reply.content) == ("ok", "next"), asked


async def test_other_failures_stay_on_the_routes_own_chain(lifeline, client):
    await lifeline(_class_chain_config(context_length_fallbacks=["long"]))
    reply = await ask(client, {**USER_HELLO, "faults": {"main": 503}})
    assert reply.content == "next"


# ---- capability checks -------------------------------------------------------------


async def test_a_target_without_json_output_is_skipped_for_a_json_request(lifeline, client):
    await lifeline(
        {
            "providers": {"old": fake(reply="prose"), "new": fake(reply='{"ok": true}')},
            "routes": {"default": {"targets": [{"provider": "old", "json_output": False}, "new"]}},
        }
    )
    reply = await ask(client, {**USER_HELLO, "response_format": {"type": "json_object"}})
    assert reply.provider == "new"
    assert (reply.attempts[0].outcome, reply.attempts[0].reason) == ("skipped", "json_output")
    # Without response_format the old model is fine.
    assert (await ask(client, USER_HELLO)).provider == "old"


async def test_when_no_target_can_take_the_input_none_is_called(lifeline, client, audit):
    await lifeline(
        {
            "providers": {"small": fake()},
            "routes": {"default": {"targets": [{"provider": "small", "max_input_tokens": 100}]}},
        }
    )
    reply = await ask(client, LONG_INPUT)
    assert reply.error is not None and reply.error.type == "no_capable_target"
    assert "shorten the input" in reply.error.message
    [(subject, event)] = await audit.wait_for(1)
    assert (subject, event.error_type) == ("llm.audit.error", "no_capable_target")


# ---- retries -----------------------------------------------------------------------


# gpt with two retries, then claude; faults injected per request
GPT_RETRIED_THEN_CLAUDE = {
    "providers": {"gpt": fake(reply="gpt"), "claude": fake(reply="claude")},
    "dispatcher": {"allow_fault_injection": True},
    "routes": {
        "default": {"targets": [{"provider": "gpt", "retries": 2, "backoff_s": 0.01}, "claude"]}
    },
}


async def test_a_retry_on_the_same_target_recovers_before_any_fallback(lifeline, client, exporter):
    await lifeline(GPT_RETRIED_THEN_CLAUDE)
    reply = await ask(client, {**USER_HELLO, "faults": {"gpt": [429, 503, "ok"]}})
    assert reply.content == "gpt"
    assert [(a.target, a.retry, a.error_type, a.next) for a in reply.attempts] == [
        ("gpt", 0, "rate_limit", "retry"),
        ("gpt", 1, "server_error", "retry"),
        ("gpt", 2, None, None),
    ]
    span = next(s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER)
    assert [e.attributes["lifeline.reason"] for e in span.events if e.name == "lifeline.retry"] == [
        "rate_limit",
        "server_error",
    ]


async def test_a_spent_quota_falls_back_at_once_where_a_rate_limit_is_retried(lifeline, client):
    """OpenAI answers 429 both for "slow down" and for "your credit is spent"; only the first
    is worth a retry (and its backoff)."""
    await lifeline(GPT_RETRIED_THEN_CLAUDE)
    spent = await ask(client, {**USER_HELLO, "faults": {"gpt": [402, "ok"]}})
    assert spent.content == "claude"
    assert [(a.target, a.retry, a.error_type, a.next) for a in spent.attempts] == [
        ("gpt", 0, "quota", "fallback"),
        ("claude", 0, None, None),
    ]
    limited = await ask(client, {**USER_HELLO, "faults": {"gpt": [429, "ok"]}})
    assert [(a.target, a.error_type) for a in limited.attempts] == [
        ("gpt", "rate_limit"),
        ("gpt", None),
    ]


async def test_max_attempts_stops_a_chain_of_retries_and_fallbacks(lifeline, client):
    await lifeline(
        {
            "providers": {"a": fake(fail_status=503), "b": fake(fail_status=503), "c": fake()},
            "routes": {
                "default": {"targets": [{"provider": "a", "retries": 3, "backoff_s": 0}, "b", "c"]}
            },
        }
    )
    reply = await ask(client, {**USER_HELLO, "max_attempts": 3})
    assert reply.error is not None and reply.error.type == "max_attempts_reached"
    made = [a for a in reply.attempts if a.outcome != "skipped"]
    assert len(made) == 3
    assert [(a.target, a.reason) for a in reply.attempts if a.outcome == "skipped"] == [
        ("b", "max_attempts"),
        ("c", "max_attempts"),
    ]


async def test_the_default_cap_is_six_physical_attempts(lifeline, client):
    await lifeline(
        {
            "providers": {"a": fake(fail_status=503), "b": fake(fail_status=503)},
            "routes": {
                "default": {
                    "targets": [
                        {"provider": "a", "retries": 10, "backoff_s": 0},
                        {"provider": "b", "retries": 10, "backoff_s": 0},
                    ],
                    "retry_budget": 10,
                }
            },  # the retry budget would stop it first
        }
    )
    reply = await ask(client, USER_HELLO)
    assert sum(1 for a in reply.attempts if a.outcome != "skipped") == 6


# ---- the request's deadline --------------------------------------------------------


async def test_the_deadline_bounds_the_whole_chain_and_skips_what_cannot_start(
    lifeline, client, audit
):
    # Bounded by the request, not by slow's own timeout, which would outlast the wait for the
    # reply (and then leave backup time to answer).
    await lifeline(config({"slow": fake(hang=True, timeout_s=600), "backup": fake()}))
    reply = await ask(client, {**USER_HELLO, "timeout_s": 0.3}, timeout_s=30)
    assert reply.error is not None and reply.error.type == "deadline_exceeded"
    assert outcomes(reply) == [
        ("slow", "timeout", "timeout", "stop"),  # no time was left for backup
        ("backup", "skipped", "deadline", None),
    ]
    [(_, event)] = await audit.wait_for(1)
    assert event.attempts[1].reason == "deadline"


async def test_an_absolute_deadline_works_like_timeout_s(lifeline, client):
    await lifeline(config({"slow": fake(hang=True, timeout_s=30), "backup": fake()}))
    reply = await ask(client, {**USER_HELLO, "deadline_unix_ms": int(time.time() * 1000) + 300})
    assert reply.error is not None and reply.error.type == "deadline_exceeded"


async def test_a_deadline_already_past_is_refused_without_calling_anyone(lifeline, client, audit):
    await lifeline(config({"a": fake()}))
    reply = await ask(client, {**USER_HELLO, "deadline_unix_ms": int(time.time() * 1000) - 1000})
    assert reply.error is not None and reply.error.type == "deadline_exceeded"
    assert "the two clocks disagree: timeout_s counts from arrival" in reply.error.message
    assert reply.attempts == []
    await audit.wait_for(1)


async def test_the_dispatcher_tells_the_worker_which_attempt_it_gave_up_on(lifeline, client):
    # A worker that never answers, not even when its deadline passes (a stuck process, say);
    # Lifeline's own workers also stop at the deadline header by themselves.
    await lifeline(config({"mute": fake(timeout_s=0.2), "backup": fake()}), workers=["backup"])
    mute = await client.subscribe("llm.provider.mute", queue="lifeline-provider-mute")
    cancels = await client.subscribe("llm.cancel.mute")
    await ensure_subscribed(client)
    reply = await ask(client, USER_HELLO)
    assert reply.provider == "backup"
    attempt = await mute.next_msg(timeout=2)
    cancel = await cancels.next_msg(timeout=2)
    assert cancel.data.decode() == attempt.headers[subjects.ATTEMPT_ID]


# ---- per-request control -----------------------------------------------------------


async def test_a_request_can_give_full_target_objects(lifeline, client):
    await lifeline(config({"a": fake(fail_status=500), "echo": fake(reply="request")}))
    reply = await ask(
        client,
        {**USER_HELLO, "targets": ["a", {"provider": "echo", "model": "mini", "top_p": 0.5}]},
    )
    got = sent(reply)
    assert (got["model"], got["top_p"], reply.target) == ("mini", 0.5, "echo:mini")


async def test_fallback_false_tries_only_the_first_target(lifeline, client):
    await lifeline(config({"a": fake(fail_status=503), "b": fake()}))
    reply = await ask(client, {**USER_HELLO, "fallback": False})
    assert reply.error is not None and reply.error.type == "fallback_stopped"
    assert [a.target for a in reply.attempts] == ["a"]
    assert "not tried: b" in reply.error.message


async def test_a_request_can_narrow_fallback_on(lifeline, client):
    routes = {"default": {"targets": ["a", "b"], "fallback_on": ["rate_limit", "server_error"]}}
    await lifeline(config({"a": fake(fail_status=503), "b": fake()}, routes))
    assert (await ask(client, USER_HELLO)).provider == "b"
    reply = await ask(client, {**USER_HELLO, "fallback_on": ["rate_limit"]})
    assert reply.error is not None and reply.error.type == "fallback_stopped"


async def test_what_the_config_forbids_is_refused_with_invalid_request(lifeline, client, audit):
    routes = {"default": {"targets": ["a"], "fallback_on": ["rate_limit"]}}
    await lifeline(config({"a": fake()}, routes, max_attempts=4))
    cases = {
        "max_attempts above the configured maximum": ({"max_attempts": 5}, "maximum of 4"),
        "fallback_on wider than the route's": ({"fallback_on": ["auth"]}, "can only narrow"),
        "an unknown template": (
            {"targets": [{"provider": "a", "template": "nope"}]},
            "targets[0].template",
        ),
        "faults where they are not allowed": ({"faults": {"a": 503}}, "allow_fault_injection"),
        "a bad JSON Schema": (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": 5}},
                }
            },
            "not a valid JSON Schema",
        ),
    }
    for name, (extra, words) in cases.items():
        reply = await ask(client, {**USER_HELLO, **extra})
        assert reply.error is not None, name
        assert (reply.error.type, words in reply.error.message) == ("invalid_request", True), (
            name,
            reply.error,
        )
        assert reply.attempts == [], name
    await audit.wait_for(len(cases))
    unknown = await ask(client, {**USER_HELLO, "targets": [{"provider": "ghost"}]})
    assert unknown.error is not None and unknown.error.type == "unknown_provider"


async def test_a_request_naming_one_target_twice_is_refused_as_a_chain_in_the_config_is(
    lifeline, client, audit
):
    """A request's own targets naming one target again called it again at once, past its
    retry_on, its backoff and the retry budget: six calls to a provider in an outage for each
    request, where the config refuses such a chain and points at `retries`."""
    await lifeline(config({"down": fake(fail_status=503), "up": fake()}))
    for twice in (["down"] * 6, ["down", {"provider": "down"}, "up"]):
        reply = await ask(client, {**USER_HELLO, "targets": twice})
        assert reply.error is not None, twice
        assert reply.error.type == "invalid_request", reply.error
        assert "targets[1]: target 'down' is already in this chain" in reply.error.message
        assert "retries" in reply.error.message
        assert reply.attempts == []
    # The same provider shaped apart is two targets, as in a route.
    reply = await ask(
        client, {**USER_HELLO, "targets": ["down", {"provider": "down", "max_tokens": 9}, "up"]}
    )
    assert [a.target for a in reply.attempts] == ["down", "down", "up"]


# ---- failure passed forward --------------------------------------------------------


async def test_a_target_can_opt_in_to_the_earlier_error_kinds(lifeline, client):
    await lifeline(
        {
            "providers": {
                "a": fake(fail_status=429),
                "b": fake(hang=True, timeout_s=0.1),
                "c": fake(reply="request"),
            },
            "routes": {
                "default": {"targets": ["a", "b", {"provider": "c", "pass_failures": True}]}
            },
        }
    )
    reply = await ask(client, {**USER_HELLO, "metadata": {"team": "search"}})
    assert sent(reply)["metadata"] == {
        "team": "search",
        "lifeline_previous_errors": ["rate_limit", "timeout"],
    }


async def test_a_template_can_adapt_its_prompt_to_the_earlier_failures(lifeline, client):
    await lifeline(
        {
            "providers": {"a": fake(fail_status=429), "c": fake(reply="request")},
            "templates": {
                "adapt": {"system": "Earlier attempts failed: {previous_errors}. Keep it short."}
            },
            "routes": {
                "default": {
                    "targets": ["a", {"provider": "c", "pass_failures": True, "template": "adapt"}]
                }
            },
        }
    )
    reply = await ask(client, USER_HELLO)
    assert sent(reply)["messages"][0] == {
        "role": "system",
        "content": "Earlier attempts failed: rate_limit. Keep it short.",
    }


async def test_a_templates_system_replaces_developer_messages_too(lifeline, client):
    """developer is OpenAI's name for system instructions: it cannot slip past the operator's
    `system` as a second system prompt; {system} carries its text, in order."""
    await lifeline(
        {
            "providers": {"p": fake(reply="request")},
            "templates": {"terse": {"system": "Answer in one sentence. {system}"}},
            "routes": {"default": {"targets": [{"provider": "p", "template": "terse"}]}},
        }
    )
    messages = [
        {"role": "system", "content": "SYS-A"},
        {"role": "developer", "content": "DEV: answer at length"},
        {"role": "user", "content": "hi"},
    ]
    reply = await ask(client, {"messages": messages})
    assert sent(reply)["messages"] == [
        {"role": "system", "content": "Answer in one sentence. SYS-A\n\nDEV: answer at length"},
        {"role": "user", "content": "hi"},
    ]


async def test_a_user_template_on_text_and_images_keeps_the_text_parts_apart(lifeline, client):
    await lifeline(
        {
            "providers": {"p": fake(reply="request")},
            "templates": {"q": {"user": "Question: {input}"}},
            "routes": {"default": {"targets": [{"provider": "p", "template": "q"}]}},
        }
    )
    one = {"type": "image", "url": "https://example.com/1.png"}
    two = {"type": "image", "url": "https://example.com/2.png"}
    content = [
        {"type": "text", "text": "Is the first picture"},
        one,
        {"type": "text", "text": "brighter than the second?"},
        two,
    ]
    reply = await ask(client, {"messages": [{"role": "user", "content": content}]})
    assert sent(reply)["messages"] == [
        {
            "role": "user",
            "content": [
                {
                    "type": "text",
                    "text": "Question: Is the first picture\nbrighter than the second?",
                },
                one,
                two,
            ],
        }
    ]


def test_a_template_shared_by_many_targets_shapes_a_request_once(monkeypatch):
    """64 targets sharing a template that repeats {input}, on a 900 KB message: the input was
    shaped and counted once per target, a second of the dispatcher's event loop."""
    from service import routing
    from service.config import parse_config

    calls = []
    real = routing.estimate_shaped
    monkeypatch.setattr(routing, "estimate_shaped", lambda *a: calls.append(1) or real(*a))
    router = routing.Router(
        parse_config(
            {
                "providers": {"p": fake()},
                "templates": {"rep": {"user": "{input}\n{input}"}},
                "routes": {"default": {"targets": ["p"]}},
            }
        )
    )
    targets = [
        {"provider": "p", "name": f"p{i}", "template": "rep", "max_input_tokens": 10}
        for i in range(64)
    ]
    request = {"messages": [{"role": "user", "content": "a" * 1000}], "targets": targets}
    plan = router.plan(json.dumps(request).encode())
    assert plan.needs.shaped_tokens is not None
    tokens = [plan.needs.shaped_tokens(t.shaping.template, True) for t in plan.chain.targets]
    assert len(tokens) == 64
    assert all(n > 10 for n in tokens)
    assert len(calls) == 1


def test_a_target_that_drops_the_tools_is_judged_without_their_definitions():
    """drop = ["tools"] sends a target no tool definitions: its max_input_tokens was checked
    against an estimate that counted them, and it was skipped for input it never gets."""
    from service.config import parse_config
    from service.policy import skip_reason
    from service.routing import Router

    router = Router(
        parse_config(
            {
                "providers": {"p": fake()},
                "routes": {
                    "default": {
                        "targets": [
                            {"provider": "p", "name": "keeps", "max_input_tokens": 500},
                            {
                                "provider": "p",
                                "name": "drops",
                                "max_input_tokens": 500,
                                "drop": ["tools"],
                            },
                        ]
                    }
                },
            }
        )
    )
    tool = {"name": "lookup", "description": "d" * 4000, "parameters": {"type": "object"}}
    request = {"messages": [{"role": "user", "content": "Hi"}], "tools": [tool]}
    plan = router.plan(json.dumps(request).encode())
    keeps, drops = plan.chain.targets
    reason, message = skip_reason(keeps, plan.needs)
    assert reason == "max_input_tokens" and "keeps takes at most 500" in message
    assert skip_reason(drops, plan.needs) is None


def test_a_request_with_more_tools_than_openai_takes_is_refused():
    """Each tool's parameters are compiled to check the calls against: 15,000 tools (863 KB)
    took a third of a second of the dispatcher's event loop."""
    from service.config import parse_config
    from service.routing import Rejected, Router

    router = Router(
        parse_config({"providers": {"p": fake()}, "routes": {"default": {"targets": ["p"]}}})
    )
    tools = [{"name": f"t{n}", "parameters": {"type": "object"}} for n in range(129)]
    request = {"messages": [{"role": "user", "content": "hi"}], "tools": tools}
    with pytest.raises(Rejected) as refused:
        router.plan(json.dumps(request).encode())
    assert (
        refused.value.error.type == "invalid_request" and "$.tools" in refused.value.error.message
    )
    assert router.plan(json.dumps({**request, "tools": tools[:128]}).encode()) is not None


def test_a_requests_own_target_with_under_a_millisecond_is_refused_saying_why():
    """As in the config: a call given less times out (or is dropped as late) at every try."""
    from service.config import parse_config
    from service.routing import Rejected, Router

    router = Router(
        parse_config({"providers": {"p": fake()}, "routes": {"default": {"targets": ["p"]}}})
    )
    request = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(Rejected) as refused:
        router.plan(
            json.dumps({**request, "targets": [{"provider": "p", "timeout_s": 5e-4}]}).encode()
        )
    error = refused.value.error
    assert error.type == "invalid_request"
    assert error.message.startswith("targets[0].timeout_s: 0.0005 is under 1 ms: ")
    assert router.plan(
        json.dumps({**request, "targets": [{"provider": "p", "timeout_s": 0.001}]}).encode()
    )


async def test_max_input_tokens_judges_the_input_as_the_targets_template_makes_it(lifeline, client):
    """A template that repeats {input} makes the input longer for its target; one that
    replaces a long system prompt makes it shorter."""
    await lifeline(
        {
            "providers": {"small": fake(reply="small"), "big": fake(reply="big")},
            "templates": {
                "x4": {"user": "{input}\n{input}\n{input}\n{input}"},
                "terse": {"system": "Answer in one sentence."},
            },
            "routes": {
                "x4": {
                    "targets": [
                        {"provider": "small", "max_input_tokens": 120, "template": "x4"},
                        "big",
                    ]
                },
                "terse": {
                    "targets": [
                        {"provider": "small", "max_input_tokens": 120, "template": "terse"},
                        "big",
                    ]
                },
            },
        }
    )
    repeated = await ask(
        client, {"route": "x4", "messages": [{"role": "user", "content": "a" * 400}]}
    )
    assert outcomes(repeated) == [
        ("small", "skipped", "max_input_tokens", None),
        ("big", "ok", None, None),
    ]
    # 3 + (4 + 403 characters / 4, rounded up): the four copies the target would be sent
    assert "about 408 tokens" in (repeated.attempts[0].message or "")
    replaced = await ask(
        client,
        {
            "route": "terse",
            "messages": [
                {"role": "system", "content": "s" * 4000},
                {"role": "user", "content": "hi"},
            ],
        },
    )
    assert (replaced.content, outcomes(replaced)) == ("small", [("small", "ok", None, None)])


async def test_without_opting_in_a_target_sees_only_the_requests_metadata(lifeline, client):
    await lifeline(config({"a": fake(fail_status=429), "c": fake(reply="request")}))
    reply = await ask(client, {**USER_HELLO, "metadata": {"team": "search"}})
    assert sent(reply)["metadata"] == {"team": "search"}


# ---- fault injection ---------------------------------------------------------------


async def test_faults_prove_a_fallback_without_breaking_a_provider(lifeline, client):
    await lifeline(
        config(
            {"primary": fake(reply="primary"), "backup": fake(reply="backup")},
            allow_fault_injection=True,
        )
    )
    timed_out = await ask(
        client,
        {
            **USER_HELLO,
            "faults": {"primary": "timeout"},
            "targets": [{"provider": "primary", "timeout_s": 0.1}, "backup"],
        },
    )
    assert (timed_out.content, timed_out.attempts[0].error_type) == ("backup", "timeout")
    assert "simulated" in (timed_out.attempts[0].message or "")
    rate_limited = await ask(client, {**USER_HELLO, "faults": {"primary": 429}})
    assert (rate_limited.content, rate_limited.attempts[0].status_code) == ("backup", 429)
    invalid = await ask(client, {**USER_HELLO, "faults": {"primary": "invalid_output"}})
    assert (invalid.content, invalid.attempts[0].error_type) == ("backup", "invalid_output")
    # Without faults the real provider answers: nothing was broken.
    assert (await ask(client, USER_HELLO)).content == "primary"


async def test_faults_must_name_a_target_of_the_request(lifeline, client):
    await lifeline(config({"primary": fake()}, allow_fault_injection=True))
    reply = await ask(client, {**USER_HELLO, "faults": {"primray": 503}})
    assert (
        reply.error is not None
        and "primray" in reply.error.message
        and "primary" in reply.error.message
    )


# ---- every decision, everywhere ----------------------------------------------------


async def test_skip_retry_and_fallback_show_alike_in_reply_audit_and_trace(
    lifeline, client, audit, exporter
):
    await lifeline(
        {
            "providers": {"small": fake(), "flaky": fake(fail_status=503), "backup": fake()},
            "routes": {
                "default": {
                    "targets": [
                        {"provider": "small", "max_input_tokens": 50},
                        {"provider": "flaky", "retries": 1, "backoff_s": 0},
                        "backup",
                    ]
                }
            },
        }
    )
    reply = await ask(client, LONG_INPUT)
    assert outcomes(reply) == [
        ("small", "skipped", "max_input_tokens", None),
        ("flaky", "error", "server_error", "retry"),
        ("flaky", "error", "server_error", "fallback"),
        ("backup", "ok", None, None),
    ]
    [(_, event)] = await audit.wait_for(1)  # the same attempts, without their messages
    assert all(a.message for a in reply.attempts[:3])
    assert event.attempts == [structs.replace(a, message=None) for a in reply.attempts]
    span = next(s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER)
    assert [e.name for e in span.events] == ["lifeline.skip", "lifeline.retry", "lifeline.fallback"]
    assert span.attributes["lifeline.target"] == "backup"


# ---- load-balanced groups ----------------------------------------------------------


async def test_a_weighted_group_spreads_requests_by_weight(lifeline, client):
    await lifeline(
        {
            "providers": {"east": fake(reply="east"), "west": fake(reply="west")},
            "routes": {
                "default": {"targets": [{"group": [{"provider": "east", "weight": 3}, "west"]}]}
            },
        }
    )
    replies = await asyncio.gather(*(ask(client, USER_HELLO) for _ in range(400)))
    east = sum(1 for r in replies if r.content == "east")
    assert 240 <= east <= 360  # 300 expected; binomial sd ~8.7, so this is about ±7 sd


async def test_a_failed_group_member_hands_over_to_the_others_before_the_next_step(
    lifeline, client
):
    await lifeline(
        {
            "providers": {
                "a": fake(fail_status=503),
                "b": fake(fail_status=503),
                "next": fake(reply="next"),
            },
            "routes": {"default": {"targets": [{"group": ["a", "b"]}, "next"]}},
        }
    )
    firsts = set()
    for _ in range(20):
        reply = await ask(client, USER_HELLO)
        assert reply.content == "next"
        assert sorted(a.target for a in reply.attempts[:2]) == ["a", "b"]
        firsts.add(reply.attempts[0].target)
    assert firsts == {
        "a",
        "b",
    }  # equal weights: each leads sometimes (chance of not: 2 in a million)


def test_small_weights_share_a_group_as_large_ones_do():
    """Weights of 0.001 each are as even as 1 each (the ordering key must not underflow)."""
    import random

    from service.routing import weighted_order
    from service.target import Target

    def share(weights: tuple[float, float]) -> float:
        group = [
            Target(name=f"t{i}", provider=f"t{i}", kind="fake", model="m", timeout_s=1, weight=w)
            for i, w in enumerate(weights)
        ]
        rng = random.Random(7)
        firsts = [weighted_order(group, rng.random)[0].name for _ in range(20_000)]
        return firsts.count("t0") / len(firsts)

    assert abs(share((0.001, 0.001)) - 0.5) < 0.03
    assert abs(share((0.0005, 0.001)) - 1 / 3) < 0.03
    assert abs(share((1, 3)) - 0.25) < 0.03
    # Subnormal weights: log(u) / weight overflowed to -inf, every key tied, and the last
    # target of the group came first every time (against the weights, for 3e-320 and 1e-320).
    assert abs(share((3e-320, 1e-320)) - 0.75) < 0.03
    assert abs(share((1e9, 1e9)) - 0.5) < 0.03


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        (["d", "d"], "routes.default.targets[0].group[1]: target 'd' is already in this group"),
        (
            ["d", {"provider": "d"}],
            "routes.default.targets[0].group[1]: target 'd' is already in this group",
        ),
        (["d", {"group": ["d", "z"]}], "group[1]: a group holds targets, not another group"),
        (["d", {"provider": "z", "weight": float("inf")}], "group[1].weight"),
    ],
    ids=["twice by name", "twice inline", "a group in a group", "an infinite weight"],
)
def test_a_group_that_is_not_what_it_says_is_refused_naming_the_key(group, expected):
    """A group listing one target twice was taken: that target was called twice per request
    (a group of one, which groups refuse); an infinite weight made every order the same."""
    from service.config import ConfigError, parse_config

    config = {
        "providers": {"d": fake(), "z": fake()},
        "routes": {"default": {"targets": [{"group": group}]}},
    }
    with pytest.raises(ConfigError) as refused:
        parse_config(config)
    assert expected in str(refused.value), str(refused.value)
