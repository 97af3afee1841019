"""The fast read and write path over nats-py (service/natsio.py), against a real nats-server.

The adapter relies on nats-py internals; the first tests fail loudly when they change, so a
nats-py upgrade cannot quietly turn the fast path off (or break it)."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import time

import nats
from helpers import hpub, raw_publish, wait_for
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.protocol.parser import AWAITING_CONTROL_LINE, Parser

from service import natsio
from service.embedded import EmbeddedNats
from service.natsio import ensure_subscribed, fast_path, stop_taking


def test_the_installed_nats_py_is_one_the_adapter_was_written_for():
    version = importlib.metadata.version("nats-py")
    assert version.startswith(natsio.NATS_PY_VERSIONS), (
        f"nats-py {version}: check service/natsio.py's fast path against its read and write "
        "path, then add the version to NATS_PY_VERSIONS"
    )


def test_the_internals_the_adapter_relies_on_are_there():
    nc = Client()
    for name in ("_ps", "_subs", "_pending", "_pending_data_size", "_transport"):
        assert hasattr(nc, name), name
    # The hot path reads max_payload's own attribute (natsio, transport, the worker runtime).
    nc._max_payload = 12345
    assert nc.max_payload == 12345
    assert callable(Client._parse_header_lines) and callable(Client._send_unsubscribe)
    # An unreadable header block is told from other failures by nats-py's own step for one.
    assert asyncio.iscoroutinefunction(Client._process_headers)
    assert isinstance(nc._ps, Parser) and nc._ps.state == AWAITING_CONTROL_LINE
    assert hasattr(nc._ps, "buf") and "in_msgs" in nc.stats and "out_bytes" in nc.stats
    assert hasattr(nc._ps, "needed")  # what a message's payload still needs, mid-frame
    # The fast path publishes in the states nats-py's own publish does, read from _status.
    states = [v for k, v in vars(Client).items() if k.isupper() and isinstance(v, int)]
    assert Client.CONNECTED in states and Client.DRAINING_SUBS in states
    for state in states:
        nc._status = state
        assert (nc.is_connected and not nc.is_draining_pubs) == (state in natsio._OPEN), state
    nc._status = Client.DISCONNECTED
    # A fast-path Message has the fields of nats-py's Msg that handlers read.
    fields = {field.name for field in dataclasses.fields(nc.msg_class)}
    assert set(natsio.Message.__struct_fields__) <= fields
    # The direct reader: what nats-py's TCP transport keeps, and what a StreamReader buffers.
    from nats.aio.transport import TcpTransport

    transport = TcpTransport()
    assert transport._io_reader is None and transport._io_writer is None
    # StreamReader._buffer is checked on a live connection in the direct reader's test.
    # Subscription._id is checked on a live subscription in `collect` below.


async def collect(nc: Client, subject: str) -> tuple[list[Msg], Subscription]:
    got: list[Msg] = []
    sub = await fast_path(nc).subscribe(subject, got.append)
    await ensure_subscribed(nc)
    assert fast_path(nc)._handlers[b"%d" % sub._id][0] == sub._id  # Subscription._id, live
    assert sub._conn is nc  # and of Subscription._conn (stop_taking)
    return got, sub


async def test_messages_reach_a_fast_handler_whole_and_in_order(nats_url, client):
    nc = await nats.connect(nats_url)
    try:
        path = fast_path(nc)
        assert path.enabled and isinstance(nc._ps, natsio._FastParser)
        got, _ = await collect(nc, "fast.in")
        big = bytes(range(256)) * 1024  # 256 KiB: spans many socket reads
        for i in range(500):
            await client.publish("fast.in", str(i).encode(), reply=f"r.{i}" if i % 2 else "")
        await client.publish("fast.in", big, headers={"Lifeline-Request-Id": "x", "k": " v "})
        await client.flush()
        await wait_for(lambda: len(got) == 501)
        assert [m.data for m in got[:500]] == [str(i).encode() for i in range(500)]
        assert [m.reply for m in got[:4]] == ["", "r.1", "", "r.3"]
        assert got[500].data == big and got[500].headers == {"Lifeline-Request-Id": "x", "k": "v"}
        assert got[500].subject == "fast.in"
        assert nc.stats["in_msgs"] >= 501
    finally:
        await nc.close()


async def test_a_reply_with_a_status_line_goes_through_nats_py(nats_url):
    """No responders: the server answers with 'NATS/1.0 503'; nats-py's parser reads it."""
    nc = await nats.connect(nats_url)
    try:
        got, _ = await collect(nc, "_INBOX.t.*")
        assert fast_path(nc).publish(
            "nobody.listens", b"hi", reply="_INBOX.t.1", headers={"a": "b"}
        )
        await wait_for(lambda: len(got) == 1)
        assert got[0].headers is not None and got[0].headers.get("Status") == "503"
    finally:
        await nc.close()


