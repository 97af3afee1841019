"""The least-privilege nats-server configuration (`lifeline nats-config`, service/permissions.py)
runs the whole service, and the server refuses every action a role must not take.

One nats-server starts with the generated configuration; a dispatcher and one worker per
provider run as `lifeline` processes, each connecting as its role's user (NATS_USER,
NATS_PASSWORD); the test is client alice (inbox prefix _INBOX.alice), client bob and the
operator. The service's own users never hit a permission violation: the server's log is read
for them at the end.

What the README said of this test until 2026-12-04, word for word: it runs a nats-server with
the generated file, a dispatcher, workers and a gateway as `lifeline` processes each connected
as its role, and then a core request, a stream, a timed-out attempt cancelled and fallen back
from, a hedge's loser cancelled, a request through the gateway, a job (from Python and from
`lifeline submit` and `result`), `lifeline status`, `lifeline audit` and `lifeline health`
(every one of them found) as the operator; the service's users hit no permission violation.
It then shows the server refusing, one by one: a client subscribing to `llm.provider.>`,
another client's inbox, `_INBOX.>`, `llm.audit.>`, the dispatchers' inbox or `llm.complete` in
the dispatchers' queue group; publishing a cancel or straight to a worker; reading the audit
stream or the health bucket; watching, listing or reading (by sequence, or the newest of
`job.*`) the results bucket, writing a result or making the jobs stream; a worker subscribing
to another provider's subjects (or its own outside its queue group), publishing a cancel, a
reply to a dispatcher it was not asked for, or anything to a client; a gateway reading a
client's answers, posing as a dispatcher in `$SRV`, cancelling or answering a client; an
operator cancelling or sending a request; and a client without its inbox prefix getting no
reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.errors
import nats.js.errors
import pytest
from helpers import (
    LIFELINE,
    ROOT,
    USER_HELLO,
    LifelineProcess,
    ask,
    cli_env,
    config,
    fake,
    run_lifeline,
    wait_for,
    write_config,
)
from nats.aio.client import Client

from schemas import subjects
from schemas.streaming import Assembler
from schemas.wire import audit_decoder, encoder, reply_decoder
from service import client, discovery, permissions
from service.cli import build_parser, cmd_nats_config
from service.client import Lifeline, NotPermitted, Unreachable
from service.config import JobsSettings, load_config
from service.embedded import EmbeddedNats
from service.natsio import ensure_subscribed

CONFIG = config(
    {
        "fast": fake(reply="echo", chunks=6, chunk_delay_ms=1),  # streamed in 6 chunks
        "slow": fake(reply="too late", latency_ms=5000),  # always cancelled
    },
    routes={
        "default": {"targets": ["fast"]},
        # A stream whose first target sends no first chunk within ttft_s: the dispatcher gives
        # up on it (a timeout, well before the deadline the worker knows) and cancels it.
        "cancel": {"targets": [{"provider": "slow", "ttft_s": 0.2}, "fast"]},
        "hedged": {"targets": ["slow", "fast"], "hedge_after_ms": 20},
        "stoppable": {"targets": ["slow"]},  # a client gives up on it and aborts it
    },
)
CLIENTS = ("alice", "bob")
GATEWAYS = ("gateway",)


class Secured:
    """The server, its users' passwords, and the service's processes."""

    def __init__(self, server: EmbeddedNats, passwords: dict[str, str], config_path: Path):
        self.server = server
        self.passwords = passwords
        self.config_path = config_path
        self.procs: list[LifelineProcess] = []

    def env(self, user: str, **extra: str) -> dict[str, str]:
        """A `lifeline` process's environment to connect as `user`."""
        return {
            "NATS_URL": self.server.url,
            "NATS_USER": user,
            "NATS_PASSWORD": self.passwords[user],
            **extra,
        }

    async def connect(self, user: str, errors: list[str] | None = None, **options: Any) -> Client:
        """A connection as `user`; the permission violations it is told of go to `errors`."""

        async def on_error(exc: Exception) -> None:
            if errors is not None:
                errors.append(str(exc))

        options.setdefault("inbox_prefix", permissions.client_inbox(user))
        options.setdefault("name", f"test-{user}")
        return await nats.connect(
            self.server.url,
            user=user,
            password=self.passwords[user],
            error_cb=on_error,
            max_reconnect_attempts=1,
            **options,
        )

    def violations(self) -> list[str]:
        assert self.server.store_dir is not None
        log = (Path(self.server.store_dir) / "nats-server.log").read_text()
        return [line for line in log.splitlines() if "Violation" in line]


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    tmp = tmp_path_factory.mktemp("least-privilege")
    config_path = write_config(tmp / "lifeline.toml", CONFIG)
    lifeline_config = load_config(str(config_path))
    users = permissions.users(lifeline_config, clients=CLIENTS, gateways=GATEWAYS)
    passwords = {u.name: "p" + secrets.token_hex(12) for u in users}
    conf = permissions.server_config(  # `lifeline nats-config`
        lifeline_config, clients=CLIENTS, gateways=GATEWAYS
    )
    with environment(**{u.password_env: passwords[u.name] for u in users}):
        server = EmbeddedNats(port=-1, conf=conf)
        server.start()
    service = Secured(server, passwords, config_path)
    try:
        starting = [
            (
                LifelineProcess(
                    ["worker", name, "--config", str(config_path)],
                    tmp / f"worker-{name}.log",
                    service.env(permissions.worker_user(name)),
                ),
                f"worker {name} serving",
            )
            for name in CONFIG["providers"]
        ]
        starting.append(
            (
                LifelineProcess(
                    ["dispatcher", "--config", str(config_path)],
                    tmp / "dispatcher.log",
                    service.env(permissions.DISPATCHER_USER),
                ),
                "jobs: taking jobs",
            )
        )
        [gateway_user] = GATEWAYS
        starting.append(
            (
                LifelineProcess(
                    ["gateway", "--port", "0", "--config", str(config_path)],
                    tmp / "gateway.log",
                    service.env(
                        gateway_user, NATS_INBOX_PREFIX=permissions.client_inbox(gateway_user)
                    ),
                ),
                r"OpenAI-compatible gateway on http://\S+/v1",
            )
        )
        for proc, ready in starting:
            service.procs.append(proc)
        for proc, ready in starting:
            proc.wait_for_log(ready)
        yield service
    finally:
        for proc in reversed(service.procs):
            proc.stop()
        server.stop()


