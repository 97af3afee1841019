"""The Lifeline dispatcher side: the llm.complete front end (dispatcher), the engine, config,
routing, targets, the fallback policy and budgets, health, NATS transport, wiring and the
CLI; plus low modules the workers share (telemetry, natsio, loop).

Nothing is imported here: a worker that imports service.telemetry must not load the
dispatcher (the layers are in pyproject.toml's [tool.importlinter], checked by make test).
Import the module you need, e.g. `from service.dispatcher import Dispatcher`.
"""

__all__ = [
    "app",
    "budgets",
    "cli",
    "config",
    "dispatcher",
    "embedded",
    "engine",
    "faults",
    "health",
    "loop",
    "memory",
    "natsio",
    "policy",
    "routing",
    "shaping",
    "shared_health",
    "target",
    "telemetry",
    "transport",
]
