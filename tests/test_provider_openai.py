"""The openai provider against OpenAI's documented Chat Completions request, response and error bodies."""

from __future__ import annotations

import base64
import datetime
import email.utils
import json
from typing import Any

import httpx
import msgspec
import pytest
from helpers import MisbehavingProvider, MockServer, expect_failure, provider_fixture

from schemas import ChatMessage, ProviderOk, ProviderRequest, Usage
from schemas.wire import JsonSchemaFormat, ResponseFormat
from workers.base import ProviderError
from workers.openai import OpenAIProvider, OpenAISettings

KEY = "sk-proj-test-0123456789abcdef"
ENV = {"OPENAI_API_KEY": KEY}

# https://platform.openai.com/docs/api-reference/chat/object
COMPLETION = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "object": "chat.completion",
    "created": 1741569952,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello! How can I assist you today?",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 19,
        "completion_tokens": 10,
        "total_tokens": 29,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_06737a9306",
}


def error(
    message: str, type_: str | None, code: str | None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's documented error body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class Server(MockServer):
    default_body = COMPLETION


make = provider_fixture(
    lambda client, environ=ENV, **settings: OpenAIProvider(
        msgspec.convert({"kind": "openai", "model": "gpt-4o-mini", **settings}, OpenAISettings),
        client,
        environ=environ,
    )
)


def request(**fields: Any) -> ProviderRequest:
    return ProviderRequest(id="r1", messages=[ChatMessage("user", "Hello!")], **fields)


async def failure(provider: OpenAIProvider) -> ProviderError:
    return await expect_failure(provider, request())


# ---- the request ----------------------------------------------------------------------


async def test_posts_to_the_chat_completions_url(make):
    server = Server()
    await make(server).complete(request(), timeout_s=5)
    assert server.request.method == "POST"
    assert str(server.request.url) == "https://api.openai.com/v1/chat/completions"


async def test_sends_the_api_key_as_a_bearer_token(make):
    server = Server()
    await make(server).complete(request(), timeout_s=5)
    assert server.request.headers["authorization"] == f"Bearer {KEY}"


async def test_sends_the_organization_header_when_configured(make):
    server = Server()
    await make(server, organization="org-abc123").complete(request(), timeout_s=5)
    assert server.request.headers["openai-organization"] == "org-abc123"


async def test_sends_model_and_messages_in_the_body(make):
    server = Server()
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hello!")]
    await make(server).complete(ProviderRequest(id="r1", messages=messages), timeout_s=5)
    assert server.sent_json() == {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello!"},
        ],
    }


async def test_sends_max_tokens_and_temperature_when_set(make):
    """OpenAI's own API takes the limit as max_completion_tokens (its reasoning models refuse
    max_tokens); a compatible server gets max_tokens, which is what most of them know."""
    for settings, field in [
        ({}, "max_completion_tokens"),
        ({"base_url": "http://localhost:11434/v1"}, "max_tokens"),
        (
            {"base_url": "http://vllm:8000/v1", "max_tokens_field": "max_completion_tokens"},
            "max_completion_tokens",
        ),
        ({"max_tokens_field": "max_tokens"}, "max_tokens"),
    ]:
        server = Server()
        await make(server, **settings).complete(request(max_tokens=64, temperature=0.2), 5)
        sent = server.sent_json()
        assert (sent[field], sent["temperature"]) == (64, 0.2), settings
        other = "max_tokens" if field == "max_completion_tokens" else "max_completion_tokens"
        assert other not in sent


async def test_request_model_overrides_the_configured_model(make):
    server = Server()
    await make(server).complete(request(model="gpt-4o"), timeout_s=5)
    assert server.sent_json()["model"] == "gpt-4o"


async def test_sends_top_p_when_set(make):
    server = Server()
    await make(server).complete(request(top_p=0.9), timeout_s=5)
    assert server.sent_json()["top_p"] == 0.9