def lifeline(secured: Secured, user: str, *args: str) -> subprocess.Popen[str]:
    """A `lifeline` command as `user` (its inbox prefix set too), started."""
    env = cli_env(**secured.env(user, NATS_INBOX_PREFIX=permissions.client_inbox(user)))
    return subprocess.Popen(
        [*LIFELINE, *args, "--config", str(secured.config_path)],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finished(proc: subprocess.Popen[str], timeout_s: float = 20) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout_s)
    return proc.returncode, out, err


async def streamed(nc: Client, request: dict[str, Any]) -> Assembler:
    assembler = Assembler()
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subjects.STREAM, encoder.encode(request), reply=inbox)
    while not assembler.done:
        msg = await sub.next_msg(timeout=10)
        assembler.feed(msg.headers, msg.data)
    await sub.unsubscribe()
    return assembler


async def test_the_whole_service_runs_with_every_process_as_its_role(secured: Secured) -> None:
    alice = await secured.connect("alice")
    operator = await secured.connect("operator")
    try:
        # A core request.
        reply = await ask(alice, USER_HELLO)
        assert reply.status == "ok", reply.error
        assert reply.provider == "fast"

        # A streamed one: the worker's chunks reach the dispatcher's inbox, then alice's.
        stream = await streamed(alice, USER_HELLO)
        assert stream.reply is not None and stream.reply.status == "ok", stream.reply
        assert stream.text == USER_HELLO["messages"][0]["content"]
        assert stream.reply.stream is not None and stream.reply.stream.chunks == 6

        # A slow attempt the dispatcher gives up on: cancelled at its worker, then a fallback.
        cancelled = (await streamed(alice, {**USER_HELLO, "route": "cancel"})).reply
        assert cancelled is not None and cancelled.status == "ok", cancelled
        assert [(a.target, a.outcome) for a in cancelled.attempts] == [
            ("slow", "timeout"),
            ("fast", "ok"),
        ]

        # A hedge wins the race, and the slow attempt it beat is cancelled at once.
        hedged = await ask(alice, {**USER_HELLO, "route": "hedged"})
        assert [(a.outcome, a.reason) for a in hedged.attempts] == [
            ("cancelled", "hedge_lost"),
            ("ok", None),
        ]

        async def slow_cancels() -> dict[str, Any]:
            """The slow worker's cancel endpoint in the NATS service API, which the operator
            may ask: the cancels it heard, and those that stopped an attempt it was running
            (every one of them here)."""
            [stats] = await discovery.ask(operator, "STATS", subjects.worker_service("slow"))
            [cancel] = [e for e in stats["endpoints"] if e["name"] == "cancel"]
            return {"heard": cancel["num_requests"], "cancelled": cancel["data"]["cancelled"]}

        seen: list[dict[str, Any]] = []

        async def both_cancels_arrived() -> bool:
            seen.append(await slow_cancels())
            return seen[-1] == {"heard": 2, "cancelled": 2}

        await wait_for(
            both_cancels_arrived,
            5,
            lambda: f"the slow worker hearing both cancels and stopping both calls: {seen[-1]}",
        )

        # A request alice gives up on: her client aborts it (llm.abort), the dispatcher stops it
        # and cancels its call at the worker.
        async def slow_in_flight() -> int:
            [stats] = await discovery.ask(operator, "STATS", subjects.worker_service("slow"))
            [provider] = [e for e in stats["endpoints"] if e["name"] == "provider"]
            return provider["data"]["in_flight"]

        call = asyncio.ensure_future(Lifeline(alice).complete("Hi", route="stoppable", id="gone"))
        await wait_for(slow_in_flight, 5, "the call running at the slow worker")
        call.cancel()

        async def aborted_at_the_worker() -> bool:
            seen.append(await slow_cancels())
            return seen[-1] == {"heard": 3, "cancelled": 3}

        await wait_for(aborted_at_the_worker, 5, lambda: f"the abort's cancel: {seen[-1]}")

        # A durable job, its result pushed to alice's inbox and read back by id.
        notify = permissions.client_inbox("alice") + ".jobs"
        pushed = await alice.subscribe(notify)
        job_id = "job-" + secrets.token_hex(8)
        js = alice.jetstream(timeout=5)
        ack = await js.publish(
            subjects.JOBS_SUBMIT,
            encoder.encode({**USER_HELLO, "id": job_id}),
            headers={subjects.MSG_ID: job_id, subjects.NOTIFY: notify},
        )
        assert not ack.duplicate
        assert reply_decoder.decode((await pushed.next_msg(timeout=10)).data).id == job_id
        # Read back by id from a dispatcher: a client may not touch the results bucket.
        stored = await Lifeline(alice).result(job_id, wait_s=5)
        assert stored is not None and stored.status == "ok" and stored.id == job_id
    finally:
        await alice.close()
        await operator.close()

    # Through the HTTP gateway, connected as its own user.
    [url] = re.findall(
        r"gateway on (http://\S+/v1)", (secured.config_path.parent / "gateway.log").read_text()
    )
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        answer = await http.post("/chat/completions", json={"model": "default", **USER_HELLO})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-lifeline-provider"] == "fast"

    # The commands, each as its user, side by side: a client submits a job and waits for its
    # result; the operator reads the health view and the audit events, and finds every
    # dispatcher, worker and gateway.
    submit = lifeline(secured, "bob", "submit", "--id", "bob-1", "hello later")
    lines = secured.config_path.parent / "bob.jsonl"  # a batch, as a client: pushed results
    lines.write_text(
        "".join(json.dumps({"id": f"bob-b{n}", **USER_HELLO}) + "\n" for n in range(3))
    )
    batch = lifeline(secured, "bob", "batch", str(lines), "--timeout", "15")
    result = lifeline(secured, "bob", "result", "bob-1", "--wait", "15", "--json")
    read_back = lifeline(secured, "operator", "result", "bob-1", "--wait", "15", "--json")
    status = lifeline(secured, "operator", "status", "--json")
    audit = lifeline(secured, "operator", "audit", "--last", "20", "--json")
    health = lifeline(secured, "operator", "health", "--expect-all")
    code, out, err = finished(submit)
    assert code == 0 and "bob-1: submitted" in out, err
    code, out, err = finished(batch)
    assert code == 0, err  # it watched the whole results bucket: refused to a client
    written = lines.with_suffix(".results.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in written) == ["bob-b0", "bob-b1", "bob-b2"]
    code, out, err = finished(result)
    assert code == 0, err
    assert reply_decoder.decode(out).id == "bob-1"
    code, out, err = finished(read_back)  # an operator reads any job's result
    assert code == 0, err
    assert reply_decoder.decode(out).id == "bob-1"
    code, out, err = finished(status)
    assert code == 0, err
    assert len(json.loads(out)["dispatchers"]) == 1
    code, out, err = finished(audit)
    assert code == 0, err
    ids = {audit_decoder.decode(line).id for line in out.splitlines()}
    assert {reply.id, stream.reply.id, cancelled.id, hedged.id, job_id, "gone"} <= ids
    code, out, err = finished(health)
    assert code == 0, out + err
    assert f"lifeline-gateway             {socket.gethostname()}" in out and url in out
    assert "4 of 4 ready" in out

    assert [v for v in secured.violations() if ":rogue-" not in v] == []


# What no role but its own may do; each refused by the server. (user, action, subject, why)
FORBIDDEN = [
    ("alice", "subscribe", "llm.provider.>", "read every prompt"),
    ("alice", "subscribe", "_INBOX.bob.>", "read another client's answers"),
    ("alice", "subscribe", "_INBOX.>", "read every client's answers"),
    ("alice", "subscribe", "llm.audit.>", "read the audit events"),
    ("alice", "subscribe", "_LIFELINE_DISPATCHER.>", "read the workers' answers and chunks"),
    ("alice", "queue", "llm.complete", "take other clients' requests as a dispatcher"),
    ("alice", "publish", "llm.cancel.slow", "cancel another client's attempt"),
    ("alice", "publish", "llm.provider.fast", "call a worker past the dispatcher"),
    ("alice", "publish", "$JS.API.CONSUMER.CREATE.LIFELINE_AUDIT", "read the audit stream"),
    ("alice", "publish", "$JS.API.STREAM.INFO.KV_lifeline_health", "read the health bucket"),
    ("alice", "publish", "$JS.API.CONSUMER.CREATE.KV_lifeline_results", "watch every result"),
    ("alice", "publish", "$JS.API.STREAM.MSG.GET.KV_lifeline_results", "read results by number"),
    ("alice", "publish", "$JS.API.DIRECT.GET.KV_lifeline_results", "read results directly"),
    (
        "alice",
        "publish",
        "$JS.API.DIRECT.GET.KV_lifeline_results.$KV.lifeline_results.job.*",
        "read the newest result of anyone's job",
    ),
    ("alice", "publish", "$JS.API.STREAM.INFO.KV_lifeline_results", "list every job's key"),
    ("alice", "publish", "$JS.API.STREAM.CREATE.LIFELINE_JOBS", "make the jobs stream its way"),
    ("alice", "publish", "$KV.lifeline_results.job.x", "write a job's result"),
    ("worker-fast", "subscribe", "llm.provider.slow", "read another provider's prompts"),
    ("worker-fast", "subscribe", "llm.provider.fast", "take its requests outside the group"),
    ("worker-fast", "publish", "llm.cancel.slow", "cancel another worker's attempt"),
    ("worker-fast", "publish", "_LIFELINE_DISPATCHER.x.1", "forge a reply to a dispatcher"),
    ("worker-fast", "publish", "_INBOX.alice.x", "answer a client past the dispatcher"),
    ("gateway", "subscribe", "_INBOX.alice.>", "read a client's answers"),
    ("gateway", "subscribe", "$SRV.PING.lifeline-dispatcher", "pose as a dispatcher"),
    ("gateway", "publish", "llm.cancel.slow", "cancel an attempt"),
    ("gateway", "publish", "_INBOX.alice.x", "answer a client past the dispatcher"),
    ("operator", "publish", "llm.cancel.slow", "cancel an attempt"),
    ("operator", "publish", "llm.complete", "send requests"),
]


@pytest.mark.parametrize(
    ("user", "action", "subject", "why"), FORBIDDEN, ids=[f"{c[0]}-{c[3]}" for c in FORBIDDEN]
)
async def test_the_server_refuses_what_a_role_may_not_do(
    secured: Secured, user: str, action: str, subject: str, why: str
) -> None:
    errors: list[str] = []
    nc = await secured.connect(user, errors, name=f"rogue-{user}")
    bob = await secured.connect("bob")
    operator = await secured.connect("operator")
    try:
        audited = await operator.subscribe(subjects.AUDIT_ALL)
        await ensure_subscribed(operator)
        got: list[Any] = []

        async def took(msg: Any) -> None:
            got.append(msg)

        if action == "publish":
            await nc.publish(subject, b"x")
        elif action == "queue":
            await nc.subscribe(subject, queue=subjects.DISPATCHER_QUEUE, cb=took)
        else:
            await nc.subscribe(subject, cb=took)
        await nc.flush()
        await wait_for(lambda: errors, 5, f"the server refusing {user} to {why}")
        [error] = errors  # nats-py passes the server's -ERR on in lower case
        refused = "publish to" if action == "publish" else "subscription to"
        assert f'permissions violation for {refused} "{subject.lower()}"' in error, error
        # Refused means nothing arrives: a request of bob's goes through (its last message,
        # the audit event, reaches the operator), none of it here.
        reply = await ask(bob, USER_HELLO)
        assert reply.status == "ok"
        while audit_decoder.decode((await audited.next_msg(timeout=5)).data).id != reply.id:
            pass
        await ensure_subscribed(nc)
        assert got == []
    finally:
        for conn in (nc, bob, operator):
            await conn.close()


async def test_a_dead_lettered_job_reaches_the_operator(secured: Secured) -> None:
    """No role could subscribe to llm.jobs.dead: a job the dispatcher gave up on was published
    there, as submitted, and lost to everyone (the README's "bad jobs" row)."""
    errors: list[str] = []
    operator = await secured.connect("operator", errors)
    dispatcher = await secured.connect(
        permissions.DISPATCHER_USER, inbox_prefix=subjects.DISPATCHER_INBOX_PREFIX
    )
    try:
        dead = await operator.subscribe(subjects.JOBS_DEAD)
        await ensure_subscribed(operator)
        await dispatcher.publish(
            subjects.JOBS_DEAD, encoder.encode(USER_HELLO), headers={"Lifeline-Error": "internal"}
        )
        await dispatcher.flush()
        letter = await dead.next_msg(timeout=5)
        assert letter.headers["Lifeline-Error"] == "internal"
        assert json.loads(letter.data) == json.loads(encoder.encode(USER_HELLO))
        assert errors == []
    finally:
        for conn in (operator, dispatcher):
            await conn.close()


def test_a_gateway_run_as_a_client_serves_and_says_once_why_it_cannot_be_found(
    secured: Secured, tmp_path: Path
) -> None:
    """A gateway connected as a client user (no gateway user in the server's config): its $SRV
    subscriptions are refused, which one warning says with what to do, not one per subject;
    it serves all the same."""
    env = secured.env("bob", NATS_INBOX_PREFIX=permissions.client_inbox("bob"))
    proc = LifelineProcess(
        ["gateway", "--port", "0", "--config", str(secured.config_path)], tmp_path / "gw.log", env
    )
    try:
        proc.wait_for_log(r"OpenAI-compatible gateway on http://\S+/v1")
        [url] = re.findall(r"gateway on (http://\S+/v1)", proc.log())
        answer = httpx.post(
            url + "/chat/completions", json={"model": "default", **USER_HELLO}, timeout=10
        )
        assert answer.status_code == 200, answer.text
        proc.wait_for_log("may not subscribe to the NATS service API")
        log = proc.log()
        assert log.count("may not subscribe to the NATS service API") == 1, log
        assert "--gateways NAME" in log and "permissions violation" not in log.lower(), log
        # A client may not publish to its own inbox, where the check of its rights answers.
        assert (
            "its rights to publish to llm.complete, llm.stream, llm.abort were not checked" in log
        )
    finally:
        proc.stop()


async def test_a_client_without_its_inbox_prefix_gets_no_reply(secured: Secured) -> None:
    errors: list[str] = []
    nc = await secured.connect("alice", errors, inbox_prefix="_INBOX", name="rogue-default-inbox")
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request(subjects.COMPLETE, encoder.encode(USER_HELLO), timeout=0.5)
        assert any("permissions violation for subscription" in e.lower() for e in errors), errors
    finally:
        await nc.close()


async def test_answers_to_a_reply_subject_the_dispatcher_may_not_use_are_logged_once_counted(
    secured: Secured,
) -> None:
    """A client may publish a request whose reply subject is outside the inboxes (publish
    rights do not cover reply subjects): the server refuses each answer the dispatcher sends
    there, a heartbeat too. The dispatcher logged a warning per refusal, so one client made it
    write lines as fast as it sent requests (and five a second per slow request asking for
    heartbeats every 200 ms); it now says so once, counting the rest."""
    alice = await secured.connect("alice")
    [dispatcher] = [p for p in secured.procs if p.log_path.name == "dispatcher.log"]
    said = "the NATS server refused a publish"
    before = dispatcher.log().count(said)
    try:
        for n in range(20):
            request = encoder.encode({**USER_HELLO, "id": f"elsewhere-{n}"})
            await alice.publish(subjects.COMPLETE, request, reply=f"alice.elsewhere.{n}")
        await alice.flush()
        await asyncio.sleep(1.0)  # the dispatcher answers and is refused meanwhile
    finally:
        await alice.close()
    assert dispatcher.log().count(said) - before <= 1, dispatcher.log()[-2000:]


def test_a_command_without_its_inbox_prefix_says_what_to_set(secured: Secured) -> None:
    """`lifeline ask` as a client user without NATS_INBOX_PREFIX waited out its timeout and
    blamed the dispatcher; the server had refused its inbox, which it now says, with the fix."""
    asked = run_lifeline(
        "ask", "--timeout", "1", "hello", env=cli_env(**secured.env("bob")), timeout_s=60
    )
    assert asked.returncode != 0
    assert "refused this connection's subscription to its inbox" in asked.stderr, asked.stderr
    assert "set NATS_INBOX_PREFIX=_INBOX.bob" in asked.stderr, asked.stderr


async def requests_taken(operator: Client) -> int:
    """The requests every dispatcher has taken on llm.complete, from their $SRV.STATS."""
    answers = await discovery.ask(operator, "STATS", subjects.DISPATCHER_SERVICE)
    return sum(
        e["num_requests"] for a in answers for e in a["endpoints"] if e["name"] == "complete"
    )


async def test_a_command_without_its_inbox_prefix_sends_nothing(secured: Secured) -> None:
    """`lifeline ask` as a client user without NATS_INBOX_PREFIX sent its request all the
    same: a dispatcher ran it (a provider paid) and answered into an inbox the server let no
    one read. The command finds its inbox refused before it sends anything, and says which
    prefix this user takes."""
    operator = await secured.connect("operator")
    try:
        before = await requests_taken(operator)
        asked = await asyncio.to_thread(
            run_lifeline,
            "ask",
            "--timeout",
            "5",
            "hello",
            env=cli_env(**secured.env("bob")),
            timeout_s=60,
        )
        assert await requests_taken(operator) == before
    finally:
        await operator.close()
    assert asked.returncode == 1, asked.stderr
    assert "nothing was sent" in asked.stderr, asked.stderr


async def test_the_python_client_without_its_inbox_prefix_refuses_to_connect(
    secured: Secured,
) -> None:
    """Lifeline.connect as a client user without inbox_prefix connected, and each request
    ran at a dispatcher while its answer was dropped by the server, raising NoAnswer (blaming
    the dispatcher) after the request's timeout."""
    bob = {"user": "bob", "password": secured.passwords["bob"]}
    with pytest.raises(Unreachable, match='inbox_prefix="_INBOX.bob"'):
        await Lifeline.connect(secured.server.url, **bob)
    async with await Lifeline.connect(secured.server.url, inbox_prefix="_INBOX.bob", **bob) as ll:
        assert (await ll.complete("hello")).status == "ok"


async def test_the_python_client_refused_a_publish_raises_at_once_naming_user_and_subject(
    secured: Secured,
) -> None:
    """Lifeline.complete and .stream as the operator, who may not publish llm.complete nor
    llm.stream: the server dropped the request, and the client waited out its timeout, then
    raised NoAnswer blaming the dispatcher (or a stream that stalled)."""
    operator = {"user": "operator", "password": secured.passwords["operator"]}
    inbox = permissions.client_inbox("operator")
    async with await Lifeline.connect(secured.server.url, inbox_prefix=inbox, **operator) as ll:
        for _ in range(2):  # and again: each request is refused, none left waiting
            with pytest.raises(NotPermitted, match="NATS user operator may not publish llm.com"):
                await ll.complete("hello", timeout_s=5)
            with pytest.raises(NotPermitted, match="NATS user operator may not publish llm.str"):
                async with ll.stream("hello", timeout_s=5) as answer:
                    await answer.finish()
        assert not ll._keys and not ll.nc._resp_map, "every refused request was let go"
        with pytest.raises(
            NotPermitted, match=r"NATS user operator may not publish \$JS.API.STREAM.INFO"
        ):
            await ll.submit("hello", job_id="refused")


async def test_the_framework_models_refused_a_publish_raise_the_clients_error(
    secured: Secured,
) -> None:
    """LangChain's and Haystack's models as the operator: the same NotPermitted as the client
    (a ValueError: final to their retries), streamed or not; they waited out their timeout."""
    pytest.importorskip("langchain_core")
    pytest.importorskip("haystack")
    from haystack.dataclasses import ChatMessage

    from service.integrations.haystack import LifelineChatGenerator
    from service.integrations.langchain import ChatLifeline

    operator = {
        "NATS_USER": "operator",
        "NATS_PASSWORD": secured.passwords["operator"],
        "NATS_INBOX_PREFIX": permissions.client_inbox("operator"),
    }
    with environment(**operator):
        chat = ChatLifeline(model="default", nats_url=secured.server.url, timeout=5)
        generator = LifelineChatGenerator(nats_url=secured.server.url, timeout=5)
        try:
            with pytest.raises(NotPermitted, match="operator may not publish llm.complete"):
                await chat.ainvoke("hello")
            with pytest.raises(NotPermitted, match="operator may not publish llm.stream"):
                [chunk async for chunk in chat.astream("hello")]
            with pytest.raises(NotPermitted, match="operator may not publish llm.complete"):
                await generator.run_async([ChatMessage.from_user("hello")])
        finally:
            chat.close()
            generator.close()


def test_an_operators_command_run_as_a_client_says_its_role_does_not_allow_it(
    secured: Secured,
) -> None:
    """`lifeline status` as a client: the server refused its read of the health bucket, and
    it said a client's reply subject was outside its inbox, to ask with nc.new_inbox()."""
    code, _, err = finished(lifeline(secured, "bob", "status"), timeout_s=30)
    assert code != 0, err
    assert (
        "NATS user bob may not publish $js.api.stream.info.kv_lifeline_health: its role "
        "does not allow it"
    ) in err, err
    assert "`lifeline status`, `audit` and `health` are the operator's" in err, err
    assert "new_inbox" not in err, err


@pytest.mark.parametrize(
    ("way", "subject"), [((), subjects.COMPLETE), (("--stream",), subjects.STREAM)]
)
def test_a_request_its_role_may_not_send_ends_at_once_naming_the_user_and_subject(
    secured: Secured, way: tuple[str, ...], subject: str
) -> None:
    """`lifeline ask` as the operator, who may not publish llm.complete nor llm.stream: the
    server dropped the request, and the command waited out its whole timeout, then said no
    dispatcher had answered (is `lifeline run` up?), or that the stream had stalled."""
    asked = lifeline(secured, "operator", "ask", *way, "hello")
    code, _, err = finished(asked, timeout_s=90)
    assert code == 1, err
    assert f"NATS user operator may not publish {subject}: no dispatcher got the request" in err
    assert "no answer from a dispatcher" not in err, err
    assert "stalled" not in err, err


def test_a_worker_with_another_roles_credentials_stops_saying_so(secured: Secured) -> None:
    """Worker slow started with worker-fast's credentials (copied by mistake): its subscriptions
    were refused, and it ran on, ready by /readyz and `lifeline health`, serving nothing."""
    worker = lifeline(secured, "worker-fast", "worker", "slow")
    code, _, err = finished(worker, timeout_s=30)
    assert code != 0, err
    assert "worker slow: this NATS user may not subscribe to llm.provider.slow" in err, err


def test_a_dispatcher_with_a_clients_inbox_prefix_stops_saying_so(secured: Secured) -> None:
    """A dispatcher started with NATS_INBOX_PREFIX=_INBOX.dispatcher (a client's setting, left
    in a shared environment): the server refused its inbox, and it ran on, ready by /readyz,
    timing out every attempt, as its workers' replies could not reach it."""
    env = cli_env(**secured.env(permissions.DISPATCHER_USER, NATS_INBOX_PREFIX="_INBOX.dispatcher"))
    dispatcher = subprocess.Popen(
        [*LIFELINE, "dispatcher", "--config", str(secured.config_path)],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        code, _, err = finished(dispatcher, timeout_s=30)
    finally:  # one running on would take this module's requests, and time them out
        if dispatcher.poll() is None:
            dispatcher.kill()
            dispatcher.communicate()
    assert code != 0, err
    assert "dispatcher: this NATS user may not subscribe to _inbox.dispatcher." in err, err
    assert f"connect it with inbox prefix {subjects.DISPATCHER_INBOX_PREFIX}" in err, err
    # Said first, before its JetStream setup waited out a timeout per ask through the refused
    # inbox and blamed JetStream (is it on? the disk full?) for each.
    assert "JetStream" not in err and "timeout" not in err, err


def test_a_gateway_without_its_inbox_prefix_stops_saying_so(secured: Secured) -> None:
    """A gateway started as its user but without NATS_INBOX_PREFIX=_INBOX.gateway: the server
    refused its inbox at its first request, and it ran on, ready by /readyz, each completion a
    504 after 35 s blaming the dispatcher."""
    [gateway_user] = GATEWAYS
    gateway = subprocess.Popen(
        [*LIFELINE, "gateway", "--port", "0", "--config", str(secured.config_path)],
        cwd=ROOT,
        env=cli_env(**secured.env(gateway_user)),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        code, out, err = finished(gateway, timeout_s=30)
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.communicate()
    assert code != 0, out + err
    assert "OpenAI-compatible gateway on" not in out, out
    assert "gateway: this NATS user may not subscribe to _inbox." in err, err
    assert f"set NATS_INBOX_PREFIX={permissions.client_inbox(gateway_user)}" in err, err


async def test_nats_config_prints_it(secured: Secured, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(secured.config_path)
    argv = ["nats-config", "--config", path, "--clients", "alice,bob", "--gateways", "gateway"]
    assert await cmd_nats_config(build_parser().parse_args(argv)) == 0
    printed = capsys.readouterr().out
    assert printed == permissions.server_config(
        load_config(path), clients=CLIENTS, gateways=GATEWAYS
    )
    assert "password: $LIFELINE_GATEWAY_PASSWORD" in printed
    without = build_parser().parse_args(["nats-config", "--config", path])
    assert await cmd_nats_config(without) == 0
    assert "GATEWAY" not in capsys.readouterr().out  # no gateway unless one is named
    assert "password: $LIFELINE_WORKER_SLOW_PASSWORD" in printed
    clash = build_parser().parse_args(["nats-config", "--config", path, "--clients", "operator"])
    with pytest.raises(ValueError, match="would share"):
        await cmd_nats_config(clash)


def test_a_config_path_with_a_line_break_stays_inside_its_comment() -> None:
    """The path went into a `#` comment as it was: a line break in it ended the comment, and
    what followed (no_auth_user: dispatcher) was the server's configuration."""
    from service.config import parse_config

    config = parse_config(
        {"providers": {"p": {"kind": "fake"}}, "routes": {"default": {"targets": ["p"]}}},
        source="odd\nno_auth_user: dispatcher\n#/c.toml",
    )
    rendered = permissions.server_config(config)
    assert not [line for line in rendered.splitlines() if line.startswith("no_auth_user")]
    assert "odd\\nno_auth_user" in rendered


# Users whose permissions deny a publish a component's work needs, and nothing else.
DENYING = """
authorization {
  users = [
    {user: "no-requests", password: "pw",
     permissions: {publish: {deny: ["llm.complete", "llm.stream"]}}}
    {user: "no-audit", password: "pw", permissions: {publish: {deny: ["llm.audit.>"]}}}
    {user: "no-jobs", password: "pw", permissions: {publish: {deny: ["llm.jobs.submit"]}}}
    {user: "no-streams", password: "pw",
     permissions: {publish: {deny: ["$JS.API.STREAM.CREATE.>"]}}}
  ]
}
"""


@pytest.fixture(scope="module")
def denying() -> Iterator[str]:
    server = EmbeddedNats(port=-1, conf=DENYING)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def _stopped_at_start(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    proc = subprocess.Popen(
        [*LIFELINE, *args, "--config", str(ROOT / "lifeline.example.toml")],
        cwd=ROOT,
        env=cli_env(**env),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        return finished(proc, timeout_s=30)
    finally:  # one running on would serve nothing, each request timing out
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_a_gateway_that_may_not_publish_requests_stops_saying_so(denying: str) -> None:
    """A gateway whose NATS user may not publish llm.complete and llm.stream: the server
    dropped each request it sent, and it ran on, ready by /readyz, each completion a 504 after
    its timeout."""
    env = {"NATS_URL": denying, "NATS_USER": "no-requests", "NATS_PASSWORD": "pw"}
    code, out, err = _stopped_at_start(["gateway", "--port", "0"], env)
    assert code != 0, out + err
    assert "OpenAI-compatible gateway on" not in out, out
    assert "gateway: this NATS user may not publish to llm.complete, llm.stream," in err, err
    assert "grant it publish there (`lifeline nats-config --gateways no-requests`" in err, err


def test_a_dispatcher_that_may_not_publish_audit_events_stops_saying_so(denying: str) -> None:
    """Its audit events dropped by the server, one per request, without a word."""
    env = {"NATS_URL": denying, "NATS_USER": "no-audit", "NATS_PASSWORD": "pw"}
    code, out, err = _stopped_at_start(["dispatcher"], env)
    assert code != 0, out + err
    assert "dispatcher: this NATS user may not publish to llm.audit.ok, llm.audit.error," in err
    assert "grant it publish there (`lifeline nats-config` gives the dispatcher's" in err, err


async def test_a_job_its_user_may_not_submit_raises_at_once(denying: str) -> None:
    """Lifeline.submit as a user who may not publish llm.jobs.submit: JetStream's publish
    waited out its timeout, then raised JobsUnavailable asking whether JetStream was on."""
    async with await Lifeline.connect(denying, user="no-jobs", password="pw") as ll:
        with pytest.raises(NotPermitted, match="NATS user no-jobs may not publish llm.jobs.sub"):
            await ll.submit("hello", job_id="refused")


async def test_a_job_whose_user_may_not_make_the_jobs_stream_raises_at_once(denying: str) -> None:
    """No dispatcher has made the jobs stream yet, and the user may look at streams but not
    make them (a client role): the client's making it waited out JetStream's 5 s timeout,
    then raised JobsUnavailable asking whether JetStream was on. It names what was refused."""
    nc = await nats.connect(denying, user="no-requests", password="pw")
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await nc.jetstream().delete_stream(JobsSettings().stream)
    await nc.close()
    async with await Lifeline.connect(denying, user="no-streams", password="pw") as ll:
        refused = r"NATS user no-streams may not publish \$JS\.API\.STREAM\.CREATE\.LIFELINE_JOBS"
        with pytest.raises(NotPermitted, match=refused):
            await ll.submit("hello", job_id="unmade")


async def _own_connection(url: str, user: str, errors: list[str]) -> Client:
    """A connection the user made, with an error callback of its own recording every error."""

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats.connect(url, user=user, password="pw", error_cb=on_error)


async def test_a_client_on_a_connection_of_ones_own_raises_not_permitted_at_once(
    denying: str,
) -> None:
    """Lifeline(nc) and the module-level stream(nc, ...) on a connection the user made, as a
    user who may not publish llm.complete nor llm.stream: only a client that connect() made
    heard of the refusal, so these waited out the request's whole timeout, then blamed a
    dispatcher (NoAnswer). The connection's own error callback still sees every refusal."""
    errors: list[str] = []
    nc = await _own_connection(denying, "no-requests", errors)
    try:
        ll = Lifeline(nc)
        async with asyncio.timeout(20):  # well under the requests' 60 s: refused at once
            with pytest.raises(NotPermitted, match="NATS user no-requests may not publish llm.com"):
                await ll.complete("hello", timeout_s=60)
            with pytest.raises(NotPermitted, match="NATS user no-requests may not publish llm.str"):
                async with ll.stream("hello", timeout_s=60) as answer:
                    await answer.finish()
            request = ll.request("hello", timeout_s=60)
            with pytest.raises(NotPermitted, match="NATS user no-requests may not publish llm.str"):
                await client.stream_text(nc, request)
        assert not nc._resp_map, "every refused request was let go"
        refused = [e for e in errors if "violation" in e.lower()]
        assert len(refused) == 3, errors  # each refusal, once, to the user's own callback
        assert sum('"llm.complete"' in e for e in refused) == 1, errors
    finally:
        await nc.close()


async def test_clients_sharing_a_connection_each_raise_not_permitted(denying: str) -> None:
    """Two Lifeline objects on one connection of the user's own: each refusal raises in the
    request that was refused, and reaches the user's error callback once (the connection's
    callback is chained once, not once per client)."""
    errors: list[str] = []
    nc = await _own_connection(denying, "no-requests", errors)
    try:
        first, second = Lifeline(nc), Lifeline(nc)
        async with asyncio.timeout(20):
            for ll in (first, second, first):
                with pytest.raises(NotPermitted, match="no-requests may not publish llm.complete"):
                    await ll.complete("hello", timeout_s=60)
            both = await asyncio.gather(
                first.complete("hello", timeout_s=60),
                second.complete("hello", timeout_s=60),
                return_exceptions=True,
            )
        assert all(isinstance(e, NotPermitted) for e in both), both
        assert len([e for e in errors if "violation" in e.lower()]) == 5, errors
    finally:
        await nc.close()


async def test_a_client_made_before_its_connection_connected_raises_not_permitted(
    denying: str,
) -> None:
    """Lifeline(nc) made while nc was not yet connected: nats-py's connect() sets the error
    callback it is given, in place of whatever was chained onto the one before."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = Client()
    ll = Lifeline(nc)
    try:
        await nc.connect(denying, user="no-requests", password="pw", error_cb=on_error)
        async with asyncio.timeout(20):
            with pytest.raises(NotPermitted, match="no-requests may not publish llm.complete"):
                await ll.complete("hello", timeout_s=60)
        assert any('"llm.complete"' in e for e in errors), errors
    finally:
        await nc.close()


async def test_a_refused_stream_sends_no_abort(denying: str) -> None:
    """A stream whose request the server refused went nowhere, yet leaving it published its
    llm.abort: one more message for every dispatcher, and one more permissions warning for a
    user who may not publish that either."""
    errors: list[str] = []
    own = await _own_connection(denying, "no-requests", errors)
    made = await Lifeline.connect(denying, user="no-requests", password="pw")
    aborts = await own.subscribe(subjects.ABORT)  # both connections' aborts reach it
    await ensure_subscribed(own)
    try:
        for ll in (Lifeline(own), made):
            async with asyncio.timeout(20):
                with pytest.raises(NotPermitted, match="no-requests may not publish llm.stream"):
                    async with ll.stream("hello", timeout_s=60) as answer:
                        await answer.finish()
                with pytest.raises(NotPermitted, match="no-requests may not publish llm.stream"):
                    await client.stream_text(ll.nc, ll.request("hello", timeout_s=60))
        await own.flush()  # its aborts, had it sent any, reached the server first
        await client.abort(made.nc, "sent")  # what an abort looks like, sent after them
        await made.nc.flush()
        assert (await aborts.next_msg(timeout=10)).data == b"sent"
        assert aborts.pending_msgs == 0
    finally:
        await made.close()
        await own.close()


async def test_ask_stream_refused_by_the_server_sends_no_abort(denying: str) -> None:
    """`lifeline ask --stream` as a user who may not publish llm.stream: its own wait for the
    refusal cancelled the client's stream from outside, which then sent an abort for a request
    that went nowhere."""
    errors: list[str] = []
    own = await _own_connection(denying, "no-requests", errors)
    aborts = await own.subscribe(subjects.ABORT)
    await ensure_subscribed(own)
    env = {"NATS_URL": denying, "NATS_USER": "no-requests", "NATS_PASSWORD": "pw"}
    try:
        code, _, err = await asyncio.to_thread(_stopped_at_start, ["ask", "--stream", "hi"], env)
        assert code == 1, err
        assert "NATS user no-requests may not publish llm.stream: no dispatcher got" in err, err
        await client.abort(own, "sent")  # what an abort looks like, sent after the command's
        await own.flush()
        assert (await aborts.next_msg(timeout=10)).data == b"sent"
    finally:
        await own.close()


async def test_a_job_submitted_on_a_connection_of_ones_own_raises_not_permitted(
    denying: str,
) -> None:
    """Lifeline(nc).submit as a user who may not publish llm.jobs.submit: JetStream's publish
    waited out its timeout, then raised JobsUnavailable asking whether JetStream was on."""
    errors: list[str] = []
    nc = await _own_connection(denying, "no-jobs", errors)
    try:
        with pytest.raises(NotPermitted, match="NATS user no-jobs may not publish llm.jobs.sub"):
            await Lifeline(nc).submit("hello", job_id="refused-own")
        assert any('"llm.jobs.submit"' in e for e in errors), errors
    finally:
        await nc.close()


async def test_the_check_of_publish_rights_reaches_nobody(nats_url: str, tmp_path: Path) -> None:
    """Its messages, one per subject checked, are traced only: no dispatcher, worker, audit
    reader or stream gets them (a dispatcher would answer and audit each as a request). Only
    their traces go out, to the checking connection's own inbox."""
    nc = await nats.connect(nats_url)
    everything = await nc.subscribe(">")
    await ensure_subscribed(nc)
    config_path = write_config(tmp_path / "lifeline.toml", CONFIG)
    starting = {"dispatcher": "jobs: taking jobs", "gateway": "OpenAI-compatible gateway on"}
    procs = [
        LifelineProcess(
            [command, "--config", str(config_path)]
            + (["--port", "0"] if command == "gateway" else []),
            tmp_path / f"{command}.log",
            {"NATS_URL": nats_url},
        )
        for command in starting
    ]
    try:
        for proc, ready in zip(procs, starting.values(), strict=True):
            proc.wait_for_log(ready)
        await nc.flush()  # what the server sent before this has been read
        heard = []
        while everything.pending_msgs:
            heard.append(await everything.next_msg(timeout=1))
        traced = [
            json.loads(msg.data)["events"][0]["subj"]
            for msg in heard
            if msg.subject.startswith(("_INBOX.", subjects.DISPATCHER_INBOX_PREFIX + "."))
            and b'"events"' in msg.data
        ]
        checked = ["llm.complete", "llm.stream", "llm.abort", "llm.audit.ok", "llm.audit.error"]
        checked += [subjects.provider_subject(name) for name in CONFIG["providers"]]
        assert sorted(traced) == sorted(checked), traced
        assert not [m.subject for m in heard if m.subject in checked], [m.subject for m in heard]
        audit = await nc.jetstream().stream_info(load_config(str(config_path)).audit.stream)
        assert audit.state.messages == 0
    finally:
        for proc in procs:
            proc.stop()
        await nc.close()
