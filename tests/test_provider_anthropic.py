"""The anthropic provider against the documented Messages API request, response and error bodies."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import pytest
from helpers import MockServer, expect_failure, provider_fixture

from schemas import ChatMessage, ProviderOk, ProviderRequest, Usage
from schemas.wire import ResponseFormat
from workers.anthropic import AnthropicProvider, AnthropicSettings
from workers.base import ProviderError

KEY = "sk-ant-api03-test-0123456789abcdef"
ENV = {"ANTHROPIC_API_KEY": KEY}

# https://docs.anthropic.com/en/api/messages (response example)
MESSAGE = {
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-20250514",
    "content": [{"type": "text", "text": "Hi! My name is Claude."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 2095,
        "output_tokens": 503,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "service_tier": "standard",
    },
}


def error(type_: str, message: str) -> dict[str, Any]:
    """Anthropic's documented error body (https://docs.anthropic.com/en/api/errors)."""
    return {
        "type": "error",
        "error": {"type": type_, "message": message},
        "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy",
    }


class Server(MockServer):
    default_body = MESSAGE


def settings(**overrides: Any) -> AnthropicSettings:
    return msgspec.convert(
        {"kind": "anthropic", "model": "claude-sonnet-4-20250514", **overrides}, AnthropicSettings
    )


make = provider_fixture(
    lambda client, **overrides: AnthropicProvider(settings(**overrides), client, environ=ENV)
)


def request(*messages: tuple[str, str], **fields: Any) -> ProviderRequest:
    chat = [ChatMessage(role, content) for role, content in messages or [("user", "Hello, Claude")]]
    return ProviderRequest(id="r1", messages=chat, **fields)


async def failure(provider: AnthropicProvider) -> ProviderError:
    return await expect_failure(provider, request())


# ---- the request ----------------------------------------------------------------------


async def test_posts_to_the_messages_url(make):
    server = Server()
    await make(server).complete(request(), timeout_s=5)
    assert server.request.method == "POST"
    assert str(server.request.url) == "https://api.anthropic.com/v1/messages"


async def test_sends_the_api_key_and_the_api_version_headers(make):
    server = Server()
    await make(server).complete(request(), timeout_s=5)
    assert server.request.headers["x-api-key"] == KEY
    assert server.request.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in server.request.headers


async def test_sends_model_messages_and_the_default_max_tokens(make):
    server = Server()
    await make(server).complete(request(), timeout_s=5)
    assert server.sent_json() == {
        "model": "claude-sonnet-4-20250514",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "Hello, Claude"}],
    }


async def test_sends_the_requests_max_tokens_and_temperature(make):
    server = Server()
    await make(server).complete(request(max_tokens=256, temperature=0.5), timeout_s=5)
    assert (server.sent_json()["max_tokens"], server.sent_json()["temperature"]) == (256, 0.5)
    # Anthropic takes 0 to 1; a request falling back from an OpenAI target may say up to 2.
    hotter = Server()
    await make(hotter).complete(request(temperature=1.5), timeout_s=5)
    assert hotter.sent_json()["temperature"] == 1.0


async def test_system_messages_are_joined_into_the_system_field(make):
    server = Server()
    chat = request(("system", "You are terse."), ("user", "Hi"), ("system", "Answer in French."))
    await make(server).complete(chat, timeout_s=5)
    assert server.sent_json()["system"] == "You are terse.\n\nAnswer in French."
    assert server.sent_json()["messages"] == [{"role": "user", "content": "Hi"}]


async def test_consecutive_messages_of_one_role_are_merged_into_one_turn_of_blocks(make):
    server = Server()
    await make(server).complete(request(("user", "One."), ("user", "Two.")), timeout_s=5)
    assert server.sent_json()["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}],
        },
    ]


async def test_request_model_overrides_the_configured_model(make):
    server = Server()
    await make(server).complete(request(model="claude-3-5-haiku-20241022"), timeout_s=5)
    assert server.sent_json()["model"] == "claude-3-5-haiku-20241022"


async def test_sends_the_requests_top_p(make):
    server = Server()
    await make(server).complete(request(top_p=0.9), timeout_s=5)
    assert server.sent_json()["top_p"] == 0.9


