"""Provider workers: one module per provider kind, what every kind implements (workers.base),
and the runtime that serves llm.provider.<name> (workers.runtime).

Nothing is imported here eagerly: a provider author's `import workers.base` loads the wire,
httpx and msgspec, not the runtime, NATS or the dispatcher (checked by tests/test_layers.py).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Provider": "workers.base",
    "ProviderError": "workers.base",
    "ProviderSettings": "workers.base",
    "classify_status": "workers.base",
    "KINDS": "workers.registry",
    "build_provider": "workers.registry",
    "parse_settings": "workers.registry",
    "WorkerRuntime": "workers.runtime",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """`from workers import WorkerRuntime` still works, loading only what it names."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