async def test_fast_publishes_arrive_as_nats_py_would_send_them(nats_url, client):
    received: list[Msg] = []

    async def receive(msg: Msg) -> None:
        received.append(msg)

    await client.subscribe("fast.out", cb=receive)
    await ensure_subscribed(client)
    nc = await nats.connect(nats_url)
    try:
        path = fast_path(nc)
        assert path.publish("fast.out", b"one")
        assert path.publish("fast.out", b"two", reply="back", headers={"Trace": "t", "n": "1"})
        # A value nats-py would rewrite (a newline) is left to nats-py's publish.
        assert not path.publish("fast.out", b"three", headers={"bad": "a\nb"})
        await nc.publish("fast.out", b"three", headers={"bad": "a\nb"})
        await nc.flush()
        await wait_for(lambda: len(received) == 3)
    finally:
        await nc.close()
    assert [m.data for m in received] == [b"one", b"two", b"three"]
    assert (received[1].reply, received[1].headers) == ("back", {"Trace": "t", "n": "1"})


async def test_nats_pys_stats_count_the_fast_paths_messages_and_bytes(nats_url, client):
    """Counted once a read and once a write rather than once a message: the totals nats-py
    would have counted, its payloads' bytes without headers or protocol."""
    nc = await nats.connect(nats_url)
    try:
        got, _ = await collect(nc, "fast.stats")
        before = dict(nc.stats)
        payloads = [str(i).encode() * (i % 7) for i in range(300)]
        for payload in payloads:  # one flush: many to a read
            await client.publish("fast.stats", payload)
        await client.publish("fast.stats", b"headed", headers={"k": "v"})
        await client.flush()
        await wait_for(lambda: len(got) == 301)
        assert nc.stats["in_msgs"] - before["in_msgs"] == 301
        assert nc.stats["in_bytes"] - before["in_bytes"] == sum(map(len, payloads)) + 6
        path = fast_path(nc)
        for payload in payloads:  # one turn: one write
            assert path.publish("fast.elsewhere", payload)
        assert path.publish("fast.elsewhere", b"headed", headers={"k": "v"})
        await nc.flush()
        assert nc.stats["out_msgs"] - before["out_msgs"] == 301
        assert nc.stats["out_bytes"] - before["out_bytes"] == sum(map(len, payloads)) + 6
    finally:
        await nc.close()


async def test_a_closed_connection_publishes_nothing_through_the_fast_path(nats_url):
    nc = await nats.connect(nats_url)
    path = fast_path(nc)
    await nc.close()
    assert path.publish("fast.out", b"late") is False


async def test_a_drained_fast_subscription_hears_nothing_more(nats_url, client):
    nc = await nats.connect(nats_url)
    try:
        got, sub = await collect(nc, "fast.drain")
        await client.publish("fast.drain", b"before")
        await client.flush()
        await wait_for(lambda: len(got) == 1)
        await stop_taking(sub)
        markers, _ = await collect(nc, "fast.marker")
        await client.publish("fast.drain", b"after")
        await client.publish("fast.marker", b"")  # the server sends it after "after", if any
        await wait_for(lambda: len(markers) == 1)
        assert [m.data for m in got] == [b"before"]
    finally:
        await nc.close()


