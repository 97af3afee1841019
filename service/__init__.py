"""The Lifeline dispatcher side: config, routing, fallback policy, health, NATS transport,
wiring and the CLI; plus two low modules the workers share (telemetry, natsio).

Nothing is imported here: a worker that imports service.telemetry must not load the
dispatcher (the layers are in pyproject.toml's [tool.importlinter], checked by make test).
Import the module you need, e.g. `from service.dispatcher import Dispatcher`.
"""

__all__ = [
    "app",
    "cli",
    "config",
    "dispatcher",
    "embedded",
    "faults",
    "health",
    "memory",
    "natsio",
    "policy",
    "routing",
    "shaping",
    "shared_health",
    "telemetry",
    "transport",
]
