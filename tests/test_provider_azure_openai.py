"""The azure_openai provider against Azure OpenAI's documented chat completions bodies."""

from __future__ import annotations

import json
from typing import Any

import httpx
import msgspec
import pytest
from helpers import MockServer, expect_failure, provider_fixture

from schemas import ChatMessage, ProviderOk, ProviderRequest, Usage
from workers.azure_openai import AzureOpenAIProvider, AzureOpenAISettings
from workers.base import ProviderError

KEY = "0123456789abcdef0123456789abcdef"
ENV = {"AZURE_OPENAI_API_KEY": KEY}
QUESTION = "Do other Azure AI services support this too?"
URL = "https://myres.openai.azure.com/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"

_SAFE = {"filtered": False, "severity": "safe"}
# https://learn.microsoft.com/azure/ai-services/openai/reference#chat-completions (response example)
COMPLETION = {
    "id": "chatcmpl-7R1nGnsXO8n4oi9UPz2f3UHdgAYMn",
    "object": "chat.completion",
    "created": 1686676106,
    "model": "gpt-4o-2024-08-06",
    "system_fingerprint": "fp_b705f0c291",
    "prompt_filter_results": [
        {
            "prompt_index": 0,
            "content_filter_results": {
                k: _SAFE for k in ("hate", "self_harm", "sexual", "violence")
            },
        }
    ],
    "choices": [
        {
            "index": 0,
            "finish_reason": "stop",
            "logprobs": None,
            "message": {
                "role": "assistant",
                "content": "Yes, customer managed keys are supported.",
            },
            "content_filter_results": {
                k: _SAFE for k in ("hate", "self_harm", "sexual", "violence")
            },
        }
    ],
    "usage": {"completion_tokens": 557, "prompt_tokens": 33, "total_tokens": 590},
}

# https://learn.microsoft.com/azure/ai-services/openai/concepts/content-filter (prompt filtered)
PROMPT_FILTERED = {
    "error": {
        "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management "
        "policy. Please modify your prompt and retry. To learn more about our content filtering policies please "
        "read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766",
        "type": None,
        "param": "prompt",
        "code": "content_filter",
        "status": 400,
        "innererror": {
            "code": "ResponsibleAIPolicyViolation",
            "content_filter_result": {
                "hate": {"filtered": True, "severity": "high"},
                "self_harm": _SAFE,
                "sexual": _SAFE,
                "violence": _SAFE,
            },
        },
    }
}


def error(code: str, message: str) -> dict[str, Any]:
    """Azure's error body as its gateway sends it for 401/404/429."""
    return {"error": {"code": code, "message": message}}


class Server(MockServer):
    default_body = COMPLETION


def settings(**overrides: Any) -> AzureOpenAISettings:
    table = {
        "kind": "azure_openai",
        "endpoint": "https://myres.openai.azure.com",
        "deployment": "gpt4o-prod",
    }
    return msgspec.convert({**table, **overrides}, AzureOpenAISettings)


make = provider_fixture(
    lambda client, **overrides: AzureOpenAIProvider(settings(**overrides), client, environ=ENV)
)


def request(**fields: Any) -> ProviderRequest:
    return ProviderRequest(id="r1", messages=[ChatMessage("user", QUESTION)], **fields)


async def failure(provider: AzureOpenAIProvider) -> ProviderError:
    return await expect_failure(provider, request())


# ---- the request ----------------------------------------------------------------------


async def test_posts_to_the_deployment_url_with_the_api_version(make):
    server = Server()
    await make(server).complete(request(), timeout_s=5)
    assert server.request.method == "POST"
    assert str(server.request.url) == URL


async def test_a_trailing_slash_on_the_endpoint_is_ignored(make):
    server = Server()
    await make(server, endpoint="https://myres.openai.azure.com/").complete(request(), timeout_s=5)
    assert str(server.request.url) == URL


async def test_sends_the_key_in_the_api_key_header_and_no_bearer_token(make):
    server = Server()
    await make(server).complete(request(), timeout_s=5)
    assert server.request.headers["api-key"] == KEY
    assert "authorization" not in server.request.headers


async def test_sends_the_chat_completions_body(make):
    server = Server()
    await make(server).complete(request(max_tokens=800, temperature=0.7), timeout_s=5)
    assert server.sent_json() == {
        "model": "gpt4o-prod",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_completion_tokens": 800,  # what the default api_version's o-series require
        "temperature": 0.7,
    }


def test_model_defaults_to_the_deployment_name():
    assert settings().model == "gpt4o-prod"


