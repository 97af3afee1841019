"""What every provider kind implements, and the error mapping they share.

    ProviderError            a provider call failed; `kind` is one of schemas.ERROR_KINDS
    classify_status(code)    HTTP status -> error kind (429 rate_limit, 5xx server_error, ...)
    post_json(...)           one HTTP attempt, transport errors mapped to ProviderError
    error_message(...)       a provider's error text, short, one line, never the API key

Workers make exactly one HTTP attempt per request: retries, fallback and deadlines
belong to the dispatcher, so nothing here retries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Protocol

import httpx
import msgspec
from msgspec import Meta
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from schemas import ProviderOk, ProviderRequest
from schemas.wire import classify_status as classify_status  # re-exported for the provider modules


class ProviderError(Exception):
    """A provider call failed in a way the dispatcher may fall back on."""

    def __init__(
        self,
        kind: str,
        message: str,
        status_code: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status_code = status_code
        self.retry_after_s = retry_after_s


class Provider(Protocol):
    """One provider kind. `complete` makes one call and returns or raises ProviderError."""

    model: str

    async def complete(self, request: ProviderRequest, timeout_s: float) -> ProviderOk: ...

    async def aclose(self) -> None: ...


class ProviderSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Keys every [providers.<name>] table accepts; each kind adds its own."""

    kind: str
    model: str = ""
    timeout_s: Annotated[float, Meta(gt=0)] = 30.0  # per attempt; a request's timeout_s can only shorten it


_propagator = TraceContextTextMapPropagator()
_MESSAGE_LIMIT = 300


def retry_after_s(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds (delta form only; dates are ignored)."""
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def error_body(response: httpx.Response) -> dict[str, Any]:
    """The provider's JSON error object, or {} when the body is not JSON."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def http_client(base_url: str, headers: dict[str, str], timeout_s: float) -> httpx.AsyncClient:
    """The one pooled client a worker keeps for its provider. httpx never retries on its own."""
    return httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
    )


async def post_json(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    timeout_s: float,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """One POST; transport failures become ProviderError(timeout | connection).

    The current trace context goes out as `traceparent`, so the provider call is part of
    the request's trace.
    """
    headers = dict(headers or {})
    _propagator.inject(headers)
    try:
        return await client.post(url, json=body, timeout=timeout_s, headers=headers)
    except httpx.TimeoutException as exc:
        raise ProviderError("timeout", f"no answer within {timeout_s:.3g} s ({type(exc).__name__})") from exc
    except httpx.TransportError as exc:
        raise ProviderError("connection", f"{type(exc).__name__}: {exc}") from exc


class HttpProvider:
    """A provider behind one HTTP endpoint: a pooled client, one POST per call, no retries.

    A kind supplies its URL and auth headers, and `body`, `parse` and `error` for its
    documented request, response and error shapes.
    """

    label = "provider"  # names the provider in error messages

    def __init__(self, settings: ProviderSettings, url: str, key: str, headers: dict[str, str],
                 client: httpx.AsyncClient | None, base_url: str) -> None:  # fmt: skip
        self.settings = settings
        self.model = settings.model
        self._url = url
        self._key = key
        # Auth goes with each request (not on the client), so an injected client sends it too.
        self._headers = headers
        self._client = client or http_client(base_url, {}, settings.timeout_s)

    async def complete(self, request: ProviderRequest, timeout_s: float) -> ProviderOk:
        model = request.model or self.model
        response = await post_json(self._client, self._url, self.body(request, model), timeout_s, self._headers)
        if response.status_code != 200:
            raise self.error(response)
        return self.parse(response, model)

    async def aclose(self) -> None:
        await self._client.aclose()

    def body(self, request: ProviderRequest, model: str) -> dict[str, Any]:
        raise NotImplementedError

    def parse(self, response: httpx.Response, model: str) -> ProviderOk:
        raise NotImplementedError

    def error(self, response: httpx.Response) -> ProviderError:
        raise NotImplementedError


def require_api_key(environ: Mapping[str, str], name: str) -> str:
    key = environ.get(name, "")
    if not key:
        raise ValueError(f"provider needs an API key: set the environment variable {name}")
    return key


def error_message(label: str, status: int, text: str, secret: str) -> str:
    """'<label> <status>: <text>', one line, short, and never carrying the API key."""
    if secret:
        text = text.replace(secret, "***")
    return f"{label} {status}: {' '.join(text.split())}"[:_MESSAGE_LIMIT]


def unexpected_body(response: httpx.Response, detail: str) -> ProviderError:
    message = f"provider returned an unexpected response body: {detail}"[:_MESSAGE_LIMIT]
    return ProviderError("server_error", message, response.status_code)
