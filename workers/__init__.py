"""Provider workers: what every kind implements (workers.base), one module per provider kind,
and the runtime that serves llm.provider.<name> (workers.runtime).

Nothing is imported here: a provider author's `import workers.base` loads the wire, httpx and
msgspec, not the runtime, NATS or the dispatcher (checked by tests/test_layers.py).
"""

__all__ = ["anthropic", "azure_openai", "base", "fake", "openai", "registry", "runtime"]
