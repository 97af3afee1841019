"""Memory: handing it back to the system after a burst, and the collector tuned for serving.

CPython frees its small-object arenas, but glibc keeps the freed heap of a burst (thousands
of requests' buffers and structs) mapped until told otherwise, so a dispatcher that once
took a flood would keep that memory for good. `malloc_trim(0)` returns it; on other C
libraries (musl, macOS) this is a no-op.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
from collections.abc import Callable

_TRIM_DELAY_S = 1.0  # let the burst's last replies and spans go first


def _load_trim() -> Callable[[int], int] | None:
    """The C library's malloc_trim, or None where there is none."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_trim()


def release_memory() -> None:
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


def release_memory_soon() -> None:
    """Trim once the event loop has finished what the burst left behind."""
    asyncio.get_running_loop().call_later(_TRIM_DELAY_S, release_memory)


# Young-generation collections per allocation: CPython's default (700) runs one every few
# requests at full load. Requests make few reference cycles, so collecting less often costs
# little memory and saves the collector's passes over every live object of the young set.
_GC_THRESHOLDS = (20_000, 20, 20)


def settle_after_start() -> None:
    """Once a component is up: what start-up allocated (modules, config, clients) is moved out
    of the collector's sight for good (gc.freeze), and young collections come less often:
    every 20,000 allocations instead of 700. Requests make few reference cycles, so this costs
    little memory."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)