def test_a_configured_model_is_kept():
    assert settings(model="gpt-4o").model == "gpt-4o"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("deployment", "../../steal"),
        ("deployment", "dep#frag"),
        ("deployment", "x?api-version=evil&"),
        ("deployment", ".hidden"),
        ("api_version", "2024-10-21&foo=bar"),
    ],
)
def test_settings_refuse_a_name_that_would_change_the_url(field, value):
    """Both go into the URL as they are: "../../steal" posted to /steal/chat/completions."""
    with pytest.raises(msgspec.ValidationError, match=f"{field} must be letters"):
        settings(**{field: value})


def test_settings_reject_an_endpoint_that_is_not_a_url():
    with pytest.raises(msgspec.ValidationError, match="endpoint"):
        settings(endpoint="myres")


# ---- the answer -----------------------------------------------------------------------


async def test_parses_content_model_and_usage_from_the_completion(make):
    ok = await make(Server()).complete(request(), timeout_s=5)
    assert ok == ProviderOk(
        content="Yes, customer managed keys are supported.",
        model="gpt-4o-2024-08-06",
        usage=Usage(input_tokens=33, output_tokens=557),
        finish_reason="stop",
    )


async def test_a_filtered_answer_maps_to_content_filter(make):
    body = json.loads(json.dumps(COMPLETION))
    body["choices"][0]["finish_reason"] = "content_filter"
    body["choices"][0]["content_filter_results"]["violence"] = {
        "filtered": True,
        "severity": "medium",
    }
    err = await failure(make(Server(body=body)))
    assert (err.kind, err.status_code) == ("content_filter", 200)


async def test_a_200_without_choices_is_a_server_error(make):
    err = await failure(
        make(Server(body={"id": "chatcmpl-1", "object": "chat.completion", "choices": []}))
    )
    assert err.kind == "server_error"
    assert err.message.startswith("provider returned an unexpected response body")


# ---- errors ---------------------------------------------------------------------------


async def test_a_filtered_prompt_maps_to_content_filter(make):
    err = await failure(make(Server(400, PROMPT_FILTERED)))
    assert (err.kind, err.status_code) == ("content_filter", 400)
    assert err.message.startswith("azure_openai 400: The response was filtered")


async def test_rate_limit_maps_to_rate_limit_with_retry_after(make):
    message = (
        "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have "
        "exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 6 seconds."
    )
    err = await failure(make(Server(429, error("429", message), headers={"retry-after": "6"})))
    assert (err.kind, err.status_code, err.retry_after_s) == ("rate_limit", 429, 6.0)
    # Azure's documented retry-after-ms, read first as its SDK does (it was ignored); one that
    # is no number of milliseconds leaves Retry-After to say.
    for ms, seconds in (("5640", 5.64), ("-1", 6.0), ("soon", 6.0)):
        headers = {"retry-after-ms": ms, "retry-after": "6"}
        err = await failure(make(Server(429, error("429", message), headers=headers)))
        assert (err.kind, err.retry_after_s) == ("rate_limit", seconds)


async def test_a_wrong_key_maps_to_auth(make):
    message = (
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key "
        "for an active subscription and use a correct regional API endpoint for your resource."
    )
    err = await failure(make(Server(401, error("401", message))))
    assert (err.kind, err.status_code) == ("auth", 401)


async def test_a_missing_deployment_maps_to_bad_request(make):
    message = "The API deployment for this resource does not exist."
    err = await failure(make(Server(404, error("DeploymentNotFound", message))))
    assert (err.kind, err.status_code) == ("bad_request", 404)


async def test_context_length_exceeded_maps_to_context_length(make):
    body = {
        "error": {
            "message": "This model's maximum context length is 128000 tokens. However, your messages resulted "
            "in 131072 tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    err = await failure(make(Server(400, body)))
    assert (err.kind, err.status_code) == ("context_length", 400)


async def test_a_500_is_a_server_error_after_exactly_one_call(make):
    server = Server(
        500, error("InternalServerError", "The server had an error while processing your request.")
    )
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
    err = await failure(make(Server(401, error("401", f"Access denied for key {KEY}."))))
    assert KEY not in err.message
    assert "***" in err.message


# ---- keys -----------------------------------------------------------------------------


def test_a_missing_api_key_env_var_raises_naming_the_variable():
    with pytest.raises(ValueError, match="AZURE_OPENAI_API_KEY"):
        AzureOpenAIProvider(settings(), environ={"AZURE_OPENAI_API_KEY": ""})
