"""Fault injection: which faults a request may carry, and the failure each one simulates."""

from __future__ import annotations

import pytest
from helpers import config, fake

from schemas import ChatMessage, CompletionRequest, ProviderFailure
from service.client import stream
from service.faults import check_faults, simulate


def test_kinds_statuses_ok_none_and_lists_are_accepted_as_tuples():
    faults = {"a": "timeout", "b": 429, "c": ["rate_limit", None, "ok", 503], "d": "invalid_output"}
    assert check_faults(faults) == {
        "a": ("timeout",),
        "b": (429,),
        "c": ("rate_limit", None, "ok", 503),
        "d": ("invalid_output",),
    }


def test_a_midstream_fault_names_a_kind_or_status_and_a_chunk_count():
    faults = {"a": "503 after 2", "b": ["server_error after 1", "ok"]}
    assert check_faults(faults) == {"a": ("503 after 2",), "b": ("server_error after 1", "ok")}


@pytest.mark.parametrize(
    "bad", [200, True, "explode", ["ok", 600], "timeout after 2", "ok after 1", "503 after x"]
)
def test_a_value_that_is_not_a_fault_is_refused_naming_the_key(bad):
    with pytest.raises(ValueError) as exc:
        check_faults({"primary": bad})
    assert str(exc.value).startswith("faults.primary: ")
    assert "rate_limit" in str(exc.value)  # lists what would do


@pytest.mark.parametrize(
    ("status", "kind"),
    [(429, "rate_limit"), (503, "server_error"), (401, "auth"), (400, "bad_request")],
)
async def test_an_http_status_fails_as_the_provider_would(status, kind):
    failure = await simulate(status, "primary", 5.0)
    assert isinstance(failure, ProviderFailure)
    assert (failure.kind, failure.status_code) == (kind, status)
    assert "primary" in failure.message


@pytest.mark.parametrize("kind", ["rate_limit", "context_length", "invalid_output"])
async def test_an_error_kind_fails_with_that_kind(kind):
    failure = await simulate(kind, "primary", 5.0)
    assert isinstance(failure, ProviderFailure)
    assert failure.kind == kind


async def test_timeout_waits_out_the_timeout_then_fails_as_a_timeout():
    failure = await simulate("timeout", "primary", 0.01)
    assert isinstance(failure, ProviderFailure)
    assert failure.kind == "timeout"


@pytest.mark.parametrize("fault", ["ok", None])
async def test_ok_and_none_let_the_real_call_through(fault):
    assert await simulate(fault, "primary", 5.0) is None


async def test_a_hedge_beside_a_simulated_timeout_streams_as_attempt_2(lifeline, client):
    """On llm.stream the simulated timeout is attempt 1 from its start, as a real call is: the
    hedge that starts while it waits is attempt 2, in its events as in `attempts`."""
    providers = {"slow": fake(), "fast": fake(reply="fast answer", chunks=3)}
    routes = {"default": {"targets": ["slow", "fast"], "hedge_after_ms": 50}}
    await lifeline(config(providers, routes, allow_fault_injection=True))
    request = CompletionRequest(
        messages=[ChatMessage("user", "hi")], timeout_s=5, faults={"slow": "timeout"}
    )
    events = [event async for event in stream(client, request)]
    assert [(a.target, a.outcome, a.reason, a.hedge) for a in events[-1].reply.attempts] == [
        ("slow", "cancelled", "hedge_lost", False),
        ("fast", "ok", None, True),
    ]
    assert [(e.kind, e.attempt) for e in events] == [("delta", 2)] * 3 + [("end", 2)]