async def test_stopping_a_subscription_sends_its_unsub_before_the_ping_that_confirms_it(
    nats_url, client
):
    """nats-py's drain() queues its UNSUB and then writes its flush's PING straight to the
    socket, ahead of it: the server answers that PING before it has seen the UNSUB, and a
    request it routes in between reaches a subscription drain() has removed, dropped with
    neither a reply nor an audit event. stop_taking gets the UNSUB to the server first."""
    nc = await nats.connect(nats_url)
    try:
        got, sub = await collect(nc, "fast.stop")
        written: list[bytes] = []
        transport = nc._transport
        write, writelines = transport.write, transport.writelines

        def recording_write(data: bytes) -> None:
            written.append(bytes(data))
            write(data)

        def recording_writelines(lines: list[bytes]) -> None:
            written.extend(bytes(line) for line in lines)
            writelines(lines)

        transport.write, transport.writelines = recording_write, recording_writelines
        await stop_taking(sub)
        commands = [line.split(b" ")[0] for chunk in written for line in chunk.splitlines()]
        unsub = commands.index(b"UNSUB")
        assert b"PING" in commands[unsub:], commands  # a PONG confirms the server had it
        # The connection is fine (a second UNSUB drain() may send is no error) and the
        # subscription is gone.
        await client.publish("fast.stop", b"after")
        markers, _ = await collect(nc, "fast.marker")
        await client.publish("fast.marker", b"")
        await wait_for(lambda: len(markers) == 1)
        assert got == [] and nc.stats["errors_received"] == 0 and nc.is_connected
    finally:
        await nc.close()


async def test_a_handler_that_raises_does_not_stop_the_connection_reading(nats_url, client):
    nc = await nats.connect(nats_url)
    got: list[bytes] = []

    def handler(msg: Msg) -> None:
        if msg.data == b"boom":
            raise RuntimeError("a bug in a handler")
        got.append(msg.data)

    try:
        await fast_path(nc).subscribe("fast.bug", handler)
        await ensure_subscribed(nc)
        for data in (b"one", b"boom", b"two"):
            await client.publish("fast.bug", data)
        await client.flush()
        await wait_for(lambda: got == [b"one", b"two"], what="the messages after the bug")
    finally:
        await nc.close()


async def test_a_connection_draining_its_publishes_takes_none_through_the_fast_path(nats_url):
    """nats-py refuses publishes once a drain reaches its publishes; so does the fast path."""
    nc = await nats.connect(nats_url)
    try:
        path = fast_path(nc)
        assert path.publish("fast.out", b"before")
        nc._status = Client.DRAINING_PUBS  # the state nats-py's drain() is in at that point
        assert path.publish("fast.out", b"during") is False
        nc._status = Client.CONNECTED
    finally:
        await nc.close()


async def test_an_unsubscribed_fast_handler_hears_nothing_and_is_forgotten(nats_url, client):
    nc = await nats.connect(nats_url)
    try:
        got, sub = await collect(nc, "fast.gone")
        await sub.unsubscribe()
        await client.publish("fast.gone", b"late")  # may still reach the client's parser
        markers, _ = await collect(nc, "fast.marker")
        await client.publish("fast.marker", b"")
        await wait_for(lambda: len(markers) == 1)
        assert got == []
        await collect(nc, "fast.again")  # a new subscription prunes the handlers of gone ones
        assert b"%d" % sub._id not in fast_path(nc)._handlers
    finally:
        await nc.close()


