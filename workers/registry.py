"""Provider kinds by name: their settings type and how to build one.

The built-in kinds are listed here; "python" is a model class named by `class`, and an
installed package can add a kind of its own under the entry-point group `lifeline.providers`
(workers/plugin.py). A package's kind named like a built-in one is not used (a warning says
so); a kind two packages register, or one given a `class`, is refused.

A built-in kind's settings type comes from workers/settings.py and its provider class is
imported when a provider is built (build_provider): checking a config (service/config.py)
loads no provider's code and no HTTP client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from workers.plugin import (
    PYTHON_KIND,
    PluginProvider,
    PluginSettings,
    _import,
    class_ignored,
    entry_point,
    installed_kinds,
    registered_as,
)
from workers.settings import (
    AnthropicSettings,
    AzureOpenAISettings,
    FakeSettings,
    OpenAISettings,
    ProviderSettings,
)

if TYPE_CHECKING:
    from workers.base import Provider

log = logging.getLogger("lifeline")

# Each built-in kind: its settings type, and its provider class as "module:Class", imported
# on first use (provider_class).
KINDS: dict[str, tuple[type[ProviderSettings], str]] = {
    "fake": (FakeSettings, "workers.fake:FakeProvider"),
    "openai": (OpenAISettings, "workers.openai:OpenAIProvider"),
    "azure_openai": (AzureOpenAISettings, "workers.azure_openai:AzureOpenAIProvider"),
    "anthropic": (AnthropicSettings, "workers.anthropic:AnthropicProvider"),
}


def known_kinds() -> list[str]:
    """Every kind a config may name here: the built-in ones, "python", and the installed
    plug-ins' (looked up in the installed packages' metadata each call)."""
    return [*KINDS, PYTHON_KIND, *sorted(set(installed_kinds()) - set(KINDS) - {PYTHON_KIND})]


def parse_settings(table: dict[str, Any]) -> ProviderSettings:
    """Validate one [providers.<name>] table; raises msgspec.ValidationError (at the key at
    fault: an installed kind two packages register, or one given a `class`), or KeyError for
    a kind that is neither built in nor installed."""
    kind = table.get("kind")
    if not isinstance(kind, str):  # a list or a table is no kind (nor a key of KINDS)
        raise KeyError(kind if kind is None or isinstance(kind, int | float | bool) else repr(kind))
    if kind in KINDS or kind == PYTHON_KIND:
        _warn_if_claimed(kind)
    if kind in KINDS:
        settings_type, _ = KINDS[kind]
        return msgspec.convert(table, settings_type)
    if kind == PYTHON_KIND:
        return msgspec.convert(table, PluginSettings)
    try:
        path = entry_point(kind)
    except ValueError as exc:  # which package's class serves would be up to sys.path's order
        raise msgspec.ValidationError(f"{exc} - at `$.kind`") from None
    if not path:
        raise KeyError(kind)
    settings = msgspec.convert(table, PluginSettings)
    if settings.class_:  # it would be ignored: the entry point names the class
        problem = class_ignored(kind, settings.class_, path)
        raise msgspec.ValidationError(f"{problem} - at `$.class`")
    return settings


_claims_told: set[str] = set()  # built-in kinds whose claimants were warned about


def _warn_if_claimed(kind: str) -> None:
    """Warn (once a process) when installed packages register a built-in kind's name: the
    built-in kind serves it, and their class never does."""
    if kind in _claims_told:
        return
    claims = registered_as(kind)
    if claims:
        _claims_told.add(kind)
        log.warning(
            "kind %r is Lifeline's own: [providers] of that kind get it, never the class of "
            "the entry point %s that registers it too in lifeline.providers; give the plug-in "
            "a name of its own",
            kind,
            "; ".join(claims),
        )


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
    factory = provider_class(settings.kind)
    try:
        return factory(settings, name=name)  # its messages name its table
    except ValueError as exc:  # a missing API key: say which provider wants it
        raise ValueError(f"providers.{name}: {exc}" if name else str(exc)) from None


def provider_class(kind: str) -> Callable[..., Provider]:
    """The provider class of a built-in kind, its module imported now (KeyError for a kind
    that is not built in), as a plug-in's class is."""
    return _import(KINDS[kind][1], f"kind {kind!r}")
