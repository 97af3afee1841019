"""The TOML config: read once at start-up, validated, errors naming the bad key.

    [dispatcher]            optional: request limits
    [providers.<name>]      one per provider worker; `kind` picks the provider module
    [routes.<name>]         ordered `targets` and an optional `fallback_on`

Provider tables are validated by their kind's settings type (workers/), so a typo in
any key fails here, before anything connects.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from schemas import ERROR_KINDS
from workers.base import ProviderSettings
from workers.registry import KINDS, parse_settings

# Provider and route names become NATS subject tokens.
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class ConfigError(ValueError):
    """The config file is unreadable or invalid; the message names the file and the key."""


class DispatcherSettings(Struct, frozen=True, forbid_unknown_fields=True):
    # NATS's own default max_payload is 1 MiB; raise both together for long prompts.
    max_request_bytes: Annotated[int, Meta(gt=0)] = 1024 * 1024
    default_timeout_s: Annotated[float, Meta(gt=0)] = 60.0
    max_timeout_s: Annotated[float, Meta(gt=0)] = 600.0

    def __post_init__(self) -> None:
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError(
                f"default_timeout_s ({self.default_timeout_s:g}) is above max_timeout_s ({self.max_timeout_s:g}): "
                "every request without its own timeout_s would be refused"
            )


class RouteConfig(Struct, frozen=True, forbid_unknown_fields=True):
    targets: Annotated[list[str], Meta(min_length=1)]
    # None: every provider failure falls back. Otherwise error kinds and/or HTTP statuses.
    fallback_on: list[str | int] | None = None


class _RawConfig(Struct, frozen=True, forbid_unknown_fields=True):
    # Tables are validated one entry at a time below, so errors can name the entry
    # (msgspec writes dict keys as `[...]` in its paths).
    providers: dict[str, Any]
    routes: dict[str, Any] = {}
    dispatcher: dict[str, Any] = {}


class Config(Struct, frozen=True):
    providers: dict[str, ProviderSettings]
    routes: dict[str, RouteConfig]
    dispatcher: DispatcherSettings
    source: str = "<memory>"


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (pass --config, or copy lifeline.example.toml)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return parse_config(data, source=str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_config(data: dict[str, Any], source: str = "<memory>") -> Config:
    raw = _convert(data, _RawConfig, "")
    if not raw.providers:
        raise ConfigError("providers: at least one [providers.<name>] table is needed")
    providers = {name: _provider(name, table) for name, table in raw.providers.items()}
    routes = {name: _convert(table, RouteConfig, f"routes.{name}") for name, table in raw.routes.items()}
    for name, route in routes.items():
        _check_route(name, route, providers)
    dispatcher = _convert(raw.dispatcher, DispatcherSettings, "dispatcher")
    return Config(providers=providers, routes=routes, dispatcher=dispatcher, source=source)


def _provider(name: str, table: Any) -> ProviderSettings:
    key = f"providers.{name}"
    if not _NAME.match(name):
        raise ConfigError(f"{key}: provider names may use only letters, digits, '_' and '-'")
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: expected a table")
    if table.get("kind") not in KINDS:
        raise ConfigError(f"{key}.kind: expected one of {', '.join(KINDS)}, got {table.get('kind')!r}")
    try:
        return parse_settings(table)
    except msgspec.ValidationError as exc:
        raise ConfigError(_located(key, exc)) from None


def _check_route(name: str, route: RouteConfig, providers: dict[str, ProviderSettings]) -> None:
    key = f"routes.{name}"
    if not _NAME.match(name):
        raise ConfigError(f"{key}: route names may use only letters, digits, '_' and '-'")
    for i, target in enumerate(route.targets):
        if target not in providers:
            known = ", ".join(sorted(providers))
            raise ConfigError(f"{key}.targets[{i}]: unknown provider {target!r} (configured: {known})")
    for i, entry in enumerate(route.fallback_on or ()):
        if isinstance(entry, int) and not 400 <= entry <= 599:
            raise ConfigError(f"{key}.fallback_on[{i}]: status {entry} is not an HTTP error status (400..599)")
        if isinstance(entry, str) and entry not in ERROR_KINDS:
            raise ConfigError(f"{key}.fallback_on[{i}]: unknown error kind {entry!r} (known: {', '.join(ERROR_KINDS)})")


def _convert(data: Any, type_: type, prefix: str) -> Any:
    try:
        return msgspec.convert(data, type_)
    except msgspec.ValidationError as exc:
        raise ConfigError(_located(prefix, exc)) from None


def _located(prefix: str, exc: msgspec.ValidationError) -> str:
    """Turn msgspec's "... - at `$.a.b`" into "prefix.a.b: ..." so the key comes first."""
    text = str(exc)
    message, sep, where = text.rpartition(" - at `$")
    if not sep:
        message, where = text, ""
    path = (prefix + where.rstrip("`")).lstrip(".")
    unknown = re.match(r"Object contains unknown field `(.+)`", message)
    if unknown:
        return f"{path + '.' if path else ''}{unknown.group(1)}: unknown key (check its spelling)"
    return f"{path}: {message}" if path else message