async def test_never_sends_response_format_which_the_messages_api_does_not_know(make):
    server = Server()
    await make(server).complete(request(response_format=ResponseFormat("json_object")), timeout_s=5)
    assert "response_format" not in server.sent_json()


# ---- the answer -----------------------------------------------------------------------


async def test_parses_content_model_and_usage_from_the_message(make):
    ok = await make(Server()).complete(request(), timeout_s=5)
    assert ok == ProviderOk(
        content="Hi! My name is Claude.",
        model="claude-sonnet-4-20250514",
        usage=Usage(input_tokens=2095, output_tokens=503),
        finish_reason="stop",
    )


async def test_an_input_count_past_the_wires_bound_is_capped_at_it(make):
    """input_tokens plus the cache counts, each within the wire's bound but not their sum: the
    dispatcher refused the worker's reply, and the paid answer was lost."""
    most = 2**53 - 1
    usage = {**MESSAGE["usage"], "input_tokens": most, "cache_read_input_tokens": 10}
    ok = await make(Server(body={**MESSAGE, "usage": usage})).complete(request(), timeout_s=5)
    assert ok.usage == Usage(input_tokens=most, output_tokens=503, cached_input_tokens=10)
    # The reply as the dispatcher reads it: a count past the bound failed it.
    assert msgspec.json.decode(msgspec.json.encode(ok), type=ProviderOk) == ok


async def test_text_blocks_are_concatenated_and_other_blocks_skipped(make):
    blocks = [
        {"type": "thinking", "thinking": "The user greets me.", "signature": "EqQBCgIYAhIM"},
        {"type": "text", "text": "Hi! "},
        {"type": "text", "text": "My name is Claude."},
    ]
    ok = await make(Server(body={**MESSAGE, "content": blocks})).complete(request(), timeout_s=5)
    assert ok.content == "Hi! My name is Claude."


async def test_a_refusal_maps_to_content_filter(make):
    err = await failure(make(Server(body={**MESSAGE, "content": [], "stop_reason": "refusal"})))
    assert (err.kind, err.status_code) == ("content_filter", 200)


async def test_output_blocked_by_the_content_filter_maps_to_content_filter(make):
    """The API's 400 for an answer its filters withheld: it was a bad_request, which ends the
    chain, not content_filter, which a route may send elsewhere."""
    body = error("invalid_request_error", "Output blocked by content filtering policy")
    err = await failure(make(Server(400, body)))
    assert (err.kind, err.status_code) == ("content_filter", 400)


async def test_a_200_without_content_is_a_server_error(make):
    err = await failure(make(Server(body={"id": "msg_1", "type": "message", "role": "assistant"})))
    assert err.kind == "server_error"
    assert err.message.startswith("provider returned an unexpected response body")


# ---- errors ---------------------------------------------------------------------------


async def test_rate_limit_maps_to_rate_limit_with_retry_after(make):
    message = "This request would exceed the rate limit for your organization of 50,000 input tokens per minute."
    err = await failure(
        make(Server(429, error("rate_limit_error", message), headers={"retry-after": "17"}))
    )
    assert (err.kind, err.status_code, err.retry_after_s) == ("rate_limit", 429, 17.0)
    assert err.message.startswith("anthropic 429: This request would exceed the rate limit")


async def test_a_billing_error_is_quota(make):
    message = "Your credit balance is too low to access the Anthropic API."
    err = await failure(make(Server(402, error("billing_error", message))))
    assert (err.kind, err.status_code) == ("quota", 402)
    err = await failure(make(Server(400, error("billing_error", message))))
    assert err.kind == "quota"


@pytest.mark.parametrize(
    "message",
    [
        "Your credit balance is too low to access the Anthropic API.",
        "You have reached your specified API usage limits. You will regain access on 2026-04-01.",
    ],
)
async def test_spent_credit_said_as_an_invalid_request_is_quota(make, message):
    """The API says a spent balance or a reached spend limit as a 400 invalid_request_error,
    not as billing_error: it was a bad_request, which no breaker counts, so every request
    called Anthropic first again, and a client was told its request was at fault."""
    err = await failure(make(Server(400, error("invalid_request_error", message))))
    assert (err.kind, err.status_code) == ("quota", 400)


