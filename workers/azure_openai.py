"""The `azure_openai` provider: Azure OpenAI chat completions on one deployment.

    POST {endpoint}/openai/deployments/{deployment}/chat/completions?api-version={api_version}
    api-key: <key>
    Request, 200 and error bodies have the OpenAI Chat Completions shape (see workers.openai),
    so this module reuses its body builder and parsing: image parts, tools, tool calls and
    their streamed deltas, finish_reason and the usage details included. Azure's content
    filter answers a prompt with 400 {"error": {"code": "content_filter", "innererror":
    {"code": "ResponsibleAIPolicyViolation", ...}}} and an answer with finish_reason
    "content_filter".
    Streamed, the chunks are OpenAI's too, with chunks of empty choices carrying Azure's
    prompt_filter_results (and model "") first. The stream_options it sends need a recent
    api_version (the default has them; older ones answer 400 unknown_parameter).

The deployment picks the model; the `model` sent in the body is informational to Azure. So
a provider serves one model: service.config refuses its `models` and a target or request
naming a model other than its own (one provider per deployment instead).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import httpx

from workers.base import HttpProvider, require_api_key
from workers.openai import MOST_STOPS, OpenAIProvider

# The kind's keys live with the others' (no HTTP code loaded to check a config); imported from
# here as before.
from workers.settings import AzureOpenAISettings


class AzureOpenAIProvider(OpenAIProvider):
    """OpenAI's body, response and error shapes; Azure's URL and `api-key` header."""

    label = "azure_openai"

    def __init__(
        self,
        settings: AzureOpenAISettings,
        client: httpx.AsyncClient | None = None,
        environ: Mapping[str, str] = os.environ,
        name: str = "",
    ) -> None:
        key = require_api_key(environ, settings.api_key_env)
        self.max_tokens_as = settings.max_tokens_field
        self.most_stops = MOST_STOPS
        endpoint = settings.endpoint.rstrip("/")
        url = (
            f"{endpoint}/openai/deployments/{settings.deployment}/chat/completions"
            f"?api-version={settings.api_version}"
        )
        HttpProvider.__init__(
            self,
            settings,
            url=url,
            secrets=(key,),
            headers={"api-key": key},
            client=client,
            base_url=endpoint,
            name=name,
        )
