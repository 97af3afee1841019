"""The keys every [providers.<name>] table accepts, and each built-in kind's own: the config
checks a table against these (service/config.py, through workers/registry.py) without loading
any provider's HTTP code. No I/O here: a plug-in model's import (workers/plugin.py) loads this
and the wire, nothing more. Each provider module re-exports its kind's settings
(`from workers.openai import OpenAISettings` works as before)."""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from schemas.deadline import MIN_CALL_S
from schemas.wire import FinishReason

# 4 MiB: far above any chat answer's JSON, far below a worker's memory.
DEFAULT_MAX_RESPONSE_BYTES = 4 * 1024 * 1024


class ProviderSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Keys every [providers.<name>] table accepts; each kind adds its own."""

    kind: str
    model: str = ""
    # The other models targets and requests may name for this provider; empty: any model.
    models: list[str] = []
    # At least MIN_CALL_S: a worker gets its deadline in whole milliseconds, so a call given
    # less times out (or is dropped as late) instead of being made. Finite: a year at most.
    timeout_s: Annotated[float, Meta(ge=MIN_CALL_S, le=365 * 86_400.0)] = 30.0
    # The largest answer body read, in bytes after gzip/deflate decoding: a bigger one (a runaway
    # answer, a compression bomb) fails as response_too_large instead of filling the worker's
    # memory.
    max_response_bytes: Annotated[int, Meta(gt=0)] = DEFAULT_MAX_RESPONSE_BYTES
    # Calls one worker replica works on at once; beyond it a call is answered rate_limit at
    # once (its dispatcher retries or falls back) instead of piling up in the worker's memory.
    max_in_flight: Annotated[int, Meta(ge=1)] = 1000
    # And their requests' bytes, added up (a call that comes while none is in flight is always
    # taken): long prompts meet this bound first, as they do the dispatcher's.
    max_in_flight_bytes: Annotated[int, Meta(gt=0)] = 256 * 1024 * 1024

    def fixed_model(self) -> str | None:
        """Why targets and requests cannot pick this provider's model per call (None: they
        can): the config then refuses its `models` and a target naming another model."""
        return None


# How an api_key_env is named in messages: here, so that `lifeline check-config`'s warning
# loads no HTTP code (workers.base, whose require_api_key says it too, imports it from here).
def shown_env_name(name: str) -> str:
    """An environment variable's name fit to print: one that does not look like a name (a key
    pasted where its variable's name belongs, say) is not repeated."""
    if _ENV_NAME.fullmatch(name):
        return f"${name}"
    return "the variable it names (not shown: it does not look like a variable's name; is it the secret itself?)"


_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")  # the convention: what a secret rarely is


# ---- each built-in kind's own keys (its provider: workers/<kind>.py) ---------------------


class OpenAISettings(ProviderSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"  # None or "": send no Authorization header
    base_url: str = "https://api.openai.com/v1"
    organization: str | None = None
    # What the answer's length limit is called in the body: OpenAI's own API takes
    # max_completion_tokens (its reasoning models refuse max_tokens, deprecated there), while
    # many compatible servers know only max_tokens. Unset: the first for api.openai.com.
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError('model must be set, e.g. model = "gpt-4o-mini"')
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        # A proxy's credentials in the URL are sent too (httpx makes them Basic auth), which
        # would overwrite the key sent as Authorization (httpx's _build_request_auth). Here, so
        # that check-config refuses it as the worker does.
        if self.api_key_env and urlsplit(self.base_url).netloc.rpartition("@")[0]:
            raise ValueError(
                "base_url holds user info (user:password@), which httpx sends as an "
                "Authorization: Basic header in place of the API key's: remove it from the URL "
                '(or set api_key_env = "" to send it instead of a key)'
            )


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


class AnthropicSettings(ProviderSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: str
    api_key_env: str = "ANTHROPIC_API_KEY"
    base_url: str = "https://api.anthropic.com"
    anthropic_version: str = "2023-06-01"
    default_max_tokens: int = 1024  # the API requires max_tokens; used when a request sets none

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError('model must be set, e.g. model = "claude-sonnet-4-20250514"')
        if not self.api_key_env:
            raise ValueError("api_key_env must name the environment variable holding the API key")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")


class FakeToolCall(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    arguments: str = "{}"  # JSON, as a provider sends it (malformed on purpose if you like)


class FakeSettings(ProviderSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: str = "fake-1"
    # "echo" repeats the last user message; "request" answers with the ProviderRequest it got,
    # as JSON (shows what a target's shaping sent); anything else is the answer.
    reply: str = "echo"
    latency_ms: Annotated[float, Meta(ge=0, le=365 * 86_400_000.0)] = 0.0  # a year at most
    fail_status: int | None = None  # answer every call with this HTTP-like status
    fail_rate: float = 0.0  # 0..1: share of calls that fail with fail_status (or 503)
    seed: int = 0
    hang: bool = False  # never answer: shows a timeout fallback
    # A last user message "fail <status>" (e.g. "fail 503") fails that call with that HTTP status:
    # real failures on demand, through a real worker, for tests and demos.
    fail_on_request: bool = False
    # Streaming: the answer in this many pieces (fewer when it is shorter), this far apart.
    chunks: Annotated[int, Meta(ge=1)] = 4
    chunk_delay_ms: Annotated[float, Meta(ge=0, le=365 * 86_400_000.0)] = 0.0
    fail_after_chunks: Annotated[int, Meta(ge=0)] | None = None
    stall_after_chunks: Annotated[int, Meta(ge=0)] | None = None
    # Tool calls to answer with (finish_reason "tool_calls"), e.g.
    # [{name = "get_weather", arguments = '{"city": "Paris"}'}]; `reply` is then the text beside
    # them ("" for none). Only when the request offers tools.
    tool_calls: tuple[FakeToolCall, ...] = ()
    finish_reason: FinishReason | None = None  # e.g. "length": an answer cut short

    def __post_init__(self) -> None:
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be between 0 and 1, got {self.fail_rate}")
        if self.latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {self.latency_ms}")
        if self.fail_status is not None and not 400 <= self.fail_status <= 599:
            raise ValueError(
                f"fail_status must be an HTTP error status (400..599), got {self.fail_status}"
            )
