"""The Lifeline dispatcher side: config, routing, fallback policy, health, NATS transport,
wiring and the CLI; plus two low modules the workers share (telemetry, natsio).

Nothing is imported here eagerly: a worker that imports service.telemetry must not load the
dispatcher (the layers are in pyproject.toml's [tool.importlinter], checked by make test).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Config": "service.config",
    "ConfigError": "service.config",
    "load_config": "service.config",
    "parse_config": "service.config",
    "Dispatcher": "service.dispatcher",
    "ChainResult": "service.policy",
    "Target": "service.policy",
    "run_chain": "service.policy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """`from service import Dispatcher` still works, loading only what it names."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'service' has no attribute {name!r}")