async def test_an_urgent_message_is_written_at_once_only_when_traffic_is_light(nats_url, client):
    """A reply or an attempt (urgent) goes out at once when traffic is light (reads bring one
    message at a time, or the connection's owner works on at most two requests) and it is the
    first of its event-loop turn; later ones in the turn (a burst of timeouts),
    and every one when reads bring several, wait for the turn's one write. Either way the
    messages keep their order."""
    received: list[bytes] = []

    async def receive(msg: Msg) -> None:
        received.append(msg.data)

    await client.subscribe("fast.urgent", cb=receive)
    await ensure_subscribed(client)
    nc = await nats.connect(nats_url)
    try:
        path = fast_path(nc)
        await asyncio.sleep(0)  # a turn of its own
        path.last_read = 1  # light traffic
        assert path.publish("fast.urgent", b"1", urgent=True)
        assert not nc._pending  # written at once
        assert path.publish("fast.urgent", b"2", urgent=True)
        assert nc._pending  # the same turn: waits for its write
        await asyncio.sleep(0)
        assert not nc._pending
        path.last_read = 5  # the last read brought five messages: busy
        assert path.publish("fast.urgent", b"3", urgent=True)
        assert nc._pending
        await asyncio.sleep(0)
        # An owner that counts its requests (a dispatcher, a worker) decides instead: light
        # while it works on at most two, whatever the last read brought.
        in_flight = [1]
        path.in_flight = lambda: in_flight[0]
        assert path.publish("fast.urgent", b"4", urgent=True)
        assert not nc._pending
        await asyncio.sleep(0)
        in_flight[0] = 64
        path.last_read = 1
        assert path.publish("fast.urgent", b"5", urgent=True)
        assert nc._pending
        await nc.flush()
        await wait_for(lambda: len(received) == 5)
    finally:
        await nc.close()
    assert received == [b"1", b"2", b"3", b"4", b"5"]


async def test_the_fast_path_counts_the_messages_each_read_brings(nats_url, client):
    nc = await nats.connect(nats_url)
    try:
        path = fast_path(nc)
        seen: list[int] = []
        await path.subscribe("fast.count", lambda msg: seen.append(path.last_read))
        await ensure_subscribed(nc)
        await client.publish("fast.count", b"alone")
        await client.flush()
        await wait_for(lambda: len(seen) == 1)
        assert seen == [1]
        for i in range(300):  # one flush: they arrive in a few reads, many to a read
            await client.publish("fast.count", str(i).encode())
        await client.flush()
        await wait_for(lambda: len(seen) == 301)
        assert max(seen) > 1
    finally:
        await nc.close()


async def test_header_names_seen_before_are_still_checked_line_by_line(nats_url):
    """Names already seen skip the name check; a line without a colon still goes to nats-py's
    own parser, even when its text is a name seen before."""
    nc = await nats.connect(nats_url)
    try:
        block = b"NATS/1.0\r\nLifeline-Seen: 1\r\n\r\n"
        assert natsio._plain_headers(nc, block) == {"Lifeline-Seen": "1"}
        assert natsio._plain_headers(nc, block) == {"Lifeline-Seen": "1"}
        odd = b"NATS/1.0\r\nLifeline-Seen\r\n\r\n"
        assert natsio._plain_headers(nc, odd) == (nc._parse_header_lines(odd[10:]) or None)
    finally:
        await nc.close()


def test_header_blocks_read_as_nats_py_reads_them():
    """The fast path's header parse gives what nats-py's own parser gives, for the blocks
    Lifeline sends and for odd ones: invalid UTF-8 in a value or a name, whitespace bytes
    that bytes.strip() and str.strip() treat differently, names without a value, spaces
    around a name, a name nats-py skips."""
    from nats.aio.client import Client

    values = [b"1", b" v ", b"\xe2\x82", b"a\xffb", b"x\x1c", b"\x85y", b"\xc2\xa0", b"", b"a:b"]
    names = [b"Lifeline-Deadline-Ms", b"traceparent", b"X-Made-Up", b" Spaced ", b"N\xc3\xa9"]
    lines = [name + b":" + value for name in names for value in values]
    lines += [b"no colon", b"Bad Name: 1", b"\x01Ctl: 2"]
    random = __import__("random").Random(7)
    for _ in range(2000):
        block = b"NATS/1.0\r\n" + b"".join(
            line + b"\r\n" for line in random.sample(lines, random.randint(1, 5))
        )
        block += b"\r\n"
        assert natsio._plain_headers(Client, block) == (
            Client._parse_header_lines(block[10:]) or None
        ), block