async def test_leaves_unset_top_p_and_response_format_out(make):
    server = Server()
    await make(server).complete(request(), timeout_s=5)
    assert "top_p" not in server.sent_json() and "response_format" not in server.sent_json()


# https://platform.openai.com/docs/guides/structured-outputs
async def test_sends_a_json_schema_response_format_in_openais_shape(make):
    server = Server()
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    response_format = ResponseFormat(
        "json_schema", JsonSchemaFormat(name="person", schema=schema, strict=True)
    )
    await make(server).complete(request(response_format=response_format), timeout_s=5)
    assert server.sent_json()["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": schema, "strict": True},
    }


async def test_unset_response_format_fields_are_left_out_not_sent_as_null(make):
    server = Server()
    response_format = ResponseFormat(
        "json_schema", JsonSchemaFormat(name="person", schema={"type": "object"})
    )
    await make(server).complete(request(response_format=response_format), timeout_s=5)
    assert server.sent_json()["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": {"type": "object"}},
    }


async def test_sends_a_json_object_response_format_as_its_type_alone(make):
    server = Server()
    await make(server).complete(request(response_format=ResponseFormat("json_object")), timeout_s=5)
    assert server.sent_json()["response_format"] == {"type": "json_object"}


# ---- the answer -----------------------------------------------------------------------


async def test_parses_content_model_and_usage_from_the_completion(make):
    ok = await make(Server()).complete(request(), timeout_s=5)
    assert ok == ProviderOk(
        content="Hello! How can I assist you today?",
        model="gpt-4o-mini-2024-07-18",
        usage=Usage(input_tokens=19, output_tokens=10),
        finish_reason="stop",
    )


async def test_a_200_without_choices_is_a_server_error(make):
    err = await failure(make(Server(body={"id": "chatcmpl-1", "object": "chat.completion"})))
    assert err.kind == "server_error"
    assert err.message.startswith("provider returned an unexpected response body")


@pytest.mark.parametrize("count", [-1, 2**63, 2**64 - 1])
async def test_a_usage_count_no_reader_holds_is_a_server_error(make, count):
    """A negative count, or one past 2**53 - 1 (JavaScript's largest exact integer): one past
    2**63 - 1 made the span exporter drop the attribute with a traceback."""
    usage = {**COMPLETION["usage"], "prompt_tokens": count}
    err = await failure(make(Server(body={**COMPLETION, "usage": usage})))
    assert err.kind == "server_error"
    assert "usage.prompt_tokens" in err.message


async def test_a_200_that_is_not_json_is_a_server_error(make):
    err = await failure(make(Server(body="<html>upstream proxy page</html>")))
    assert (err.kind, err.status_code) == ("server_error", 200)


async def test_a_filtered_answer_maps_to_content_filter(make):
    body = json.loads(json.dumps(COMPLETION))
    body["choices"][0]["message"]["content"] = None
    body["choices"][0]["finish_reason"] = "content_filter"
    err = await failure(make(Server(body=body)))
    assert err.kind == "content_filter"


async def test_a_refusal_maps_to_content_filter_without_its_text(make):
    """Structured Outputs: content null and message.refusal set, the model declining."""
    body = json.loads(json.dumps(COMPLETION))
    body["choices"][0]["message"] = {"role": "assistant", "content": None, "refusal": "I can't."}
    err = await failure(make(Server(body=body)))
    assert err.kind == "content_filter" and "I can't" not in err.message


# ---- errors ---------------------------------------------------------------------------


async def test_a_429_whose_body_holds_a_number_too_long_to_read_is_still_a_rate_limit(make):
    body = '{"error": {"message": "Rate limit reached", "code": ' + "9" * 5000 + "}}"
    server = Server(status=429, body=body.encode(), headers={"retry-after": "7"})
    with pytest.raises(ProviderError) as caught:
        await make(server).complete(request(), timeout_s=5)
    assert (caught.value.kind, caught.value.retry_after_s) == ("rate_limit", 7.0)


