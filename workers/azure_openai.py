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
import re
from collections.abc import Mapping
from typing import Literal

import httpx
import msgspec

from workers.base import HttpProvider, ProviderSettings, require_api_key
from workers.openai import OpenAIProvider

# A deployment's name or an API version: Azure allows no other characters, and a "/", "?",
# "#" or ".." would take the call to another path than the deployment's.
_URL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


class AzureOpenAISettings(ProviderSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    endpoint: str  # https://<resource>.openai.azure.com
    deployment: str
    api_version: str = "2024-10-21"
    api_key_env: str = "AZURE_OPENAI_API_KEY"
    # The default api_version takes max_completion_tokens, which its reasoning deployments
    # (o1, o3, ...) require; max_tokens for an older api_version.
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_completion_tokens"

    def fixed_model(self) -> str | None:
        return f"every call goes to its deployment {self.deployment!r}, which picks the model"

    def __post_init__(self) -> None:
        if not self.endpoint.startswith(("https://", "http://")):
            raise ValueError(
                f"endpoint must be a URL like https://myres.openai.azure.com, got {self.endpoint!r}"
            )
        for name in ("deployment", "api_version", "api_key_env"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        for name in ("deployment", "api_version"):  # they go into the URL as they are
            if not _URL_NAME.fullmatch(getattr(self, name)):
                raise ValueError(
                    f"{name} must be letters, digits, '.', '_' and '-' (not first), as Azure "
                    f"names it, got {getattr(self, name)!r}"
                )
        if not self.model:
            # Frozen struct: the default is filled in the one place msgspec allows it.
            msgspec.structs.force_setattr(self, "model", self.deployment)


class AzureOpenAIProvider(OpenAIProvider):
    """OpenAI's body, response and error shapes; Azure's URL and `api-key` header."""

    label = "azure_openai"

    def __init__(
        self,
        settings: AzureOpenAISettings,
        client: httpx.AsyncClient | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        key = require_api_key(environ, settings.api_key_env)
        self.max_tokens_as = settings.max_tokens_field
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
        )
