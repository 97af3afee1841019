"""Streams an operator made beforehand, and JetStream's limits: what Lifeline says about each.

A stream of Lifeline's name that exists already is used as it is; what in it would lose
accepted jobs or audit events is said once as a warning with what to do, and a jobs stream
that does not capture llm.jobs.submit is refused. JetStream's limit errors (storage, stream
count, message size) come with advice about that limit, not "is JetStream on". Each test
runs against a real nats-server, some with server or account limits set.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import nats
import nats.js.errors
import pytest
from helpers import config, fake, free_port, wait_for
from nats.js import api

from schemas import subjects
from service import audit
from service.audit import ensure_audit_stream
from service.config import AuditSettings, JobsSettings
from service.embedded import EmbeddedNats
from service.jetstream import UnfitStream, covers, hint
from service.jobstore import ensure_jobs

JOBS, AUDIT = JobsSettings().stream, AuditSettings().stream


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@contextmanager
def nats_server(conf: str) -> Iterator[str]:
    with EmbeddedNats(port=-1, conf=conf) as server:
        yield server.url


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[nats.NATS]:
    nc = await nats.connect(url)
    try:
        yield nc
    finally:
        await nc.close()


# ---- streams made beforehand ---------------------------------------------------------------


async def test_a_jobs_stream_that_drops_old_jobs_is_warned_about_once_per_stream_made(
    client, caplog
):
    caplog.set_level(logging.WARNING, "lifeline")
    js = client.jetstream()
    dropping = api.StreamConfig(
        name=JOBS,
        subjects=[subjects.JOBS_SUBMIT],
        retention=api.RetentionPolicy.WORK_QUEUE,
        max_msgs=3,
        discard=api.DiscardPolicy.OLD,
    )
    await js.add_stream(dropping)
    settings = JobsSettings(max_jobs=3)  # its limit the config's: only the drops are said
    await ensure_jobs(js, settings)
    await ensure_jobs(js, settings)  # a dispatcher's next try: not said again
    said = warnings(caplog)
    assert len(said) == 1, said
    assert f"{JOBS} discards old messages" in said[0]
    assert "accepted jobs can be dropped" in said[0] and "set discard=new" in said[0]

    await js.delete_stream(JOBS)  # made again (by an operator, the same way): said again
    await js.add_stream(dropping)
    await ensure_jobs(js, settings)
    assert len(warnings(caplog)) == 2


async def test_a_jobs_stream_not_kept_as_a_work_queue_or_with_small_messages_is_warned_about(
    client, caplog
):
    caplog.set_level(logging.WARNING, "lifeline")
    js = client.jetstream()
    await js.add_stream(
        name=JOBS,
        subjects=[subjects.JOBS_SUBMIT],
        retention=api.RetentionPolicy.INTEREST,
        max_msg_size=150,
    )
    await ensure_jobs(js, JobsSettings())
    said = " ".join(warnings(caplog))
    assert "interest retention, not as a work queue" in said
    assert "a job published while no dispatcher has its consumer is dropped" in said
    assert (
        f"at most 150 bytes (max_msg_size), below the server's max_payload ({client.max_payload})"
        in said
    )


async def test_a_jobs_stream_on_other_subjects_is_refused_saying_what_to_do(
    lifeline, client, caplog
):
    caplog.set_level(logging.WARNING, "lifeline")
    js = client.jetstream()
    await js.add_stream(
        name=JOBS, subjects=["other.jobs"], retention=api.RetentionPolicy.WORK_QUEUE
    )
    with pytest.raises(UnfitStream) as refused:
        await ensure_jobs(js, JobsSettings())
    said = hint(refused.value, 1)
    assert f"stream {JOBS} exists but does not capture {subjects.JOBS_SUBMIT}" in said
    assert f"nats stream rm {JOBS}" in said

    await lifeline(config({"main": fake()}))  # a dispatcher: says so, serves the rest
    assert any(
        "not taking jobs" in line and f"nats stream rm {JOBS}" in line for line in warnings(caplog)
    )


async def test_an_operators_streams_that_lose_nothing_are_not_warned_about(client, caplog):
    caplog.set_level(logging.WARNING, "lifeline")
    js = client.jetstream()
    await js.add_stream(
        name=JOBS,
        subjects=["llm.jobs.*"],
        retention=api.RetentionPolicy.WORK_QUEUE,
        max_msgs=5,
        discard=api.DiscardPolicy.NEW,
        description="the operator's",
    )
    await js.add_stream(
        name=AUDIT, subjects=["llm.audit.*"], max_msgs=10, description="the operator's"
    )
    await ensure_jobs(js, JobsSettings())
    assert await ensure_audit_stream(js, AuditSettings()) is None
    # What they keep is theirs: only that the config's limits are not applied is said.
    assert all("other limits than the config's" in line for line in warnings(caplog))


async def test_a_stream_made_with_other_limits_than_the_configs_says_which(client, caplog):
    """An audit stream an older config made with a week's max_age, started with an hour: the
    stream kept its week, and nothing said so."""
    caplog.set_level(logging.WARNING, "lifeline")
    js = client.jetstream()
    await ensure_audit_stream(js, AuditSettings())
    assert warnings(caplog) == []
    wanted = AuditSettings(max_age_s=3600.0, max_bytes=1_000_000)
    assert await ensure_audit_stream(js, wanted) is None  # used as it is
    [line] = warnings(caplog)
    assert "LIFELINE_AUDIT was made with other limits than the config's" in line
    assert "max_age 604800.0 (the config's: 3600.0)" in line and "max_bytes" in line
    assert f"nats stream edit {AUDIT}" in line


@pytest.mark.parametrize(
    ("made", "said"),
    [
        (
            {"max_msg_size": 100},
            (
                "LIFELINE_AUDIT takes messages of at most 100 bytes (max_msg_size), below the "
                "server's max_payload"
            ),
        ),
        (
            {"max_msgs": 3, "discard": api.DiscardPolicy.NEW},
            (
                "LIFELINE_AUDIT discards new messages once full (max_msgs, max_bytes): audit "
                "events are lost from then on"
            ),
        ),
        (
            {"subjects": ["llm.audit.ok"]},
            "LIFELINE_AUDIT captures llm.audit.ok, not all of the audit events' subjects",
        ),
    ],
)
async def test_an_audit_stream_that_loses_events_is_warned_about(client, caplog, made, said):
    caplog.set_level(logging.WARNING, "lifeline")
    js = client.jetstream()
    await js.add_stream(api.StreamConfig(name=AUDIT, **{"subjects": [subjects.AUDIT_ALL], **made}))
    assert await ensure_audit_stream(js, AuditSettings()) is None  # used as it is
    assert await ensure_audit_stream(js, AuditSettings()) is None  # and said once
    lines = [line for line in warnings(caplog) if "other limits" not in line]
    assert len(lines) == 1 and said in lines[0], lines
    assert "delete the stream so that Lifeline makes it" in lines[0]


def test_subjects_covered_by_a_streams_subjects():
    assert covers(">", "llm.audit.>") and covers("llm.>", "llm.jobs.submit")
    assert covers("llm.audit.>", "llm.audit.*") and covers("llm.*.submit", "llm.jobs.submit")
    assert not covers("llm.audit.ok", "llm.audit.*") and not covers("llm.audit.*", "llm.audit.>")
    assert not covers("llm.jobs", "llm.jobs.submit") and not covers(
        "llm.jobs.submit.x", "llm.jobs.submit"
    )
    assert not covers("llm.audit.>", "llm.audit")


# ---- JetStream's limits --------------------------------------------------------------------


async def test_an_audit_stream_larger_than_the_store_is_said_once_with_what_to_lower(
    lifeline, caplog, monkeypatch
):
    """audit.max_bytes (1 GiB) on a server with 512 MB of file store can never be made:
    said once, naming the settings, however often it is tried again."""
    caplog.set_level(logging.WARNING, "lifeline")
    tries = 0

    async def counted(*args, **kwargs):
        nonlocal tries
        tries += 1
        return await ensure_audit_stream(*args, **kwargs)

    monkeypatch.setattr(audit, "_SETUP_RETRY_S", 0.02)
    monkeypatch.setattr(audit, "ensure_audit_stream", counted)
    with nats_server("jetstream { max_file_store: 512MB }") as url:
        problem = await _ensure_audit_on(url)
        assert "insufficient storage" in problem
        assert "lower audit.max_bytes" in problem and "max_file_store" in problem
        assert "is JetStream on" not in problem

        from service.app import start_stack
        from service.config import parse_config
        from service.telemetry import Tracing

        stack = await start_stack(parse_config(config({"main": fake()})), url, Tracing())
        try:
            await wait_for(lambda: tries >= 5, 5, "five tries to make the audit stream")
        finally:
            await stack.stop()
    said = [line for line in warnings(caplog) if "audit.max_bytes" in line]
    assert len(said) == 1, said


async def _ensure_audit_on(url: str) -> str:
    async with connected(url) as nc:
        problem = await ensure_audit_stream(nc.jetstream(timeout=5), AuditSettings())
    assert problem is not None
    return problem


async def test_an_account_out_of_streams_is_told_how_many_lifeline_needs():
    conf = (
        "no_auth_user: a\n"
        "accounts { A: { jetstream: { max_streams: 2 }, users: [{user: a, password: a}] } }\n"
    )
    with nats_server(conf) as url:
        async with connected(url) as nc:
            js = nc.jetstream(timeout=5)
            await ensure_jobs(js, JobsSettings())  # the jobs stream and the results bucket
            problem = await ensure_audit_stream(js, AuditSettings(max_bytes=1024**2))
    assert problem is not None and "maximum number of streams reached" in problem
    assert "Lifeline needs 4" in problem and "raise the account's JetStream max_streams" in problem


async def test_a_message_over_a_streams_max_msg_size_names_that_setting(client):
    js = client.jetstream()
    await js.add_stream(name="SMALL", subjects=["small"], max_msg_size=100)
    with pytest.raises(nats.js.errors.APIError) as refused:
        await js.publish("small", b"x" * 200)
    said = hint(refused.value, 1)
    assert "message size exceeds maximum" in said and "raise its max_msg_size" in said


def test_a_full_store_is_named_as_such():
    exc = nats.js.errors.ServiceUnavailableError(
        code=503, err_code=10023, description="insufficient resources"
    )
    assert "JetStream's store is full" in hint(exc, 1)


def test_no_stream_on_a_subject_names_a_stream_made_on_other_subjects():
    said = hint(nats.js.errors.NotFoundError(), 1)
    assert "no stream captures this subject" in said and "made beforehand on other subjects" in said


@contextmanager
def three_node_cluster() -> Iterator[str]:
    """Three nats-servers with JetStream, routed as one cluster: their URLs, comma-separated."""
    ports = [free_port() for _ in range(3)]
    routes = ", ".join(f"nats://127.0.0.1:{p}" for p in ports)
    servers = [
        EmbeddedNats(
            port=-1,
            conf=f'server_name: n{i}\ncluster {{ name: lifeline, listen: "127.0.0.1:{port}", '
            f"routes: [{routes}] }}\n",
        )
        for i, port in enumerate(ports)
    ]
    try:
        for server in servers:
            server.start()
        yield ",".join(server.url for server in servers)
    finally:
        for server in servers:
            server.stop()


async def test_streams_kept_on_fewer_servers_than_the_config_asks_are_warned_about(caplog):
    """jetstream.replicas = 3 set after the streams and buckets were made on one server each:
    those the server did not scale up stayed there without a word (the jobs stream's "exists
    with other settings" at INFO), so losing that server lost the jobs, results or audit events
    the operator believed were kept on three."""
    with three_node_cluster() as urls:
        nc = await nats.connect(urls.split(","))
        try:
            js = nc.jetstream()

            async def made(replicas: int) -> None:
                await ensure_audit_stream(js, AuditSettings(), replicas)
                await ensure_jobs(js, JobsSettings(), replicas)

            await wait_for(lambda: _ready(made), timeout_s=20, what="JetStream's meta leader")
            caplog.clear()
            await made(3)
            kept = {
                name: (await js.stream_info(name)).config.num_replicas
                for name in (JOBS, AUDIT, f"KV_{JobsSettings().results_bucket}")
            }
        finally:
            await nc.close()
    said = warnings(caplog)
    assert kept[JOBS] == 1, kept  # JetStream keeps a stream's replicas on a create
    for name, replicas in kept.items():
        line = next((line for line in said if line.startswith(f"{name} was made")), "")
        if replicas < 3:
            assert "num_replicas 1 (the config's: 3)" in line, (name, said)
            assert f"nats stream edit {name}" in line, (name, said)
        else:
            assert line == "", line


async def _ready(made: object) -> bool:
    """Whether the streams could be made on one server each (a young cluster has no JetStream
    leader for its first seconds)."""
    try:
        await made(1)  # type: ignore[operator]
    except Exception:  # noqa: BLE001 - no leader yet answers with several errors
        return False
    return True