async def test_an_attempts_header_block_is_written_in_one_go_as_header_block_writes_it():
    """The engine's attempts (its four headers, as its real _attempt_span makes them) get their
    header block from transport.attempt_block, byte for byte what natsio.header_block writes;
    headers it does not know, or a request id header_block would write otherwise (it strips
    values; a line break must be refused), are left to header_block."""
    from schemas import ProviderOk, Usage
    from schemas.subjects import REQUEST_ID, TRACESTATE
    from service.config import parse_config
    from service.engine import Engine, Inbound
    from service.health import Health
    from service.telemetry import Tracing
    from service.transport import attempt_block
    from tests.bench.cases import FULL, completion_request, lifeline_config

    answer = ProviderOk(content="Hello", model="fake-1", usage=Usage(1, 1))
    sent: list[dict[str, str]] = []

    class Transport:  # what the engine's attempt hands the transport
        max_payload = 1 << 20

        async def ask_provider(self, provider, payload, timeout_s, headers, own_timeout_s=None):
            sent.append(dict(headers))
            return answer

        async def audit(self, event, msg_id=None):
            pass

    async def respond(reply):
        return reply

    engine = Engine(
        parse_config(lifeline_config(FULL)), Transport(), Health(), Tracing().recorder("t")
    )
    await engine.serve(Inbound(completion_request("main"), None, time.monotonic()), respond)
    [headers] = sent
    block = attempt_block(headers)
    assert block is not None and block == natsio.header_block(headers)
    for request_id in (" r", "r ", "r\r\nX-Evil: 1", "r\n", "\rr"):
        assert attempt_block({**headers, REQUEST_ID: request_id}) is None
    assert attempt_block({**headers, TRACESTATE: "a=b"}) is None
    assert attempt_block({k: v for k, v in headers.items() if k != REQUEST_ID}) is None
    assert attempt_block({**headers, REQUEST_ID: "r-é"}) == natsio.header_block(
        {**headers, REQUEST_ID: "r-é"}
    )


async def test_a_write_that_fails_leaves_its_messages_to_nats_pys_reconnect(nats_url):
    """The socket can close before nats-py notices; an urgent write then must not raise into
    the request that published, and what it held goes back to nats-py's pending buffer, which
    nats-py sends after it reconnects."""
    nc = await nats.connect(nats_url)
    try:
        path = fast_path(nc)
        await asyncio.sleep(0)
        real = nc._transport.writelines

        def closed(_: object) -> None:
            raise RuntimeError("unable to perform operation: the handler is closed")

        nc._transport.writelines = closed
        path.last_read = 1
        assert path.publish("fast.lost", b"kept", urgent=True)
        assert nc._pending and nc._pending[-1].endswith(b"kept\r\n")
        assert nc._pending_data_size == sum(len(cmd) for cmd in nc._pending)
        nc._transport.writelines = real
    finally:
        await nc.close()


