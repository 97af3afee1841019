"""The layers hold: checked by import-linter (the contracts are in pyproject.toml), and seen
from a provider author's side, by what one import actually loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    code = (
        f"import sys, json; {statement}; print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in "
        "('schemas', 'service', 'workers', 'nats', 'faststream', 'jsonschema'))))"
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
    return json.loads(result.stdout)


def test_a_provider_authors_import_loads_the_wire_and_nothing_of_the_service():
    expected = [
        "schemas",
        "schemas.errors",
        "schemas.subjects",
        "schemas.wire",
        "workers",
        "workers.base",
        "workers.settings",
    ]
    assert loaded_by("import workers.base") == expected


def test_a_model_class_s_import_loads_the_wire_and_no_http_client_nats_or_telemetry():
    loaded = loaded_by("import workers.plugin")
    assert loaded == [
        "schemas",
        "schemas.errors",
        "schemas.subjects",
        "schemas.wire",
        "workers",
        "workers.plugin",
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
