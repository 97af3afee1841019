"""Provider workers: the runtime that serves llm.provider.<name>, and one module per provider kind."""

from workers.base import Provider, ProviderError, ProviderSettings, classify_status
from workers.registry import KINDS, build_provider, parse_settings
from workers.runtime import WorkerRuntime

__all__ = [
    "KINDS",
    "Provider",
    "ProviderError",
    "ProviderSettings",
    "WorkerRuntime",
    "build_provider",
    "classify_status",
    "parse_settings",
]