async def test_a_connection_closed_while_its_server_is_gone_closes_whole():
    """nats-py's own close, while it reconnects, writes what it buffered into the dead
    transport and raises there (ConnectionResetError; TypeError on Python 3.13), before its
    closed callback and with the socket left open. natsio.close drops what cannot be sent and
    closes whole."""
    server = EmbeddedNats(port=-1)
    server.start()
    closed = asyncio.Event()

    async def on_closed() -> None:
        closed.set()

    async def ignore(msg: Msg) -> None:
        pass

    try:
        nc = await nats.connect(
            server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1, closed_cb=on_closed
        )
        await nc.subscribe("gone.soon", cb=ignore)
        await ensure_subscribed(nc)
        server.stop()
        await wait_for(lambda: nc.is_reconnecting, 5, "nats-py noticing the server is gone")
        await nc.publish("buffered.for.later", b"never sent")  # waits in nats-py's buffer
        transport = nc._transport
        await asyncio.wait_for(natsio.close(nc), 5)
        assert nc.is_closed and closed.is_set()
        assert transport is None or nc._transport is None or transport._io_writer.is_closing()
    finally:
        server.stop()


async def test_a_fast_subscriptions_messages_keep_their_order_around_other_frames(nats_url):
    """A frame nats-py parses (a message for one of its own subscriptions, a PING) before a
    fast-path message: that message must not be queued behind nats-py's while the next read's
    are handed over at once (a stream's chunks out of order, an abort before its request)."""
    nc = await nats.connect(nats_url)
    try:
        got: list[bytes] = []
        fast = await fast_path(nc).subscribe("fast.in", lambda msg: got.append(msg.data))

        async def on_plain(msg: Msg) -> None:
            pass

        plain = await nc.subscribe("plain.x", cb=on_plain)
        await ensure_subscribed(nc)
        f, p = fast._id, plain._id
        # Two reads handed over back to back, as the read loop does when both are buffered.
        await nc._ps.parse(b"MSG plain.x %d 1\r\nS\r\nPING\r\nMSG fast.in %d 1\r\n1\r\n" % (p, f))
        await nc._ps.parse(b"MSG fast.in %d 1\r\n2\r\n" % f)
        await wait_for(lambda: len(got) == 2)
        assert got == [b"1", b"2"]
    finally:
        await nc.close()


async def test_a_flood_mixed_with_other_subscriptions_arrives_in_order(nats_url, client):
    nc = await nats.connect(nats_url)
    try:
        got: list[int] = []
        await fast_path(nc).subscribe("fast.in", lambda msg: got.append(int(msg.data[:8])))

        async def on_plain(msg: Msg) -> None:
            pass

        await nc.subscribe("plain.x", cb=on_plain)
        await ensure_subscribed(nc)
        sent = 0
        for _ in range(20):
            for _ in range(3):
                await client.publish("plain.x", b"s")
            for _ in range(300):
                await client.publish("fast.in", b"%08d" % sent + b"x" * 200)
                sent += 1
        await client.flush()
        await wait_for(lambda: len(got) == sent, timeout_s=20)
        assert got == sorted(got)
    finally:
        await nc.close()


async def test_a_control_line_longer_than_nats_pys_limit_arriving_in_parts_is_waited_for(
    nats_url,
):
    """An INFO of a large cluster can pass 4,096 bytes; cut across reads, its first part has
    no line end yet: the parser waits for the rest (it must not spin on it), then goes on."""
    nc = await nats.connect(nats_url)
    try:
        got: list[bytes] = []
        fast = await fast_path(nc).subscribe("fast.in", lambda msg: got.append(msg.data))
        await ensure_subscribed(nc)
        info = b'INFO {"server_id":"x","pad":"' + b"p" * 6000 + b'"}\r\n'
        await asyncio.wait_for(nc._ps.parse(info[:5000]), 2)
        await asyncio.wait_for(
            nc._ps.parse(info[5000:] + b"MSG fast.in %d 1\r\n1\r\n" % fast._id), 2
        )
        await wait_for(lambda: got == [b"1"])
    finally:
        await nc.close()


