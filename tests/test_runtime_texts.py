"""What a worker's replies say, in the words the dispatcher uses for the same event."""

from __future__ import annotations

import time

from helpers import USER_HELLO, ask, config, fake, published

from schemas import subjects
from schemas.wire import encoder, provider_reply_decoder

PROVIDER_REQUEST = encoder.encode({"id": "r1", "messages": USER_HELLO["messages"]})


async def _timed_out_after(client, deadline_in_s: float) -> str:
    """The message of the hung `slow` worker's timeout, sent a call with this deadline."""
    deadline = {subjects.DEADLINE_MS: str(int((time.time() + deadline_in_s) * 1000))}
    msg = await client.request(
        subjects.provider_subject("slow"), PROVIDER_REQUEST, 5, headers=deadline
    )
    reply = provider_reply_decoder.decode(msg.data)
    assert reply.kind == "timeout", reply
    return reply.message


async def test_a_worker_timed_out_at_its_own_timeout_names_it_not_the_time_left(lifeline, client):
    """An audit of one hung target read `no reply from llm.provider.sleepy within 0.5 s` when
    the dispatcher's timer fired first, and `sleepy did not answer within 0.499 s` when the
    worker's did: the time left once the call had reached it, not its timeout_s."""
    await lifeline(config({"slow": fake(hang=True, timeout_s=0.5)}))
    message = await _timed_out_after(client, 0.5)
    assert message == "slow did not answer within its 0.5 s timeout"


async def test_a_worker_cut_short_by_its_deadline_says_so_not_its_timeout(lifeline, client):
    """A call given less than its timeout_s (the request's deadline, or a target's shorter
    timeout_s) ends when its deadline does, and says that, not a timeout it never had."""
    await lifeline(config({"slow": fake(hang=True, timeout_s=5)}))
    message = await _timed_out_after(client, 0.3)
    assert message.startswith("slow did not answer within the 0.")
    assert message.endswith(" s left before its deadline (its own timeout is 5 s)")


async def test_the_dispatchers_timer_says_it_in_the_workers_words(lifeline, client):
    """A worker that never answers (hung, or its process paused) leaves the dispatcher's own
    timer to fire: its text was `no reply from llm.provider.mute within 0.3 s`, where the
    worker's timer says `mute did not answer within its 0.3 s timeout` for the same event."""
    await lifeline(config({"mute": fake(timeout_s=0.3)}), workers=[])
    await client.subscribe(subjects.provider_subject("mute"))  # takes every call, answers none
    await published(client)  # the subscription is the server's before the first call
    reply = await ask(client, USER_HELLO)
    assert [a.message for a in reply.attempts] == ["mute did not answer within its 0.3 s timeout"]
    reply = await ask(client, {**USER_HELLO, "timeout_s": 0.2})
    (message,) = [a.message for a in reply.attempts]
    assert message.startswith("mute did not answer within the 0.")
    assert message.endswith(" s left before its deadline (its own timeout is 0.3 s)")