async def test_overloaded_529_maps_to_server_error(make):
    err = await failure(make(Server(529, error("overloaded_error", "Overloaded"))))
    assert (err.kind, err.status_code) == ("server_error", 529)


async def test_a_504_timeout_error_is_a_timeout(make):
    """Its documented timeout_error (the request timed out while processing) came out as a
    server_error, as any 5xx: a route falling back on `timeout` but not `server_error` stopped
    on it."""
    message = "Request timed out"
    err = await failure(make(Server(504, error("timeout_error", message))))
    assert (err.kind, err.status_code) == ("timeout", 504)
    assert err.message == "anthropic 504: Request timed out"


@pytest.mark.parametrize(
    ("status", "type_"), [(401, "authentication_error"), (403, "permission_error")]
)
async def test_authentication_and_permission_errors_map_to_auth(make, status, type_):
    err = await failure(make(Server(status, error(type_, "invalid x-api-key"))))
    assert (err.kind, err.status_code) == ("auth", status)


async def test_a_prompt_that_is_too_long_maps_to_context_length(make):
    body = error("invalid_request_error", "prompt is too long: 208310 tokens > 200000 maximum")
    err = await failure(make(Server(400, body)))
    assert (err.kind, err.status_code) == ("context_length", 400)


async def test_input_plus_max_tokens_over_the_context_limit_maps_to_context_length(make):
    message = "input length and `max_tokens` exceed context limit: 197779 + 20000 > 200000, decrease input length"
    err = await failure(make(Server(400, error("invalid_request_error", message))))
    assert (err.kind, err.status_code) == ("context_length", 400)


async def test_request_too_large_maps_to_context_length(make):
    body = error("request_too_large", "Request exceeds the maximum allowed number of bytes.")
    err = await failure(make(Server(413, body)))
    assert (err.kind, err.status_code) == ("context_length", 413)
    # A proxy's page, or a body of another type: the status says it all the same.
    for other in ("<html>413 Request Entity Too Large</html>", error("api_error", "too big")):
        err = await failure(make(Server(413, other)))
        assert (err.kind, err.status_code) == ("context_length", 413)


async def test_other_invalid_requests_map_to_bad_request(make):
    body = error("invalid_request_error", "temperature: range: 0..1")
    err = await failure(make(Server(400, body)))
    assert (err.kind, err.status_code) == ("bad_request", 400)


async def test_not_found_maps_to_bad_request(make):
    body = error("not_found_error", "model: claude-nonexistent")
    err = await failure(make(Server(404, body)))
    assert (err.kind, err.status_code) == ("bad_request", 404)


async def test_an_api_error_is_a_server_error_after_exactly_one_call(make):
    server = Server(500, error("api_error", "Internal server error"))
    err = await failure(make(server))
    assert (err.kind, err.status_code) == ("server_error", 500)
    assert len(server.requests) == 1


async def test_a_read_timeout_maps_to_timeout(make):
    err = await failure(make(Server(raises=httpx.ReadTimeout)))
    assert err.kind == "timeout"


async def test_a_connect_error_maps_to_connection(make):
    err = await failure(make(Server(raises=httpx.ConnectError)))
    assert err.kind == "connection"


async def test_the_api_key_never_appears_in_an_error_message(make):
    err = await failure(
        make(Server(401, error("authentication_error", f"invalid x-api-key: {KEY}")))
    )
    assert KEY not in err.message
    assert "***" in err.message


# ---- settings and keys ----------------------------------------------------------------


def test_a_missing_api_key_env_var_raises_naming_the_variable():
    with pytest.raises(ValueError, match="ANTHROPIC_API_KEY"):
        AnthropicProvider(settings(), environ={})


def test_settings_require_a_model():
    with pytest.raises(msgspec.ValidationError, match="model"):
        msgspec.convert({"kind": "anthropic"}, AnthropicSettings)


def test_settings_reject_a_default_max_tokens_below_one():
    with pytest.raises(msgspec.ValidationError, match="default_max_tokens"):
        settings(default_max_tokens=0)