async def test_fast_messages_are_handled_from_the_socket_without_nats_pys_read_loop(
    nats_url, client
):
    """While nats-py's read loop has nothing of its own to parse, a fast-path message reaches
    its handler from the socket's callback (no task runs it: a turn of the loop sooner); a
    frame nats-py must parse, and what follows it, still goes through the read loop, in order;
    a reconnect's new socket gets the direct reader too."""
    nc = await nats.connect(nats_url, reconnect_time_wait=0.05)
    try:
        path = fast_path(nc)
        got: list[tuple[bytes, bool]] = []
        await path.subscribe(
            "fast.direct", lambda msg: got.append((msg.data, asyncio.current_task() is None))
        )
        plain: list[bytes] = []

        async def on_plain(msg: Msg) -> None:
            plain.append(msg.data)

        await nc.subscribe("plain.direct", cb=on_plain)
        await ensure_subscribed(nc)
        assert isinstance(nc._transport._io_writer.transport.get_protocol(), natsio._DirectReader)
        assert isinstance(nc._transport._io_reader._buffer, bytearray)
        await client.publish("fast.direct", b"1")
        await client.flush()
        await wait_for(lambda: len(got) == 1)
        assert got == [(b"1", True)]  # from the socket's callback, outside any task
        for i in range(2, 200):  # nats-py's frames among them: the order holds
            if i % 10 == 0:
                await client.publish("plain.direct", b"p")
            await client.publish("fast.direct", str(i).encode())
        await client.flush()
        await wait_for(lambda: len(got) == 199 and len(plain) == 19)
        assert [int(data) for data, _ in got] == list(range(1, 200))

        old = nc._transport._io_reader
        nc._transport._io_writer.transport.abort()  # the socket goes: nats-py reconnects
        await wait_for(lambda: nc.is_connected and nc._transport._io_reader is not old)
        await ensure_subscribed(nc)
        for i in range(3):  # the first read on the new socket installs it
            await client.publish("fast.direct", b"again")
            await client.flush()
        await wait_for(lambda: len(got) == 202)
        assert isinstance(nc._transport._io_writer.transport.get_protocol(), natsio._DirectReader)
        await client.publish("fast.direct", b"direct again")
        await client.flush()
        await wait_for(lambda: len(got) == 203)
        assert got[-1] == (b"direct again", True)
    finally:
        await nc.close()


async def test_the_direct_reader_keeps_every_frame_whole_and_in_order_however_reads_split_them(
    nats_url,
):
    """Reads end anywhere: in a message's control line, its headers, its payload. The direct
    reader hands the complete fast-path messages at the front of a read over at once and
    gives the rest (a frame for nats-py, or the start of one still on its way) to nats-py's
    read loop, and takes over again once that has caught up: nothing is lost or reordered."""
    import random

    nc = await nats.connect(nats_url)
    try:
        got: list[tuple[int, dict[str, str] | None]] = []
        fast = await fast_path(nc).subscribe(
            "fast.split", lambda msg: got.append((int(msg.data), msg.headers))
        )
        plain: list[bytes] = []

        async def on_plain(msg: Msg) -> None:
            plain.append(msg.data)

        other = await nc.subscribe("plain.split", cb=on_plain)
        await ensure_subscribed(nc)
        frames = []
        for i in range(400):
            body = str(i).encode()
            if i % 3:
                frames.append(b"MSG fast.split %d %d\r\n%s\r\n" % (fast._id, len(body), body))
            else:
                block = b"NATS/1.0\r\nLifeline-Seq: %d\r\n\r\n" % i
                frames.append(
                    b"HMSG fast.split %d %d %d\r\n%s%s\r\n"
                    % (fast._id, len(block), len(block) + len(body), block, body)
                )
            if i % 25 == 0:
                frames.append(b"MSG plain.split %d 1\r\nP\r\n" % other._id)
        stream = b"".join(frames)
        direct = nc._transport._io_writer.transport.get_protocol()
        assert isinstance(direct, natsio._DirectReader)
        cut = random.Random(7)
        at = 0
        while at < len(stream):
            step = cut.choice([1, 2, 7, 19, 40, 333])
            direct.data_received(stream[at : at + step])
            at += step
            if cut.random() < 0.3:
                await asyncio.sleep(0)  # the read loop runs now and then, as it would
        await wait_for(lambda: len(got) == 400 and len(plain) == 16)
        assert [i for i, _ in got] == list(range(400))
        assert all(headers == {"Lifeline-Seq": str(i)} for i, headers in got if i % 3 == 0)
    finally:
        await nc.close()


