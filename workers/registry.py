"""Provider kinds by name: their settings type and how to build one.

The built-in kinds are listed here; "python" is a model class named by `class`, and an
installed package can add a kind of its own under the entry-point group `lifeline.providers`
(workers/plugin.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from workers.anthropic import AnthropicProvider, AnthropicSettings
from workers.azure_openai import AzureOpenAIProvider, AzureOpenAISettings
from workers.base import Provider, ProviderSettings
from workers.fake import FakeProvider, FakeSettings
from workers.openai import OpenAIProvider, OpenAISettings
from workers.plugin import PYTHON_KIND, PluginProvider, PluginSettings, installed_kinds

KINDS: dict[str, tuple[type[ProviderSettings], Callable[[Any], Provider]]] = {
    "fake": (FakeSettings, FakeProvider),
    "openai": (OpenAISettings, OpenAIProvider),
    "azure_openai": (AzureOpenAISettings, AzureOpenAIProvider),
    "anthropic": (AnthropicSettings, AnthropicProvider),
}


def known_kinds() -> list[str]:
    """Every kind a config may name here: the built-in ones, "python", and the installed
    plug-ins' (looked up in the installed packages' metadata each call)."""
    return [*KINDS, PYTHON_KIND, *sorted(set(installed_kinds()) - set(KINDS) - {PYTHON_KIND})]


def parse_settings(table: dict[str, Any]) -> ProviderSettings:
    """Validate one [providers.<name>] table; raises msgspec.ValidationError, or KeyError for
    a kind that is neither built in nor installed."""
    kind = table.get("kind")
    if not isinstance(kind, str):  # a list or a table is no kind (nor a key of KINDS)
        raise KeyError(kind if kind is None or isinstance(kind, int | float | bool) else repr(kind))
    if kind in KINDS:
        settings_type, _ = KINDS[kind]
        return msgspec.convert(table, settings_type)
    if kind == PYTHON_KIND or kind in installed_kinds():
        return msgspec.convert(table, PluginSettings)
    raise KeyError(kind)


def settings_type(table: dict[str, Any]) -> type[ProviderSettings] | None:
    """The settings struct a provider table of this kind is checked against (None: no kind)."""
    kind = table.get("kind")
    if not isinstance(kind, str):
        return None
    if kind in KINDS:
        return KINDS[kind][0]
    if kind == PYTHON_KIND or kind in installed_kinds():
        return PluginSettings
    return None


def build_provider(settings: ProviderSettings, name: str = "") -> Provider:
    """The provider a worker calls; raises ValueError naming the config key at fault (a
    plug-in that cannot be imported, its settings) or a missing API key."""
    if isinstance(settings, PluginSettings):
        return PluginProvider(settings, name)
    _, factory = KINDS[settings.kind]
    try:
        return factory(settings)
    except ValueError as exc:  # a missing API key: say which provider wants it
        raise ValueError(f"providers.{name}: {exc}" if name else str(exc)) from None
