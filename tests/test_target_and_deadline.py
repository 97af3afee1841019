"""One Target with two identities, and one Deadline from arrival to the worker."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from helpers import USER_HELLO, ask, config, fake
from opentelemetry.trace import SpanKind

from schemas import deadline as deadline_module
from schemas.deadline import Deadline
from service.health import OPEN
from service.target import HealthKey, Target


@pytest.fixture
def clocks(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The two clocks a Deadline reads (monotonic, and the wall clock for the header),
    standing still: each conversion is exact, however long the machine stalls between two
    readings."""
    clocks = SimpleNamespace(monotonic=lambda: 5000.0, time=lambda: 1_700_000_000.25)
    monkeypatch.setattr(deadline_module, "time", clocks)
    return clocks


def test_a_deadline_counts_from_arrival_and_takes_the_sooner_of_two(clocks):
    arrived = clocks.monotonic() - 2.0  # the request waited 2 s for a slot
    deadline = Deadline.after(5.0, start=arrived)
    assert deadline.left_s() == 3.0
    client_own = Deadline.at_unix_ms(clocks.time() * 1000 + 1000)
    assert client_own.left_s() == pytest.approx(1.0)
    assert deadline.sooner(client_own) is client_own and client_own.sooner(deadline) is client_own
    assert Deadline.after(-0.001).passed() and not deadline.passed()


def test_the_header_carries_a_deadline_across_processes_as_unix_ms(clocks):
    deadline = Deadline.after(1.5)
    value = deadline.header()
    assert value == str(int((clocks.time() + 1.5) * 1000)) == "1700000001750"
    back = Deadline.from_header(value)  # to the millisecond: the header's unit
    assert back is not None and back.left_s() == pytest.approx(deadline.left_s(), abs=0.001)
    # What a worker reads (no Deadline made), and the header made without one either.
    left_s = Deadline.left_in_header(value)
    assert left_s == pytest.approx(deadline.left_s(), abs=0.001)
    assert Deadline.header_after(1.5) == value


def test_a_malformed_header_is_no_deadline_at_all():
    for value in [None, "", "soon", "12.5", "9" * 400, "1e9"]:
        assert Deadline.from_header(value) is None, value
        assert Deadline.left_in_header(value) is None, value


def test_a_targets_health_key_is_its_provider_and_model_unless_set():
    plain = Target(name="fast", provider="a", kind="fake", model="m", timeout_s=1)
    assert plain.health_key == HealthKey("a", "m") and str(plain.health_key) == "a:m"
    key = HealthKey("a", "*")
    adhoc = Target(
        name="x", provider="a", kind="fake", model="made-up", timeout_s=1, health_key=key
    )
    assert adhoc.health_key == ("a", "*")


async def test_two_named_targets_on_one_model_share_one_breaker_but_keep_their_names(
    lifeline, client, exporter
):
    stack = await lifeline(
        {
            **config({"a": fake(model="m", fail_status=503), "b": fake(model="n")}),
            "targets": {
                "fast": {"provider": "a", "temperature": 0.0},
                "careful": {"provider": "a", "temperature": 1.0},
            },
            "routes": {"default": {"targets": ["fast", "careful", "b"]}},
            "breaker": {"consecutive_failures": 2, "cooldown_s": 60},
        }
    )
    first = await ask(client, USER_HELLO)
    assert [a.target for a in first.attempts] == ["fast", "careful", "b"]
    assert first.target == "b"
    # Both failures counted for the one model behind both names: its breaker is open.
    health = stack.dispatcher.health
    assert set(health.targets) == {("a", "m"), ("b", "n")}
    assert health.of("a", "m").state == OPEN
    second = await ask(client, USER_HELLO)
    skipped = [a for a in second.attempts if a.outcome == "skipped"]
    assert [(a.target, a.reason) for a in skipped] == [
        ("fast", "circuit_open"),
        ("careful", "circuit_open"),
    ]
    assert "(a:m)" in (skipped[0].message or "")
    attempt_spans = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    by_name = {
        (s.attributes["lifeline.target"], s.attributes["lifeline.health_key"])
        for s in attempt_spans
        if "lifeline.target" in s.attributes
    }
    assert by_name == {("fast", "a:m"), ("careful", "a:m"), ("b", "b:n")}