async def test_rate_limit_maps_to_rate_limit_with_retry_after(make):
    body = error(
        "Rate limit reached for gpt-4o-mini in organization org-abc123 on requests per min (RPM): "
        "Limit 3, Used 3, Requested 1. Please try again in 20s.",
        "requests",
        "rate_limit_exceeded",
    )
    err = await failure(make(Server(429, body, headers={"retry-after": "20"})))
    assert (err.kind, err.status_code, err.retry_after_s) == ("rate_limit", 429, 20.0)
    assert err.message.startswith("openai 429: Rate limit reached for gpt-4o-mini")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("20", 20.0),
        ("0.5", 0.5),
        ("-1", None),
        ("nan", None),
        ("soon", None),
        (None, None),
        # A date whose zone overflows Python's int: it raised, and the 429 lost its kind.
        ("Mon, 01 Jan 2026 00:00:00 +99999999999999999999", None),
    ],
)
async def test_retry_after_in_seconds_is_read_and_nonsense_ignored(make, value, seconds):
    headers = {"retry-after": value} if value is not None else {}
    err = await failure(make(Server(429, error("slow down", "requests", None), headers=headers)))
    assert (err.kind, err.retry_after_s) == ("rate_limit", seconds)


async def test_retry_after_as_an_http_date_is_the_time_until_it(make):
    """RFC 9110 allows a date: it was ignored, so a retry came at once instead of in 60 s."""
    later = email.utils.format_datetime(
        datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=60), usegmt=True
    )
    err = await failure(
        make(Server(429, error("slow down", "requests", None), headers={"retry-after": later}))
    )
    assert err.retry_after_s is not None and 50 < err.retry_after_s <= 60
    past = "Wed, 21 Oct 2015 07:28:00 GMT"
    err = await failure(
        make(Server(503, error("down", "server_error", None), headers={"retry-after": past}))
    )
    assert err.retry_after_s == 0


async def test_a_redirect_is_not_followed_and_says_where_it_points(make):
    """httpx follows no redirect (the key would go along to wherever it points): the call is a
    server_error, which falls back, not a bad_request, which ends the chain."""
    server = Server(301, "moved", headers={"location": "https://elsewhere.test/v1"})
    err = await failure(make(server))
    assert (err.kind, err.status_code) == ("server_error", 301)
    assert "redirected to https://elsewhere.test/v1" in err.message
    assert len(server.requests) == 1


async def test_invalid_api_key_maps_to_auth(make):
    body = error(
        "Incorrect API key provided: sk-proj-****cdef.", "invalid_request_error", "invalid_api_key"
    )
    err = await failure(make(Server(401, body)))
    assert (err.kind, err.status_code) == ("auth", 401)


async def test_context_length_exceeded_maps_to_context_length(make):
    body = error(
        "This model's maximum context length is 128000 tokens. However, your messages resulted in "
        "130123 tokens. Please reduce the length of the messages.",
        "invalid_request_error",
        "context_length_exceeded",
        param="messages",
    )
    err = await failure(make(Server(400, body)))
    assert (err.kind, err.status_code) == ("context_length", 400)


async def test_llama_cpps_prompt_over_its_context_maps_to_context_length(make):
    """llama.cpp's server says so in error.type, with a numeric code: it was a bad_request,
    so a route's chain of its own for context_length (a model with a larger context) never
    came into play."""
    body = {
        "error": {
            "code": 400,
            "message": "request (5000 tokens) exceeds the available context size (4096 tokens), "
            "try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 5000,
            "n_ctx": 4096,
        }
    }
    err = await failure(make(Server(400, body)))
    assert (err.kind, err.status_code) == ("context_length", 400)
    assert "exceeds the available context size" in err.message


