"""The keys every [providers.<name>] table accepts (each kind adds its own). No I/O here: a
plug-in model's import (workers/plugin.py) loads this and the wire, nothing more."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

# 4 MiB: far above any chat answer's JSON, far below a worker's memory.
DEFAULT_MAX_RESPONSE_BYTES = 4 * 1024 * 1024


class ProviderSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Keys every [providers.<name>] table accepts; each kind adds its own."""

    kind: str
    model: str = ""
    # The other models targets and requests may name for this provider; empty: any model.
    models: list[str] = []
    timeout_s: Annotated[float, Meta(gt=0, le=365 * 86_400.0)] = 30.0  # finite: a year at most
    # The largest answer body read, in bytes after gzip/deflate decoding: a bigger one (a runaway
    # answer, a compression bomb) fails as response_too_large instead of filling the worker's
    # memory.
    max_response_bytes: Annotated[int, Meta(gt=0)] = DEFAULT_MAX_RESPONSE_BYTES
    # Calls one worker replica works on at once; beyond it a call is answered rate_limit at
    # once (its dispatcher retries or falls back) instead of piling up in the worker's memory.
    max_in_flight: Annotated[int, Meta(ge=1)] = 1000
    # And their requests' bytes, added up (a call that comes while none is in flight is always
    # taken): long prompts meet this bound first, as they do the dispatcher's.
    max_in_flight_bytes: Annotated[int, Meta(gt=0)] = 256 * 1024 * 1024

    def fixed_model(self) -> str | None:
        """Why targets and requests cannot pick this provider's model per call (None: they
        can): the config then refuses its `models` and a target naming another model."""
        return None