UNREADABLE = {
    "status line not UTF-8": hpub(b"SUBJECT", b"NATS/1.0 \xff\r\n\r\n"),
    "description not UTF-8": hpub(b"SUBJECT", b"NATS/1.0 503 \xff\xfe\r\n\r\n"),
    "header block cut short": hpub(b"SUBJECT", b"NATS/1.0"),
    "reply subject not UTF-8": b"PUB SUBJECT _INBOX.\xff\xfe 2\r\nhi\r\n",
}


async def test_messages_nats_py_cannot_read_reach_the_fast_path_and_the_connection_reads_on(
    nats_url, client
):
    """Any client may publish them; raised inside nats-py's read loop, each ended it for good
    while the process stayed up and ready by every probe: a dispatcher deaf to every request,
    a worker to every call. The fast path reads them all (a request with a status line of odd
    bytes was dropped there too: no reply, no audit); nats-py's own subscriptions get those
    whose header block is the trouble, written again as one nats-py reads (a job with one was
    dropped at every delivery, so delivered again for good), and lose the one whose reply
    subject is not UTF-8 (where it would go cannot be told)."""
    fast_seen: list[Msg] = []
    nc = await nats.connect(nats_url)
    path = fast_path(nc)
    await path.subscribe("fast", fast_seen.append)
    plain = await nc.subscribe("plain")
    await ensure_subscribed(nc)
    before = natsio._unreadable.dropped
    for subject in (b"fast", b"plain"):
        await raw_publish(nats_url, [f.replace(b"SUBJECT", subject) for f in UNREADABLE.values()])
    await client.publish("fast", b"after")
    await client.publish("plain", b"after")
    await wait_for(lambda: any(m.data == b"after" for m in fast_seen), timeout_s=5)
    plain_seen = [await plain.next_msg(timeout=5) for _ in range(4)]
    assert plain_seen[-1].data == b"after"
    await nc.flush(timeout=5)  # its read loop still takes PONGs
    # On the fast path a reply subject that is not UTF-8 comes through as surrogates, for the
    # dispatcher to refuse (and audit), a status line as nats-py would read a good one; all
    # four dropped on nats-py's.
    assert [(m.headers, m.reply) for m in fast_seen if m.data != b"after"] == [
        (None, ""),
        ({"Status": "503", "Description": "\ufffd\ufffd"}, ""),
        (None, ""),
        (None, "_INBOX.\udcff\udcfe"),
    ]
    assert [m.headers for m in plain_seen[:3]] == [
        None,
        {"Status": "503", "Description": "\ufffd\ufffd"},
        None,
    ]
    assert natsio._unreadable.dropped - before == 1
    await nc.close()


async def test_a_header_block_that_is_no_nats_one_is_delivered_without_headers(nats_url, client):
    """A block not starting NATS/1.0 (empty lines, a word): nats-py reads such a block from its
    11th byte, and one shorter raised IndexError there: the message, whole and with its reply
    subject, was dropped, and a request got no reply and no audit event."""
    seen: list[Msg] = []
    nc = await nats.connect(nats_url)
    await fast_path(nc).subscribe("fast", seen.append)
    await ensure_subscribed(nc)
    blocks = (b"\r\n\r\n", b"x\r\n\r\n", b"NATS\r\n\r\n", b"HELLO\r\nX: y\r\n\r\n")
    await raw_publish(nats_url, [hpub(b"fast", block, b"hi") for block in blocks])
    await wait_for(lambda: len(seen) == len(blocks), timeout_s=5, what=lambda: f"{seen}")
    assert [(m.headers, m.data) for m in seen] == [(None, b"hi")] * len(blocks)
    await nc.close()
