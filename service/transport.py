"""The dispatcher's NATS seam: ask a provider worker, answer a client, publish audit.

Transport outcomes become ProviderFailures here, so the fallback loop sees one shape:
no worker subscribed -> "no_responders" at once; no reply in time -> "timeout". A reply
that arrives after its attempt was given up is dropped by nats-py (its inbox token is gone),
and the worker is told to cancel it, so no abandoned HTTP call keeps running and billing.
"""

from __future__ import annotations

import asyncio

import msgspec
from nats.aio.client import Client
from nats.errors import NoRespondersError, TimeoutError as NatsTimeoutError

from schemas import AuditEvent, CompletionReply, ProviderFailure, ProviderReply
from schemas.subjects import ATTEMPT_ID, audit_subject, cancel_subject, provider_subject
from schemas.wire import encoder, provider_reply_decoder


async def ensure_subscribed(nc: Client) -> None:
    """Return once the server has registered every subscription made so far on `nc`.

    One flush is not enough with nats-py 2.16: flush() writes its PING straight to the
    socket, ahead of a SUB still waiting in the pending buffer, so the PONG can come back
    before the server has seen the SUB. The first flush pushes the buffer out; the second
    PING then travels behind the SUB.
    """
    await nc.flush()
    await nc.flush()


class NatsTransport:
    def __init__(self, nc: Client) -> None:
        self.nc = nc

    async def ask_provider(
        self, provider: str, payload: bytes, timeout_s: float, headers: dict[str, str]
    ) -> ProviderReply:
        """One attempt; `headers` carry its Lifeline-Attempt-Id, which a cancel names."""
        subject = provider_subject(provider)
        try:
            msg = await self.nc.request(subject, payload, timeout=timeout_s, headers=headers)
        except NoRespondersError:
            return ProviderFailure(
                "no_responders", f"no worker is listening on {subject}: start one with `lifeline worker {provider}`"
            )
        except NatsTimeoutError:
            await self.cancel(provider, headers[ATTEMPT_ID])
            return ProviderFailure("timeout", f"no reply from {subject} within {timeout_s:.3g} s")
        except asyncio.CancelledError:
            await asyncio.shield(self.cancel(provider, headers[ATTEMPT_ID]))  # e.g. a dispatcher shutting down
            raise
        try:
            return provider_reply_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            return ProviderFailure("server_error", f"worker on {subject} sent a reply that breaks the protocol: {exc}")

    async def cancel(self, provider: str, attempt_id: str) -> None:
        """Tell the worker running `attempt_id` that nobody waits for it: it aborts the HTTP call."""
        await self.nc.publish(cancel_subject(provider), attempt_id.encode())

    async def answer(self, reply_subject: str, reply: CompletionReply) -> None:
        await self.nc.publish(reply_subject, encoder.encode(reply))

    async def audit(self, event: AuditEvent) -> None:
        await self.nc.publish(audit_subject(event.status), encoder.encode(event))
