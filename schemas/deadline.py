"""A request's deadline: one value from the moment a request arrives to the worker's HTTP call.

Inside a process a Deadline is a point on `time.monotonic()`'s scale, so a wall-clock step
(NTP, a VM resumed) cannot stretch or cut it. Between processes it travels as wall-clock Unix
milliseconds in the `Lifeline-Deadline-Ms` header (schemas.subjects.DEADLINE_MS), the one
form two machines agree on; `header()` and `from_header()` are the only conversions.

    on arrival    Deadline.after(timeout_s, start=arrived), .sooner() than the client's own
                  Deadline.at_unix_ms(deadline_unix_ms)
    per attempt   the policy gives each call min(target.timeout_s, deadline.left_s()), and the
                  attempt's own deadline goes out as Deadline.header_after(that)
    in a worker   Deadline.left_in_header(value): what its provider call may take
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import msgspec

Clock = Callable[[], float]

# Less time than this left is no time for a call: no provider is asked and answers in it, and
# event-loop timers (uvloop's, service.loop.Timeouts) fire up to half a millisecond early, so
# an attempt cut at the deadline can end a hair before it. A deadline this close has passed.
MIN_CALL_S = 0.001


class Deadline(msgspec.Struct, frozen=True):
    """A point in time after which nobody waits for an answer. A frozen msgspec Struct: made
    per request, and built in C (a class with an `__init__` of its own cost about 1,000
    instructions more per Deadline, counted)."""

    at: float  # on time.monotonic()'s scale (or the injected clock's, in tests)

    @classmethod
    def after(cls, seconds: float, start: float | None = None) -> Deadline:
        """`seconds` after `start` (time.monotonic() when the request arrived; now if None)."""
        return cls((time.monotonic() if start is None else start) + seconds)

    @classmethod
    def at_unix_ms(cls, unix_ms: float) -> Deadline:
        """A wall-clock deadline (a client's deadline_unix_ms, or the header's value)."""
        return cls(time.monotonic() + unix_ms / 1000 - time.time())

    @classmethod
    def from_header(cls, value: str | None) -> Deadline | None:
        """The deadline a `Lifeline-Deadline-Ms` header carries; None when absent or malformed."""
        left = cls.left_in_header(value)
        return None if left is None else cls(time.monotonic() + left)

    @staticmethod
    def left_in_header(value: str | None) -> float | None:
        """`Deadline.from_header(value).left_s()` without making the Deadline (once per call in
        a worker): seconds left, or None when the header is absent or malformed."""
        if value is None or not 0 < len(value) <= 20:
            return None
        try:
            return int(value) / 1000 - time.time()
        except ValueError:
            return None

    def header(self) -> str:
        """This deadline as the `Lifeline-Deadline-Ms` header's value (Unix time in ms)."""
        return self.header_after(self.left_s())

    @staticmethod
    def header_after(seconds: float) -> str:
        """`Deadline.after(seconds).header()`, without making the Deadline (once per attempt)."""
        return str(math.trunc((time.time() + seconds) * 1000))  # int(), in fewer instructions

    def left_s(self, now: float | None = None) -> float:
        """Seconds left; zero or less once it has passed."""
        return self.at - (time.monotonic() if now is None else now)

    def passed(self, now: float | None = None) -> bool:
        """Whether too little is left for a call: less than MIN_CALL_S counts as passed."""
        return self.left_s(now) < MIN_CALL_S

    def sooner(self, other: Deadline) -> Deadline:
        return self if self.at <= other.at else other

    def __repr__(self) -> str:
        return f"Deadline(left_s={self.left_s():.3f})"
