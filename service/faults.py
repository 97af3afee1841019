"""Deterministic fault injection: a request's `faults` simulate failures of its targets.

For teams proving their own fallbacks (LiteLLM's mock_testing_* flags are the model). The
engine wraps a request's calls in `injecting`, which answers with a fault instead of calling
the worker, so no provider is touched:

    "timeout"          waits out the attempt's timeout, then fails with timeout
    "invalid_output"   an answer that failed the request's response_format
    an error kind      fails at once with that kind ("rate_limit", "server_error", ...)
    an HTTP status     fails at once as the provider would (429 -> rate_limit, 503 -> server_error)
    "ok" or null       lets the real call through
    "<fault> after N"  on llm.stream: the real call streams, and fails with that error kind or
                       HTTP status after N chunks reached the client (a mid-stream failure;
                       its worker is told to cancel). Without streaming, it fails at once

A list applies its entries to the target's attempts in turn (retries included); once the
list runs out, calls go through. Only when the config sets dispatcher.allow_fault_injection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

import msgspec

from schemas import ERROR_KINDS, ProviderFailure, ProviderReply
from schemas.errors import kind_or_status_problem
from schemas.wire import Fault, classify_status
from service.policy import CallTarget, Started
from service.target import Target

PASS = "ok"
# Called before a streamed call that a "<fault> after N" fault cuts short: (target, N, failure).
Cut = Callable[[Target, int, ProviderFailure], None]


def midstream(fault: Fault) -> tuple[Fault, int] | None:
    """("503 after 2" -> (503, 2)): the fault, and after how many chunks; None for others."""
    if not isinstance(fault, str):
        return None
    what, sep, after = fault.partition(" after ")
    if not sep or not after.strip().isdigit():
        return None
    what = what.strip()
    return (int(what) if what.isdigit() else what), int(after)


def check_faults(faults: Mapping[str, Fault | list[Fault]]) -> dict[str, tuple[Fault, ...]]:
    """Each entry as a tuple of faults; raises ValueError naming a bad one."""
    checked = {}
    for name, value in faults.items():
        entries = tuple(value) if isinstance(value, list) else (value,)
        for entry in entries:
            cut = midstream(entry)
            if cut is None:
                ok = entry is None or entry == PASS or kind_or_status_problem(entry) is None
            else:  # a failure that comes at once, after the chunks
                ok = cut[0] != "timeout" and kind_or_status_problem(cut[0]) is None
            if ok:
                continue
            raise ValueError(
                f'faults.{name}: {entry!r} is not a fault; use "timeout", "invalid_output", an '
                "error kind "
                f'({", ".join(ERROR_KINDS)}), an HTTP status 400..599, or "ok"; on llm.stream, '
                'an error kind or status "after N" chunks (e.g. "503 after 2")'
            )
        checked[name] = entries
    return checked


async def simulate(fault: Fault, target: str, timeout_s: float) -> ProviderFailure | None:
    """The failure `fault` stands for (None: make the real call)."""
    if fault is None or fault == PASS:
        return None
    note = f"simulated for {target} by the request's faults"
    if fault == "timeout":
        await asyncio.sleep(timeout_s)
        return ProviderFailure("timeout", f"{note}: no answer within {timeout_s:.3g} s")
    if isinstance(fault, int):
        return ProviderFailure(classify_status(fault), f"{note}: HTTP {fault}", fault)
    return ProviderFailure(str(fault), note)


def injecting(
    call: CallTarget,
    faults: Mapping[str, Sequence[Fault]],
    cut: Cut | None = None,
    number: Callable[[], int] | None = None,
) -> CallTarget:
    """`call`, behind the request's simulated failures: the n-th call of a target meets its
    n-th fault (listed under the target's name, else its provider's); later calls go through.
    `cut` (a streamed request's) arranges a "<fault> after N" fault on the call that follows;
    `number` (a streamed request's attempt counter) counts a simulated failure as an attempt
    when it starts, so the events of the ones after it (or beside it: a hedge) carry the
    numbers the attempts list gives them."""
    calls: dict[str, int] = {}

    async def faulty(
        target: Target, timeout_s: float, previous: tuple[str, ...]
    ) -> ProviderReply | Started:
        n = calls[target.name] = calls.get(target.name, 0) + 1
        planned = faults.get(target.name) or faults.get(target.provider) or ()
        if n <= len(planned):
            fault, after = midstream(planned[n - 1]) or (planned[n - 1], None)
            streams = bool(after) and cut is not None  # the real call runs (and numbers itself)
            if number is not None and not streams and fault not in (None, PASS):
                number()  # as it starts, as a real call is: a hedge may start while it waits
            simulated = await simulate(fault, target.name, timeout_s)
            if simulated is not None and streams:
                note = f"{simulated.message}, after {after} chunk{'' if after == 1 else 's'}"
                cut(target, after, msgspec.structs.replace(simulated, message=note))
            elif simulated is not None:
                return simulated
        return await call(target, timeout_s, previous)

    return faulty
