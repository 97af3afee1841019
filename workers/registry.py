"""Provider kinds by name: their settings type and how to build one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from workers.anthropic import AnthropicProvider, AnthropicSettings
from workers.azure_openai import AzureOpenAIProvider, AzureOpenAISettings
from workers.base import Provider, ProviderSettings
from workers.fake import FakeProvider, FakeSettings
from workers.openai import OpenAIProvider, OpenAISettings

KINDS: dict[str, tuple[type[ProviderSettings], Callable[[Any], Provider]]] = {
    "fake": (FakeSettings, FakeProvider),
    "openai": (OpenAISettings, OpenAIProvider),
    "azure_openai": (AzureOpenAISettings, AzureOpenAIProvider),
    "anthropic": (AnthropicSettings, AnthropicProvider),
}


def parse_settings(table: dict[str, Any]) -> ProviderSettings:
    """Validate one [providers.<name>] table; raises msgspec.ValidationError or KeyError."""
    kind = table.get("kind")
    if kind not in KINDS:
        raise KeyError(kind)
    settings_type, _ = KINDS[kind]
    return msgspec.convert(table, settings_type)


def build_provider(settings: ProviderSettings) -> Provider:
    _, factory = KINDS[settings.kind]
    return factory(settings)
