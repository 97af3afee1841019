"""Unique ids: `Ids` for requests that bring none (a random prefix per process and a counter:
about a tenth of NUID's cost, and as unique, the prefix having 64 random bits; not secret,
one seen gives away the next), and `SecretIds` for attempts, which must not be guessable:
an attempt id is what a cancel on llm.cancel.<provider> names, so a sequential one would let
anyone who saw one cancel the calls after it (measured: 20 of 20, on an open server).
"""

from __future__ import annotations

import itertools
import os
import secrets


class Ids:
    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):x}"


class SecretIds:
    """96 random bits from the OS's CSPRNG per id, as hex. Drawn _BATCH ids at a time: one
    getrandom() system call per batch rather than per id (on a VM a system call costs more
    than the rest of making an id)."""

    __slots__ = ("_pool",)

    _BATCH = 64

    def __init__(self) -> None:
        self._pool: list[str] = []

    def next(self) -> str:
        pool = self._pool
        if not pool:
            drawn = os.urandom(12 * self._BATCH).hex()
            pool.extend(drawn[i : i + 24] for i in range(0, len(drawn), 24))
        return pool.pop()
