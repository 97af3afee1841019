"""NATS helpers both sides use, the dispatcher and the workers: a low module that imports
nothing of Lifeline but the wire (see the layers in pyproject.toml's [tool.importlinter])."""

from __future__ import annotations

import logging

from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from schemas.wire import message_bytes

log = logging.getLogger("lifeline.nats")


async def ensure_subscribed(nc: Client) -> None:
    """Return once the server has registered every subscription made so far on `nc`.

    One flush is not enough with nats-py 2.16: flush() writes its PING straight to the
    socket, ahead of a SUB still waiting in the pending buffer, so the PONG can come back
    before the server has seen the SUB. The first flush pushes the buffer out; the second
    PING then travels behind the SUB.
    """
    await nc.flush()
    await nc.flush()


async def publish_checked(nc: Client, subject: str, payload: bytes, what: str) -> bool:
    """Publish unless the message cannot go out; a failure is logged, never raised."""
    if message_bytes(payload) > nc.max_payload:
        log.error(
            "not publishing %s on %s: %d bytes, above max_payload %d",
            what,
            subject,
            len(payload),
            nc.max_payload,
        )
        return False
    try:
        await nc.publish(subject, payload)
    except NatsError as exc:  # closed, draining, or reconnecting with the pending buffer full
        log.warning("could not publish %s on %s: %s", what, subject, type(exc).__name__)
        return False
    return True


async def stop_taking(sub: Subscription) -> None:
    """Stop a subscription's intake but handle what it has already received: `unsubscribe()`
    would drop the messages still queued in nats-py, and a request dropped there would get
    neither a reply nor an audit event. Without a usable connection nothing can be answered."""
    try:
        await sub.drain()
    except NatsError:  # closed or draining already
        pass
