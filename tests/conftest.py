"""Fixtures: a real nats-server per test, a Lifeline stack on it, a client, the audit feed.

No mock broker: every integration test talks to a nats-server started on a free port
with its own JetStream directory, and stopped afterwards. The helpers tests share (ask,
config, wait_for, the Ledger, the fake HTTP servers ...) are in helpers.py, not here.
"""

from __future__ import annotations

import os
import sys

# Bytecode is cached (__pycache__, pytest's rewritten test modules) even where the environment
# says not to (PYTHONDONTWRITEBYTECODE, as some images set): without it each of the four xdist
# workers compiled and rewrote every test module (a collection took 9.8 s of CPU, not 4.5), and
# every `lifeline` process the tests start compiled Lifeline's modules again (0.2 s of CPU for
# `lifeline --help`, not 0.13). Before the imports below; in os.environ for those processes.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from schemas import subjects
from service.app import Stack, start_stack
from service.config import parse_config
from service.embedded import EmbeddedNats
from service.natsio import ensure_subscribed
from service.telemetry import Tracing

# A shell that starts the suite in the background (`make test &`, nohup) ignores SIGINT, and
# the processes the tests start would inherit that: Python then never turns a Ctrl-C into
# KeyboardInterrupt, and the tests of what a Ctrl-C does wait out their timeouts and fail.
# A handler of our own is reset to the default in each child, as exec does.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

pytest.register_assert_rewrite("helpers")  # so that its asserts explain themselves as a test's do
# After the line above, or it would not take.
from helpers import AuditFeed

# The files that take longest, longest first; the others follow in their usual order. xdist
# (--dist loadfile, without its reordering by number of tests: pyproject.toml) gives each of
# its workers a whole file when it is nearly done with its last, in this order: a long
# file handed out near the end would keep one worker busy long after the others had finished.
# From `pytest --durations=0`, summed per file; an outdated list costs only that balance.
# The benchmark's smoke run takes all the CPU it gets: second, so that it runs beside the CLI
# tests (processes started and waited for, without tight timings), not beside the ones that
# time a burst or a stream.
LONGEST_FILES_FIRST = [
    "test_cli.py",
    "test_bench_smoke.py",
    "test_gateway.py",
    "test_contract.py",
    "test_conformance.py",
    "test_jobs.py",
    "test_cli_newcomer.py",
    "test_plugins.py",
    "test_client.py",
    "test_health_routing.py",
    "test_nats_auth.py",
    "test_audit_and_tracing.py",
    "test_streaming.py",
    "test_cli_secrets.py",
    "test_discovery.py",
    "test_jobs_redelivery.py",
    "test_provider_streaming.py",
    "test_least_privilege.py",
    "test_workers_and_scale.py",
    "test_provider_limits.py",
    "test_config_gaps.py",
    "test_abort.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: n for n, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order


@pytest.fixture
def nats_url() -> Iterator[str]:
    server = EmbeddedNats(port=-1)
    server.start()
    try:
        yield server.url
    finally:  # every client of it has stopped by now (fixtures end in reverse order)
        server.stop(graceful=False)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracers(exporter: InMemorySpanExporter) -> Iterator[Tracing]:
    provider = Tracing()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


# Stopping a stack or closing a client takes well under a second; past this a teardown is
# stuck, and failing it (with every task's stack) beats hanging the whole run until CI's limit.
_TEARDOWN_S = 30.0


async def _bounded_teardown(what: str, work: Any) -> None:
    try:
        async with asyncio.timeout(_TEARDOWN_S):
            await work
    except TimeoutError:
        stuck = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in stuck:
            task.print_stack(file=sys.stderr)
        pytest.fail(f"{what} did not finish in {_TEARDOWN_S:g} s ({len(stuck)} tasks on stderr)")


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_url)
    yield nc
    await _bounded_teardown("closing the test client", nc.close())


@pytest.fixture
async def lifeline(nats_url: str, tracers: Tracing) -> AsyncIterator[Any]:
    """Factory: `await lifeline(toml_dict, workers=[...])` starts a stack; all are stopped at
    the end."""
    stacks: list[Stack] = []

    async def start(config: dict[str, Any], workers: list[str] | None = None) -> Stack:
        stack = await start_stack(parse_config(config), nats_url, tracers, workers=workers)
        stacks.append(stack)
        return stack

    yield start
    for stack in stacks:
        await _bounded_teardown("stopping a Lifeline stack", stack.stop())


@pytest.fixture
async def audit(client: Client) -> AuditFeed:
    feed = AuditFeed()
    await client.subscribe(subjects.AUDIT_ALL, cb=feed.on_msg)
    await ensure_subscribed(client)
    return feed
