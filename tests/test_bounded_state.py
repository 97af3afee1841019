"""What a request can name cannot grow the dispatcher: health entries, figures and the shared stats
document stay bounded whatever models and target names requests make up.

Pure units first (router, health and run_chain, no NATS), then the shared bucket on a real
nats-server. Nothing here asserts on durations.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import nats
import pytest
from helpers import USER_HELLO, ask, fake, wait_for

from schemas import ProviderFailure, ProviderOk
from schemas.wire import INVALID_REQUEST, encoder
from service.app import start_stack
from service.config import parse_config
from service.embedded import EmbeddedNats
from service.health import ADHOC_MODEL, CLOSED, MAX_ADOPTED, OPEN, BreakerSettings, Health
from service.policy import run_chain
from service.routing import Rejected, Router
from service.shared_health import (
    STATS_MAX_BYTES,
    STATS_PREFIX,
    BucketStore,
    breaker_key,
    merge_status,
    stats_document,
)

NAMES = 5000  # made-up model names per test: enough to show growth, cheap enough to stay fast

CONFIG: dict[str, Any] = {
    "providers": {"open": fake(model="m0"), "listed": fake(model="m1", models=["m2", "m3"])},
    "breaker": {"consecutive_failures": 2},
    "routes": {
        "default": {"targets": ["open", {"provider": "open", "model": "m-route"}, "listed"]}
    },
}


def plan(router: Router, *targets: dict[str, Any]):  # type: ignore[no-untyped-def]
    return router.plan(encoder.encode({**USER_HELLO, "targets": list(targets)}))


async def answer(target, timeout_s, previous):  # type: ignore[no-untyped-def]
    return ProviderOk(content="hi", model=target.model)


async def unavailable(target, timeout_s, previous):  # type: ignore[no-untyped-def]
    return ProviderFailure("server_error", "boom", 503)


async def unknown_model(target, timeout_s, previous):  # type: ignore[no-untyped-def]
    return ProviderFailure("bad_request", "model not found", 404)


# ---- health entries ------------------------------------------------------------------------


async def test_thousands_of_made_up_models_and_labels_share_one_health_entry_per_provider():
    router, health = Router(parse_config(CONFIG)), Health()
    for i in range(NAMES):
        p = plan(router, {"provider": "open", "model": f"made-up-{i}", "name": f"label-{i}"})
        result = await run_chain(p.chain, answer, p.limits, health=health)
        assert (
            result.attempts[0].model == f"made-up-{i}"
        )  # replies and audit still name the real model
    assert set(health.targets) == {("open", ADHOC_MODEL)}
    assert health.snapshot()["open:*"]["ok"] == NAMES
    for model in ["m0", "m-route"]:  # models the config names keep entries of their own
        p = plan(router, {"provider": "open", "model": model})
        await run_chain(p.chain, answer, p.limits, health=health)
    assert set(health.targets) == {("open", ADHOC_MODEL), ("open", "m0"), ("open", "m-route")}


async def test_made_up_models_share_a_breaker_that_leaves_the_configured_ones_alone():
    router, health = Router(parse_config(CONFIG)), Health()
    for i in range(
        NAMES
    ):  # a name the provider does not know is the request's fault: it never counts
        p = plan(router, {"provider": "open", "model": f"typo-{i}"})
        await run_chain(p.chain, unknown_model, p.limits, health=health)
    assert health.of("open", ADHOC_MODEL).state == CLOSED
    for i in range(2):  # the provider fails for made-up names: their shared breaker opens
        p = plan(router, {"provider": "open", "model": f"down-{i}"}, "listed")
        await run_chain(p.chain, unavailable, p.limits, health=health)
    p = plan(router, {"provider": "open", "model": "another"}, "listed")
    result = await run_chain(p.chain, answer, p.limits, health=health)
    assert [(a.model, a.outcome, a.reason) for a in result.attempts] == [
        ("another", "skipped", "circuit_open"),
        ("m1", "ok", None),
    ]
    p = plan(router, {"provider": "open", "model": "m-route"}, "listed")
    result = await run_chain(p.chain, answer, p.limits, health=health)
    assert [(a.model, a.outcome) for a in result.attempts] == [("m-route", "ok")]
    assert len(health.targets) == 3  # open:*, open:m-route and listed:m1, after 5,003 requests


def test_a_model_outside_a_providers_allowlist_is_refused_naming_the_allowed_ones_and_the_key():
    router = Router(parse_config(CONFIG))
    for i in range(NAMES):
        with pytest.raises(Rejected) as refused:
            plan(router, "open", {"provider": "listed", "model": f"made-up-{i}"})
    assert refused.value.error.type == INVALID_REQUEST
    assert refused.value.error.message == (
        f"targets[1].model: model 'made-up-{NAMES - 1}' is not one provider listed allows "
        "(m1, m2, m3); to allow it, add it to providers.listed.models in the config"
    )
    for model in ["m1", "m2", "m3"]:  # each allowed model keeps its own breaker
        [target] = plan(router, {"provider": "listed", "model": model}).chain.targets
        assert target.health_key.model == model


def test_breaker_states_other_dispatchers_write_cannot_grow_health_either():
    health = Health()
    for i in range(NAMES):  # closed is what a target never seen here is already: nothing to keep
        health.apply("p", f"closed-{i}", CLOSED, 0, "closed elsewhere", 0)
    assert health.targets == {}
    health.record("p", "seen", BreakerSettings(), True)
    for i in range(MAX_ADOPTED + 100):
        health.apply("p", f"open-{i}", OPEN, 2_000_000_000_000, "opened elsewhere", 0)
    assert len(health.targets) == MAX_ADOPTED
    health.apply("p", "seen", OPEN, 2_000_000_000_000, "opened elsewhere", 0)
    assert (
        health.of("p", "seen").state == OPEN
    )  # a target this dispatcher uses still follows the others


# ---- the shared stats document ---------------------------------------------------------------


def snapshot_of(targets: int) -> dict[str, dict[str, Any]]:
    """A snapshot as Health.snapshot() makes it, for `targets` targets, each with a busy
    histogram."""
    health = Health()
    health.record("p", "m", None, True, latency_ms=1.0)
    figures = health.snapshot()["p:m"]
    figures["latency"] = {str(bucket): 1000 + bucket for bucket in range(60)}
    return {
        f"p:model-{i}": {**figures, "model": f"model-{i}", "ok": i % 97} for i in range(targets)
    }


@pytest.mark.parametrize("limit_bytes", [STATS_MAX_BYTES, 2048])
def test_the_stats_document_stays_within_its_limit_however_many_targets_there_are(limit_bytes):
    snapshot = snapshot_of(20_000)
    snapshot["p:model-7"]["state"] = OPEN
    document = stats_document("d1", "host", 1_000, snapshot, limit_bytes)
    assert len(document) <= limit_bytes
    parsed = json.loads(document)
    assert 0 < len(parsed["targets"]) and parsed["omitted"] == 20_000 - len(parsed["targets"])
    assert next(iter(parsed["targets"])) == "p:model-7"  # a breaker that is not closed goes first
    assert {figures["ok"] for figures in list(parsed["targets"].values())[1:]} == {
        96
    }  # then the busiest
    view = merge_status({STATS_PREFIX + "d1": document}, now_unix_ms=1_000)
    assert view["dispatchers"] == [{"id": "d1", "host": "host", "omitted": parsed["omitted"]}]
    assert view["targets"]["p:model-7"]["ok"] == 7


def test_a_dispatcher_gone_quiet_stops_counting_then_stops_reporting():
    """A live dispatcher writes its figures every 30 s at least. A SIGKILLed one's stayed in
    `lifeline status` for 120 s, its calls of the last 60 s frozen as they were."""
    document = stats_document("d1", "host", 1_000, snapshot_of(8), STATS_MAX_BYTES)

    def seen(after_s: float) -> tuple[int, int]:
        view = merge_status(
            {STATS_PREFIX + "d1": document}, now_unix_ms=1_000 + int(after_s * 1000)
        )
        return len(view["dispatchers"]), view["targets"].get("p:model-7", {}).get("ok", 0)

    assert seen(30) == (1, 7)  # an idle dispatcher between two writes
    assert seen(61) == (1, 0)  # every call it counted is over 60 s old
    assert seen(66) == (0, 0)  # two writes missed: gone


def test_lifeline_status_leaves_out_entries_it_cannot_read():
    document = stats_document("d1", "host", 1_000, snapshot_of(3), STATS_MAX_BYTES)
    entries = {
        STATS_PREFIX + "d1": document,
        STATS_PREFIX + "d2": b'{"dispatcher": "d2", "targets": "none"}',
        breaker_key("p", "model-1"): b'{"provider": "p", "model": "model-1", "state": "open", '
        b'"until_unix_ms": 2000, "reason": "down", "since_unix_ms": 900, "by": "d1"}',
        breaker_key("p", "bad"): b'{"provider": "p", "model": ["not", "a", "name"]}',
        breaker_key("p", "odd"): b'{"provider": "p", "model": "odd", "state": "ajar", '
        b'"until_unix_ms": 0}',
    }
    view = merge_status(entries, now_unix_ms=1_000)
    assert [d["id"] for d in view["dispatchers"]] == ["d1"]
    assert sorted(view["targets"]) == ["p:model-0", "p:model-1", "p:model-2"]
    assert (view["targets"]["p:model-1"]["state"], view["targets"]["p:model-1"]["ok"]) == (OPEN, 1)


def test_lifeline_status_says_how_many_targets_a_dispatcher_left_out(capsys):
    from service.cli import _print_status

    document = stats_document("d1", "host", 1_000, snapshot_of(500), 2048)
    _print_status(
        merge_status({STATS_PREFIX + "d1": document}, now_unix_ms=1_000),
        "lifeline_health",
        "nats://x:4222",
    )
    omitted = json.loads(document)["omitted"]
    assert f"host/d1 left out {omitted} quiet target(s)" in capsys.readouterr().out


async def test_shared_health_stays_on_with_thousands_of_names_and_a_small_max_payload(tracers):
    """Before the stats document was bounded, one put over max_payload turned shared health off."""
    config = {"providers": {"open": fake()}, "routes": {"default": {"targets": ["open"]}}}
    with EmbeddedNats(port=-1, conf="max_payload: 16384") as server:
        nc = await nats.connect(server.url)
        kv = await nc.jetstream().create_key_value(bucket="lifeline_health", history=1)
        for i in range(500):  # breakers an older dispatcher left behind for names it was sent
            value = {
                "provider": "open",
                "model": f"old-{i}",
                "state": CLOSED,
                "until_unix_ms": 0,
                "by": "old",
            }
            await kv.put(breaker_key("open", f"old-{i}"), json.dumps(value).encode())
        await kv.put(
            "breaker.open.bad",
            b'{"provider": "open", "model": ["not", "a", "name"], "state": "open"}',
        )
        stack = await start_stack(parse_config(config), server.url, tracers)
        health = stack.dispatcher.health  # type: ignore[union-attr]
        store = health.store
        assert isinstance(store, BucketStore)
        try:
            replies = await asyncio.gather(
                *(
                    ask(
                        nc,
                        {**USER_HELLO, "targets": [{"provider": "open", "model": f"made-up-{i}"}]},
                    )
                    for i in range(1000)
                )
            )
            assert {r.status for r in replies} == {"ok"}
            assert set(health.targets) == {("open", ADHOC_MODEL)}
            assert len(store._revisions) <= 1  # the old keys are not tracked either
            peer = {
                "provider": "open",
                "model": ADHOC_MODEL,
                "state": OPEN,
                "until_unix_ms": 2 * 10**12,
                "by": "peer",
            }
            await kv.put(breaker_key("open", ADHOC_MODEL), json.dumps(peer).encode())
            # The watcher outlived the malformed entry and still follows the peers.
            await wait_for(lambda: health.of("open", ADHOC_MODEL).state == OPEN)
            for i in range(400):  # as many targets as a config naming 400 models would give
                health.record("open", f"configured-{i}", None, True, latency_ms=float(i))
            await store.publish_stats()
            assert health.shared, store.problem
            document = (await kv.get(STATS_PREFIX + store.id)).value
            assert len(document) <= 16384 // 4 and json.loads(document)["omitted"] > 0
        finally:
            await stack.stop()
            await nc.close()


def test_compiled_output_schemas_are_cached_only_while_small():
    from schemas import ChatMessage, CompletionRequest
    from schemas.wire import JsonSchemaFormat, ResponseFormat
    from service import shaping

    def compiled(response_format: ResponseFormat) -> Any:
        request = CompletionRequest([ChatMessage("user", "x")], response_format=response_format)
        return shaping.output_validator(request).checks[0].validator

    shaping._schemas.clear()
    big = {"type": "object", "description": "x" * (64 * 1024)}
    for n in range(20):
        compiled(ResponseFormat("json_schema", JsonSchemaFormat(f"s{n}", {**big, "title": str(n)})))
    assert len(shaping._schemas) == 0  # each 64 KiB schema is compiled for its request and dropped
    small = ResponseFormat("json_schema", JsonSchemaFormat("small", {"type": "object"}))
    assert compiled(small) is compiled(small)


def test_lifeline_status_prints_what_another_dispatcher_wrote_safely(capsys):
    """A stats entry with a latency bucket far past the last (1.15 ** 100001 overflowed) and
    names with escape sequences (which reached the terminal raw)."""
    from service.cli import _print_status

    document = json.dumps(
        {
            "dispatcher": "\x1b]0;pwned\x07",
            "host": "h\x9b2J",
            "ts_unix_ms": 1_000,
            "targets": {
                "p:\x1b[31m": {"provider": "p", "model": "m", "ok": 3, "latency": {"100000": 3}}
            },
        }
    ).encode()
    _print_status(merge_status({STATS_PREFIX + "d1": document}, now_unix_ms=1_000), "b", "url")
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x9b" not in out
    assert "\\x1b]0;pwned\\x07" in out and "p:\\x1b[31m" in out


def test_every_breaker_the_config_names_is_adopted_however_many():
    """A fleet's config naming 1,950 models: a dispatcher started after the others opened
    their breakers adopted the first 1,000 and called the other 950 despite them."""
    from service.dispatcher import Dispatcher
    from service.telemetry import Tracing

    models = [f"m{i}" for i in range(MAX_ADOPTED + 500)]
    config = parse_config({"providers": {"p": {"kind": "fake", "models": models}}})
    nc = SimpleNamespace()  # never used: the dispatcher is not started
    dispatcher = Dispatcher(nc, config, Tracing().recorder("test"))  # type: ignore[arg-type]
    health = dispatcher.health
    for model in models:
        health.apply("p", model, OPEN, 2_000_000_000_000, "opened elsewhere", 0)
    assert all(health.of("p", model).state == OPEN for model in models)
    for i in range(MAX_ADOPTED + 100):  # names the config does not know stay bounded
        health.apply("p", f"made-up-{i}", OPEN, 2_000_000_000_000, "opened elsewhere", 0)
    assert len(health.targets) == len(models)


async def test_a_server_slow_to_confirm_subscriptions_does_not_stop_a_dispatcher(nats_url):
    """A fleet restarting with a large health bucket: the server took over 10 s to answer a
    starting dispatcher's flush, which exited (nats: flush timeout), and a rolling restart
    lost dispatchers. It now serves once its subscriptions are registered."""
    from service.dispatcher import Dispatcher
    from service.telemetry import Tracing

    nc = await nats.connect(nats_url)
    real_flush, slow = nc.flush, [1]

    async def flush(timeout: float = 10) -> None:
        if slow[0]:
            slow[0] -= 1
            raise nats.errors.FlushTimeoutError
        await real_flush(timeout)

    nc.flush = flush  # type: ignore[method-assign]
    config = parse_config({"providers": {"p": fake()}, "audit": {"stream": ""}})
    dispatcher = Dispatcher(nc, config, Tracing().recorder("test"))
    try:
        await dispatcher.start()
        assert slow == [0] and dispatcher._subs  # started, serving
    finally:
        await dispatcher.stop(0)
        await nc.close()
