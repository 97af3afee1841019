"""The dispatcher's NATS seam: ask a provider worker, answer a client, publish audit.

Transport outcomes become ProviderFailures here, so the fallback loop sees one shape:
no worker subscribed -> "no_responders" at once; no reply in time -> "timeout". A reply
that arrives after its attempt was given up is dropped by nats-py (its inbox token is gone),
and the worker is told to cancel it, so no abandoned HTTP call keeps running and billing.

Every message leaves through a size check against the server's max_payload (headers
included): one message over it makes the server close the whole connection, which would
take every other request in flight down with it.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from schemas import (
    Attempt,
    AuditEvent,
    CompletionReply,
    ErrorInfo,
    ProviderFailure,
    ProviderOk,
    ProviderReply,
)
from schemas.subjects import ATTEMPT_ID, audit_subject, cancel_subject, provider_subject
from schemas.wire import REPLY_TOO_LARGE, encoder, message_bytes, provider_reply_decoder
from service.natsio import fast_path, publish_checked

log = logging.getLogger("lifeline.transport")

# What a worker's reply may put into replies and audit events: its texts are untrusted input.
MAX_MESSAGE_CHARS = 1000
MAX_MODEL_CHARS = 256


class NatsTransport:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._inbox = _Inbox(nc)

    @property
    def max_payload(self) -> int:
        """The server's limit on one message, headers included (from its INFO)."""
        return self.nc.max_payload

    async def start(self) -> None:
        await self._inbox.start()

    async def ask_provider(
        self, provider: str, payload: bytes, timeout_s: float, headers: dict[str, str]
    ) -> ProviderReply:
        """One attempt; `headers` carry its Lifeline-Attempt-Id, which a cancel names."""
        subject = provider_subject(provider)
        size = message_bytes(payload, headers)
        if size > self.nc.max_payload:  # e.g. a template made it longer: never send it
            return ProviderFailure(
                "bad_request",
                f"the request for {provider} is {size} bytes with headers, above the NATS "
                f"server's max_payload of {self.nc.max_payload}; shorten the messages or the "
                "target's template",
            )
        try:
            msg = await self._inbox.request(subject, payload, timeout_s, headers)
        except NoRespondersError:
            return ProviderFailure(
                "no_responders",
                f"no worker is listening on {subject}: start one with `lifeline worker {provider}`",
            )
        except NatsTimeoutError:
            await self.cancel(provider, headers[ATTEMPT_ID])
            return ProviderFailure("timeout", f"no reply from {subject} within {timeout_s:.3g} s")
        except asyncio.CancelledError:  # e.g. a hedge lost, or a dispatcher shutting down
            await asyncio.shield(self.cancel(provider, headers[ATTEMPT_ID]))
            raise
        except NatsError as exc:  # the connection is closed or cannot buffer: this attempt failed
            return ProviderFailure("connection", f"could not ask {subject}: {type(exc).__name__}")
        try:
            return _bounded(provider_reply_decoder.decode(msg.data))
        except (msgspec.DecodeError, RecursionError) as exc:
            message = f"worker on {subject} sent a reply that breaks the protocol: {exc}"
            return ProviderFailure("server_error", message[:MAX_MESSAGE_CHARS])

    async def cancel(self, provider: str, attempt_id: str) -> None:
        """Tell the worker running `attempt_id` that nobody waits for it: it aborts the HTTP
        call."""
        try:
            await self.nc.publish(cancel_subject(provider), attempt_id.encode())
        except NatsError:
            pass  # no connection: the worker drops the call at its deadline anyway

    async def answer(self, reply_subject: str, reply: CompletionReply) -> CompletionReply:
        """Send `reply`, or, when it would not fit max_payload, an error reply that does.
        Returns what was sent (the audit event must say the same)."""
        payload = encoder.encode(reply)
        if len(payload) > self.nc.max_payload:
            reply = _too_large(reply, len(payload), self.nc.max_payload)
            payload = _fitting(reply, self.nc.max_payload)
        await publish_checked(self.nc, reply_subject, payload, f"the reply to {reply.id!r}")
        return reply

    async def audit(self, event: AuditEvent) -> None:
        await publish_checked(
            self.nc,
            audit_subject(event.status),
            _fitting(event, self.nc.max_payload),
            "an audit event",
        )


def _bounded(reply: ProviderReply) -> ProviderReply:
    """A worker's reply with its free texts cut to a size that replies and audit events can
    carry."""
    if isinstance(reply, ProviderOk):
        if len(reply.model) > MAX_MODEL_CHARS:
            return msgspec.structs.replace(reply, model=reply.model[:MAX_MODEL_CHARS])
        return reply
    if len(reply.message) > MAX_MESSAGE_CHARS or len(reply.kind) > 64:
        return msgspec.structs.replace(
            reply, kind=reply.kind[:64], message=reply.message[:MAX_MESSAGE_CHARS]
        )
    return reply


def _too_large(reply: CompletionReply, size: int, max_payload: int) -> CompletionReply:
    who = f" from {reply.target or reply.provider}" if reply.provider else ""
    message = (
        f"the answer{who} makes a reply of {size} bytes, above the NATS server's max_payload of "
        f"{max_payload}; "
        "ask for fewer max_tokens, or raise max_payload in nats-server's config"
    )
    return msgspec.structs.replace(
        reply, status="error", content=None, error=ErrorInfo(REPLY_TOO_LARGE, message)
    )


def _fitting(message: CompletionReply | AuditEvent, max_payload: int) -> bytes:
    """The encoded message, with its attempts' texts and then its attempts dropped if that is
    what it takes to fit (ids, error types and status always stay)."""
    payload = encoder.encode(message)
    if len(payload) <= max_payload:
        return payload
    attempts: list[Attempt] = [msgspec.structs.replace(a, message=None) for a in message.attempts]
    payload = encoder.encode(msgspec.structs.replace(message, attempts=attempts))
    if len(payload) <= max_payload:
        return payload
    return encoder.encode(msgspec.structs.replace(message, attempts=[]))


class _Inbox:
    """Request/reply for the attempts: one wildcard subscription takes every reply, and each
    attempt waits on a future with one timer (what nats-py's request() does with a random
    token, a done-callback and asyncio.wait_for per call, which cost a tenth of the
    dispatcher's CPU at 64 in flight). A reply after its attempt gave up finds no future
    and is dropped."""

    __slots__ = ("_count", "_nc", "_prefix", "_sub", "_waiting")

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = ""
        self._count = 0
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._sub: Subscription | None = None

    async def start(self) -> None:
        if self._sub is None:
            self._prefix = self._nc.new_inbox() + "."
            self._sub = await fast_path(self._nc).subscribe(self._prefix + "*", self._on_reply)

    def _on_reply(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def request(
        self, subject: str, payload: bytes, timeout_s: float, headers: dict[str, str]
    ) -> Msg:
        if self._sub is None:
            await self.start()
        self._count += 1
        token = str(self._count)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = future
        timer = loop.call_later(timeout_s, _expire, future)
        try:
            inbox = self._prefix + token
            if not fast_path(self._nc).publish(subject, payload, inbox, headers):
                await self._nc.publish(subject, payload, reply=inbox, headers=headers)
            msg = await future
        finally:
            timer.cancel()
            self._waiting.pop(token, None)
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            raise NoRespondersError
        return msg


_NO_RESPONDERS = "503"  # the status the server answers with when nobody is subscribed


def _expire(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(NatsTimeoutError())
