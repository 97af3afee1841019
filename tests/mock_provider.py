"""Shared by the provider wire-format tests: a scripted httpx MockTransport handler and a
fixture factory that builds providers talking to it and closes them afterwards."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from schemas import ProviderRequest
from workers.base import Provider, ProviderError


class MockServer:
    """A MockTransport handler: records every request and gives each the same answer.

    `body` is sent as JSON, as plain text when it is a str, as is when it is bytes (default:
    the subclass's `default_body`, the provider's documented success body); `raises` is an
    httpx transport error to raise instead of answering. The body is an unread stream, as a
    real transport's is, so the workers' streaming read runs as it does against a server.
    """

    default_body: Any = {}

    def __init__(
        self,
        status: int = 200,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raises: type[httpx.TransportError] | None = None,
    ) -> None:
        self.status, self.headers, self.raises = status, headers or {}, raises
        self.body = self.default_body if body is None else body
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.raises is not None:
            raise self.raises("simulated", request=request)
        if isinstance(self.body, bytes):
            content, content_type = self.body, "application/octet-stream"
        elif isinstance(self.body, str):
            content, content_type = self.body.encode(), "text/plain; charset=utf-8"
        else:
            content, content_type = json.dumps(self.body).encode(), "application/json"
        headers = {
            "content-type": content_type,
            "content-length": str(len(content)),
            **self.headers,
        }
        return httpx.Response(self.status, headers=headers, stream=httpx.ByteStream(content))

    @property
    def request(self) -> httpx.Request:
        assert len(self.requests) == 1
        return self.requests[0]

    def sent_json(self) -> dict[str, Any]:
        return json.loads(self.request.content)


def provider_fixture(build: Callable[..., Any]) -> Any:
    """A `make` fixture: make(server, **kw) -> build(client_for(server), **kw); all closed after the test."""

    @pytest.fixture
    async def make():
        providers: list[Provider] = []

        def _make(server: MockServer, **kw: Any) -> Any:
            provider = build(httpx.AsyncClient(transport=httpx.MockTransport(server)), **kw)
            providers.append(provider)
            return provider

        yield _make
        for provider in providers:
            await provider.aclose()

    return make


async def expect_failure(provider: Provider, request: ProviderRequest) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await provider.complete(request, timeout_s=5)
    return caught.value