@pytest.mark.parametrize(
    ("message", "type_", "code"),
    [  # vLLM, DeepSeek and OpenRouter, as each answers a prompt past the model's context
        (
            "This model's maximum context length is 32768 tokens. However, your request has 40000",
            "BadRequestError",
            400,
        ),
        (
            "This model's maximum context length is 65536 tokens. However, you requested 70000",
            "invalid_request_error",
            "invalid_request_error",
        ),
        ("This endpoint's maximum context length is 8192 tokens.", None, 400),
    ],
)
async def test_compatible_servers_prompt_over_its_context_maps_to_context_length(
    make, message, type_, code
):
    """They name it in the message alone, with no context_length_exceeded code: it was a
    bad_request, so a route's context_length chain (a model with a larger context) never ran."""
    err = await failure(make(Server(400, error(message, type_, code))))
    assert (err.kind, err.status_code) == ("context_length", 400)


def vllm_error(message: str) -> dict[str, Any]:
    """vLLM's error body before it took OpenAI's `error` wrapper (its ErrorResponse, which
    servers built on its protocol still answer): the error object itself, at the top."""
    return {
        "object": "error",
        "message": message,
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }


@pytest.mark.parametrize("padding", [0, 100_000], ids=["short", "over-64-KiB"])
async def test_vllms_unwrapped_error_is_read_as_its_error_object(make, padding):
    """Without the `error` wrapper nothing of it was read: its prompt over the context was a
    bad_request (the route's context_length chain never ran), said as the whole body's JSON."""
    message = "This model's maximum context length is 4096 tokens. However, you requested 5000"
    body = {**vllm_error(message), **({"detail": "x" * padding} if padding else {})}
    err = await failure(make(Server(400, body)))
    assert (err.kind, err.status_code) == ("context_length", 400)
    assert err.message == f"openai 400: {message}"
    other = vllm_error("max_tokens must be at least 1, got -186.")
    err = await failure(make(Server(400, other)))
    assert (err.kind, err.message) == ("bad_request", f"openai 400: {other['message']}")


async def test_a_spent_quota_is_quota_not_a_rate_limit_worth_waiting_for(make):
    body = error(
        "You exceeded your current quota, please check your plan and billing details.",
        "insufficient_quota",
        "insufficient_quota",
    )
    err = await failure(make(Server(429, body)))
    assert (err.kind, err.status_code) == ("quota", 429)
    plain = await failure(make(Server(429, error("Rate limit reached", "requests", "rate_limit"))))
    assert plain.kind == "rate_limit"


@pytest.mark.parametrize("code", ["billing_not_active", None])
async def test_an_account_whose_billing_is_not_active_is_quota_not_a_rate_limit(make, code):
    """OpenAI answers it as a 429 of type billing_not_active (its code the same, or null): it
    was a rate_limit, retried and answered by the gateway as a 429 to send again, which no
    wait cures."""
    message = "Your account is not active, please check your billing details on our website."
    err = await failure(make(Server(429, error(message, "billing_not_active", code))))
    assert (err.kind, err.status_code) == ("quota", 429)


@pytest.mark.parametrize("code", ["content_filter", "content_policy_violation"])
async def test_content_policy_codes_map_to_content_filter(make, code):
    body = error(
        "Your request was rejected as a result of our safety system.", "invalid_request_error", code
    )
    err = await failure(make(Server(400, body)))
    assert (err.kind, err.status_code) == ("content_filter", 400)


