"""The layers hold: checked by import-linter (the contracts are in pyproject.toml), and seen
from a provider author's side, by what one import actually loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT


def test_the_import_contracts_in_pyproject_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint), "--no-cache"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def loaded_by(statement: str) -> list[str]:
    """The Lifeline modules, NATS and FastStream that one statement loads in a fresh interpreter."""
    return modules_after(
        statement,
        "m.split('.')[0] in ('schemas', 'service', 'workers', 'nats', 'faststream', 'jsonschema')",
    )


def modules_after(statement: str, which: str) -> list[str]:
    """The modules `m` for which `which` holds once `statement` ran in a fresh interpreter."""
    code = (
        f"import sys, json; {statement}; "
        f"print(json.dumps(sorted(m for m in sys.modules if {which})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])  # after what `statement` printed


def test_a_provider_authors_import_loads_the_wire_and_nothing_of_the_service():
    expected = [
        "schemas",
        "schemas.deadline",
        "schemas.errors",
        "schemas.subjects",
        "schemas.wire",
        "workers",
        "workers.base",
        "workers.early_answers",
        "workers.scrubbing",
        "workers.settings",
    ]
    assert loaded_by("import workers.base") == expected


def test_a_model_class_s_import_loads_the_wire_and_no_http_client_nats_or_telemetry():
    loaded = loaded_by("import workers.plugin")
    assert loaded == [
        "schemas",
        "schemas.deadline",
        "schemas.errors",
        "schemas.subjects",
        "schemas.wire",
        "workers",
        "workers.plugin",
        "workers.scrubbing",
        "workers.settings",
    ]
    code = (
        "import sys, workers.plugin; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'httpx', 'opentelemetry'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_a_worker_does_not_load_the_dispatcher():
    loaded = loaded_by("import workers.runtime")
    assert {m for m in loaded if m.startswith("service")} == {
        "service",
        "service.discovery",
        "service.loop",
        "service.natsio",
        "service.telemetry",
    }


def test_every_service_module_is_placed_in_the_layers():
    """A new module under service/ must be named in the contracts, or it escapes every rule."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    low = next(c for c in contracts["contracts"] if c["name"].startswith("The shared low"))
    placed = set(low["source_modules"]) | set(low["forbidden_modules"])
    modules = {  # a subpackage's modules are placed with it (service.integrations.langchain)
        ".".join(("service", *p.relative_to(ROOT / "service").with_suffix("").parts))
        for p in (ROOT / "service").rglob("*.py")
        if p.name != "__init__.py"
    }
    unplaced = {m for m in modules if not any(m == p or m.startswith(p + ".") for p in placed)}
    assert unplaced == set(), "name these modules in pyproject.toml's import contracts"


def test_the_python_client_loads_nats_and_the_wire_and_nothing_of_the_dispatcher():
    loaded = loaded_by("import service.client")
    assert {m for m in loaded if m.startswith("service")} == {
        "service",
        "service.client",
        "service.embedded",
        "service.jetstream",
        "service.jobstore",
        "service.natsio",  # NATS helpers both sides use (close)
        "service.natsopts",
    }
    assert not any(m.startswith(("faststream", "jsonschema")) for m in loaded)


ONE_OF_EACH_KIND = """
[providers.o]
kind = "openai"
model = "gpt-4o-mini"
[providers.a]
kind = "azure_openai"
endpoint = "https://example.openai.azure.com"
deployment = "gpt-4o"
[providers.c]
kind = "anthropic"
model = "claude-sonnet-4-20250514"
[providers.f]
kind = "fake"
[routes.default]
targets = ["o", "a", "c", "f"]
"""


# Each loads the example config, then one with a provider of each built-in kind.
CHECKING = {
    "load_config": "from service.config import load_config; "
    "load_config('lifeline.example.toml'); load_config({kinds!r})",
    "check-config": "from service.cli import main; "
    "assert main(['check-config', '--config', 'lifeline.example.toml']) == 0; "
    "assert main(['check-config', '--config', {kinds!r}]) == 0",
}


@pytest.mark.parametrize("how", CHECKING)
def test_checking_a_config_loads_no_provider_code_and_no_http_client(tmp_path, how):
    """Config is data: its providers' settings types are checked without their HTTP code (which
    took about 140 ms of `lifeline check-config`'s start)."""
    kinds = tmp_path / "kinds.toml"
    kinds.write_text(ONE_OF_EACH_KIND)
    provider_code = (
        "m.split('.')[0] == 'httpx' or m in ('workers.base', 'workers.openai', "
        "'workers.azure_openai', 'workers.anthropic', 'workers.fake')"
    )
    assert modules_after(CHECKING[how].format(kinds=str(kinds)), provider_code) == []


async def test_a_built_in_kind_s_provider_is_still_built_from_its_settings(tmp_path, monkeypatch):
    """Its module imported when a worker builds it (workers.registry.build_provider)."""
    from service.config import load_config
    from workers.anthropic import AnthropicProvider
    from workers.azure_openai import AzureOpenAIProvider
    from workers.fake import FakeProvider
    from workers.openai import OpenAIProvider
    from workers.registry import build_provider

    for env in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.setenv(env, "sk-test")
    kinds = tmp_path / "kinds.toml"
    kinds.write_text(ONE_OF_EACH_KIND)
    providers = load_config(kinds).providers
    made = {name: build_provider(settings, name) for name, settings in providers.items()}
    for provider in made.values():
        await provider.aclose()
    assert {name: type(provider) for name, provider in made.items()} == {
        "o": OpenAIProvider,
        "a": AzureOpenAIProvider,
        "c": AnthropicProvider,
        "f": FakeProvider,
    }
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(ValueError, match=r"^providers\.c: provider needs an API key"):
        build_provider(providers["c"], "c")
