"""Retry and hedge budgets: how many extra attempts a route may add to its traffic.

Pure: no NATS, no telemetry. The fallback loop (service/policy.py) deposits one request per
request and spends one per retry or hedge; a spend the budget cannot cover is refused, and the
attempt says so (`reason: retry_budget`). A retry is paid for before its backoff, and refunded
if it is not made after all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple


class Budget:
    """At most `ratio` extra attempts per request of a route over the last 10 seconds, plus a
    reserve of 3 so a quiet route can still retry (Finagle's RetryBudget; Envoy's retry budget
    has the same aim). Each dispatcher keeps its own, so the share holds across replicas too."""

    __slots__ = ("_epochs", "_requests", "_spent", "clock", "ratio", "reserve", "spent_in")
    SLOTS = 10

    def __init__(
        self, ratio: float, reserve: float = 3.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ratio = ratio
        self.reserve = reserve
        self.clock = clock
        self._epochs = [-1] * self.SLOTS
        self._requests = [0] * self.SLOTS
        self._spent = [0] * self.SLOTS
        self.spent_in = -1  # the second the last spend() charged

    def _slot(self) -> int:
        second = math.trunc(self.clock())  # int(), cheaper: see TargetHealth._slot
        i = second % self.SLOTS
        if self._epochs[i] != second:
            self._epochs[i] = second
            self._requests[i] = self._spent[i] = 0
        return i

    def deposit(self) -> None:
        self._requests[self._slot()] += 1

    def available(self) -> float:
        self._slot()
        oldest = int(self.clock()) - self.SLOTS + 1
        live = [i for i, epoch in enumerate(self._epochs) if epoch >= oldest]
        requests = sum(self._requests[i] for i in live)
        return self.ratio * requests + self.reserve - sum(self._spent[i] for i in live)

    def spend(self) -> bool:
        if self.available() < 1:
            return False
        i = self._slot()
        self._spent[i] += 1
        self.spent_in = self._epochs[i]  # the second charged: what refund() gives back to
        return True

    def refund(self, second: int) -> None:
        """Give back a spend made in `second` (int(clock()) then) whose attempt was never made.
        A spend older than the window has aged out already: nothing to give back."""
        i = second % self.SLOTS
        if self._epochs[i] == second and self._spent[i] > 0:
            self._spent[i] -= 1


class Budgets(NamedTuple):
    """A route's budgets: retries and hedges spend `retry`; hedges spend `hedge` as well."""

    retry: Budget
    hedge: Budget