async def test_openrouters_403_for_an_input_its_moderation_flagged_is_content_filter(make):
    """OpenRouter answers a model that requires moderation and an input it flagged with a 403
    (https://openrouter.ai/docs/api/reference/errors-and-debugging): it was `auth`, a key blamed for a
    prompt, and a route's content_filter chain never ran."""
    body = {
        "error": {
            "message": 'openai/gpt-4 requires moderation on OpenAI. Your input was flagged for "harassment". No credits were charged.',
            "code": 403,
            "metadata": {
                "reasons": ["harassment"],
                "flagged_input": "You are an auto-prompting tool",
                "provider_name": "OpenAI",
                "model_slug": "openai/gpt-4",
            },
        }
    }
    err = await failure(make(Server(403, body)))
    assert (err.kind, err.status_code) == ("content_filter", 403)
    assert "Your input was flagged" in err.message
    denied = {"error": {"message": "Key is disabled", "code": 403}}  # a 403 about the key
    assert (await failure(make(Server(403, denied)))).kind == "auth"


async def test_groqs_413_for_a_request_over_its_tokens_per_minute_is_not_a_rate_limit(make):
    """Groq's 413 says the request alone asks for more tokens than the account's whole minute
    allows (Requested over Limit): no wait cures it, so it is not retried as a 429 is, nor
    counted against Groq's breaker; another target can take it."""
    message = (
        "Request too large for model `llama-3.1-70b-versatile` in organization `org_01hw8f0aa0ekm`"
        " on tokens per minute (TPM): Limit 6000, Requested 14368, please reduce your message"
        " size and try again. Visit https://console.groq.com/docs/rate-limits for more information."
    )
    err = await failure(make(Server(413, error(message, "tokens", "rate_limit_exceeded"))))
    assert (err.kind, err.status_code) == ("bad_request", 413)


async def test_other_400s_map_to_bad_request(make):
    message = "Invalid value for 'temperature': expected a number <= 2."
    body = error(message, "invalid_request_error", "invalid_value", param="temperature")
    err = await failure(make(Server(400, body)))
    assert (err.kind, err.status_code) == ("bad_request", 400)


async def test_a_500_is_a_server_error_after_exactly_one_call(make):
    message = "The server had an error while processing your request. Sorry about that!"
    server = Server(500, error(message, "server_error", None))
    err = await failure(make(server))
    assert (err.kind, err.status_code) == ("server_error", 500)
    assert len(server.requests) == 1


async def test_a_read_timeout_maps_to_timeout(make):
    err = await failure(make(Server(raises=httpx.ReadTimeout)))
    assert err.kind == "timeout"


async def test_a_connect_error_maps_to_connection(make):
    err = await failure(make(Server(raises=httpx.ConnectError)))
    assert err.kind == "connection"


async def test_a_connection_refused_names_where_it_was_going(make):
    """The example's commented `local` provider, uncommented with no Ollama running, failed
    with "ConnectError: All connection attempts failed" alone: not which base_url to check."""
    server = Server(raises=httpx.ConnectError)
    err = await failure(
        make(server, environ={}, api_key_env="", base_url="http://localhost:11434/v1")
    )
    assert err.message.endswith("(http://localhost:11434)"), err.message


async def test_the_api_key_never_appears_in_an_error_message(make):
    body = error(f"Incorrect API key provided: {KEY}.", "invalid_request_error", "invalid_api_key")
    err = await failure(make(Server(401, body)))
    assert KEY not in err.message
    assert "***" in err.message


async def test_an_error_with_an_empty_body_says_so_rather_than_ending_at_its_status(make):
    """A proxy's 401 (or 429, 502) with no body read "openai 401:" and nothing after it."""
    err = await failure(make(Server(401, b"")))
    assert err.kind == "auth" and err.message == "openai 401: (empty body)", err.message


async def test_error_messages_are_trimmed(make):
    err = await failure(make(Server(400, error("x" * 5000, "invalid_request_error", None))))
    assert len(err.message) <= 300


# ---- settings and keys ----------------------------------------------------------------


def test_a_missing_api_key_env_var_raises_naming_the_variable():
    settings = msgspec.convert({"kind": "openai", "model": "gpt-4o-mini"}, OpenAISettings)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        OpenAIProvider(settings, environ={})


