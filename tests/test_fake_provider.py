"""The `fake` provider: deterministic answers, HTTP-shaped failures, hangs and latency, offline."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest

from schemas import ChatMessage, ProviderRequest
from workers.base import ProviderError
from workers.fake import FakeProvider, FakeSettings


def provider(**settings: Any) -> FakeProvider:
    return FakeProvider(msgspec.convert({**settings, "kind": "fake"}, FakeSettings))


def request(*messages: tuple[str, str], model: str | None = None) -> ProviderRequest:
    chat = [ChatMessage(role=role, content=content) for role, content in messages]  # type: ignore[arg-type]
    return ProviderRequest(id="r1", messages=chat, model=model)


HELLO = request(("user", "hello there"))


async def outcomes(p: FakeProvider, calls: int) -> list[bool]:
    """True for each call that answered, False for each that raised ProviderError."""
    results = []
    for _ in range(calls):
        try:
            await p.complete(HELLO, timeout_s=1)
        except ProviderError:
            results.append(False)
        else:
            results.append(True)
    return results


async def test_echo_answers_with_the_last_user_message():
    conversation = request(
        ("system", "be brief"),
        ("user", "first"),
        ("assistant", "ok"),
        ("user", "second"),
        ("assistant", "sure"),
    )
    answer = await provider(reply="echo").complete(conversation, timeout_s=1)
    assert answer.content == "second"


async def test_echo_is_the_default_reply():
    assert (await provider().complete(HELLO, timeout_s=1)).content == "hello there"


async def test_a_fixed_reply_is_the_answer_whatever_was_asked():
    assert (
        await provider(reply="I am a fake").complete(HELLO, timeout_s=1)
    ).content == "I am a fake"


@pytest.mark.parametrize(
    ("status", "kind"), [(429, "rate_limit"), (503, "server_error"), (401, "auth")]
)
async def test_fail_status_raises_a_provider_error_of_the_matching_kind(status, kind):
    with pytest.raises(ProviderError) as exc:
        await provider(fail_status=status).complete(HELLO, timeout_s=1)
    assert (exc.value.kind, exc.value.status_code) == (kind, status)
    assert str(status) in exc.value.message


async def test_fail_rate_without_a_status_fails_as_a_503():
    with pytest.raises(ProviderError) as exc:
        await provider(fail_rate=1.0).complete(HELLO, timeout_s=1)
    assert (exc.value.kind, exc.value.status_code) == ("server_error", 503)


async def test_fail_rate_fails_with_the_configured_status():
    with pytest.raises(ProviderError) as exc:
        await provider(fail_rate=1.0, fail_status=429).complete(HELLO, timeout_s=1)
    assert (exc.value.kind, exc.value.status_code) == ("rate_limit", 429)


async def test_the_same_seed_gives_the_same_sequence_of_failures():
    first = await outcomes(provider(fail_rate=0.5, seed=7), 50)
    second = await outcomes(provider(fail_rate=0.5, seed=7), 50)
    assert first == second
    assert True in first and False in first


async def test_another_seed_gives_another_sequence_of_failures():
    assert await outcomes(provider(fail_rate=0.5, seed=7), 50) != await outcomes(
        provider(fail_rate=0.5, seed=8), 50
    )


async def test_fail_rate_fails_roughly_that_share_of_calls():
    results = await outcomes(provider(fail_rate=0.25, seed=3), 1000)
    assert 0.19 <= results.count(False) / 1000 <= 0.31


async def test_hang_never_answers():
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(provider(hang=True).complete(HELLO, timeout_s=1), 0.05)


async def test_latency_delays_the_answer():
    started = time.monotonic()
    await provider(latency_ms=50).complete(HELLO, timeout_s=1)
    assert time.monotonic() - started >= 0.045  # a lower bound only: slow machines are fine


async def test_usage_counts_the_words_in_and_out():
    answer = await provider(reply="two words").complete(
        request(("system", "be brief"), ("user", "a b c")), 1
    )
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (5, 2)


async def test_the_answer_carries_the_configured_model():
    assert (await provider(model="fake-gpt").complete(HELLO, timeout_s=1)).model == "fake-gpt"


async def test_the_request_model_overrides_the_configured_one():
    answer = await provider(model="fake-gpt").complete(
        request(("user", "hi"), model="other-model"), 1
    )
    assert answer.model == "other-model"


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"fail_rate": 2}, "fail_rate"),
        ({"fail_rate": -0.1}, "fail_rate"),
        ({"fail_status": 200}, "fail_status"),
        ({"latency_ms": -1}, "latency_ms"),
    ],
)
def test_out_of_range_settings_are_refused_naming_the_field(settings, field):
    with pytest.raises(msgspec.ValidationError, match=field):
        provider(**settings)