async def test_a_key_read_with_a_trailing_newline_is_sent_without_it(make):
    """A key from a secret file often ends in a newline, which no HTTP header may carry."""
    server = Server()
    await make(server, environ={"OPENAI_API_KEY": KEY + "\n"}).complete(request(), timeout_s=5)
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"
    settings = msgspec.convert({"kind": "openai", "model": "gpt-4o-mini"}, OpenAISettings)
    with pytest.raises(ValueError, match="no HTTP header may carry"):
        OpenAIProvider(settings, environ={"OPENAI_API_KEY": "sk-one two"})


def test_a_key_pasted_where_its_variables_name_belongs_is_not_repeated():
    pasted = "sk-proj-abcdefSECRET123"
    settings = msgspec.convert(
        {"kind": "openai", "model": "gpt-4o-mini", "api_key_env": pasted}, OpenAISettings
    )
    with pytest.raises(ValueError) as caught:
        OpenAIProvider(settings, environ={})
    assert pasted not in str(caught.value) and "is it the secret itself" in str(caught.value)
    with pytest.raises(ValueError, match=r"\$OPENAI_API_KEY"):  # a real name is named
        OpenAIProvider(
            msgspec.convert({"kind": "openai", "model": "m"}, OpenAISettings), environ={}
        )


def test_settings_require_a_model():
    with pytest.raises(msgspec.ValidationError, match="model"):
        msgspec.convert({"kind": "openai", "model": ""}, OpenAISettings)


def test_settings_reject_unknown_keys():
    with pytest.raises(msgspec.ValidationError, match="api_key"):
        msgspec.convert({"kind": "openai", "model": "gpt-4o-mini", "api_key": KEY}, OpenAISettings)


async def test_an_openai_compatible_server_needs_no_key_and_gets_no_authorization_header(make):
    server = Server(body={**COMPLETION, "model": "llama3.1:8b"})
    provider = make(
        server,
        environ={},
        api_key_env="",
        base_url="http://localhost:11434/v1/",
        model="llama3.1:8b",
    )
    ok = await provider.complete(request(), timeout_s=5)
    assert str(server.request.url) == "http://localhost:11434/v1/chat/completions"
    assert "authorization" not in server.request.headers
    assert ok.model == "llama3.1:8b"


def test_a_base_url_with_user_info_is_refused_beside_the_api_key():
    """httpx makes a URL's user info an `Authorization: Basic` header, which replaced the
    key's Bearer: the provider got the proxy's password and never the key. Refused, saying
    why, without quoting the URL."""
    password = "Proxy-PW-31337"
    url = f"https://proxy:{password}@proxy.example/v1"
    with pytest.raises(ValueError, match="base_url holds user info") as refused:
        OpenAISettings(kind="openai", model="gpt-4o-mini", base_url=url)  # as the config reads it
    assert "in place of the API key" in str(refused.value)
    assert password not in str(refused.value)


async def test_a_base_urls_user_info_without_a_key_goes_as_basic_auth_and_is_scrubbed():
    """With no key (api_key_env = ""), a proxy's password in base_url goes out as Basic auth
    (httpx's, from the URL): a server echoing the Authorization header shows neither it nor
    its base64 form (the provider's `secrets`, which the worker also scrubs every answer and
    log line of)."""
    password = "Proxy-PW-31337"
    basic = base64.b64encode(f"proxy:{password}".encode()).decode()
    with MisbehavingProvider() as server:
        url = server.base_url.replace("//", f"//proxy:{password}@")
        settings = OpenAISettings(kind="openai", model="gpt-4o-mini", base_url=url, api_key_env="")
        provider = OpenAIProvider(settings, environ=ENV)
        try:
            with pytest.raises(ProviderError) as failed:
                await provider.complete(ProviderRequest("r1", [ChatMessage("user", "echo key")]), 5)
        finally:
            await provider.aclose()
    assert "bad key Basic ***" in failed.value.message
    assert password not in failed.value.message and basic not in failed.value.message
