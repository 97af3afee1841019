"""docker-compose.yml, the stack an operator runs: checked as far as it can be without a
container engine. A compose implementation parses and resolves it when one is installed
(Debian's `docker-compose`, or `docker compose`); the rest is read here: a worker for every
provider of the example config, a healthcheck on every Lifeline service (and that command run
against a real worker), one image built from the checkout, nothing pip-installed at start,
traces to Jaeger with no metrics export for it to refuse."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ROOT, LifelineProcess, free_port

from service import telemetry

COMPOSE = ROOT / "docker-compose.yml"
IMAGE = "lifeline:local"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def lifeline_services(compose: dict[str, Any], tools: bool = False) -> dict[str, dict]:
    """The services running the Lifeline image (the one-off tools only with `tools`)."""
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("image") == IMAGE and (tools or "tools" not in service.get("profiles", []))
    }


def command(service: dict[str, Any]) -> list[str]:
    found = service.get("command", [])
    return shlex.split(found) if isinstance(found, str) else list(found)


def _compose_command() -> tuple[list[str], bool] | None:
    """A compose implementation here, and whether it knows dockerfile_inline (compose v2)."""
    if shutil.which("docker") and _ran(["docker", "compose", "version"]):
        return ["docker", "compose"], True
    if shutil.which("docker-compose"):
        version = subprocess.run(
            ["docker-compose", "version", "--short"], capture_output=True, text=True, check=False
        ).stdout.strip()
        return ["docker-compose"], not version.startswith("1.")
    return None


def _ran(args: list[str]) -> bool:
    return subprocess.run(args, capture_output=True, check=False).returncode == 0


def test_a_compose_implementation_parses_and_resolves_the_file(tmp_path: Path):
    found = _compose_command()
    if found is None:
        pytest.skip(
            "no docker-compose or docker compose here (Debian: apt-get install docker-compose)"
        )
    compose_cmd, knows_inline = found
    path = COMPOSE
    if not knows_inline:
        # Debian's docker-compose 1.29 predates dockerfile_inline (compose v2.17): it checks
        # everything else of the file, with that one key renamed to an extension field.
        path = tmp_path / "docker-compose.yml"
        path.write_text(COMPOSE.read_text().replace("dockerfile_inline:", "x-dockerfile-inline:"))
    base = [*compose_cmd, "-f", str(path), "--project-directory", str(ROOT)]
    checked = subprocess.run(
        [*base, "config", "-q"], capture_output=True, text=True, timeout=60, check=False
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr.strip() == "", checked.stderr  # no warning either (ignored keys ...)
    listed = subprocess.run(
        [*base, "--profile", "tools", "config", "--services"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert set(listed.stdout.split()) == set(yaml.safe_load(COMPOSE.read_text())["services"])


def test_every_provider_of_the_example_config_has_a_worker(compose):
    providers = tomllib.loads((ROOT / "lifeline.example.toml").read_text())["providers"]
    workers = {
        command(s)[1] for s in lifeline_services(compose).values() if command(s)[0] == "worker"
    }
    assert workers == set(providers)
    assert "slowpoke" in workers  # the hedged route's primary
    dispatchers = [s for s in lifeline_services(compose).values() if command(s)[0] == "dispatcher"]
    assert len(dispatchers) == 1 and dispatchers[0]["deploy"]["replicas"] == 2


def test_every_lifeline_service_has_a_healthcheck_on_its_own_probe(compose):
    for name, service in lifeline_services(compose).items():
        args = command(service)
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and not service["healthcheck"].get("disable"), name
        address = args[args.index("--health-port") + 1]
        assert f"http://{address}/readyz" in test[-1], name


def test_one_image_is_built_from_the_checkout_and_nothing_installs_at_start(compose):
    services = lifeline_services(compose, tools=True)
    builds = {yaml.safe_dump(s["build"]) for s in services.values()}
    assert len(builds) == 1  # one build, one image, shared by every Lifeline service
    build = next(iter(services.values()))["build"]
    assert build["context"] == "."
    assert "RUN pip install --no-cache-dir ." in build["dockerfile_inline"]
    for name, service in compose["services"].items():
        started = " ".join(
            [
                *command(service),
                *service.get("entrypoint", []),
                *_strings(service.get("healthcheck")),
            ]
        )
        assert "pip" not in started, name


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_nats_has_jetstream_and_traces_go_to_jaeger_without_metrics(compose):
    nats = compose["services"]["nats"]
    assert "-js" in nats["command"] and "healthcheck" in nats
    for name, service in lifeline_services(compose, tools=True).items():
        env = {k: str(v) for k, v in service["environment"].items()}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318", name
        assert telemetry.exporter_names(env, "TRACES") == ["otlp"], name
        # the same endpoint would turn metrics export on, which Jaeger answers with 404
        assert telemetry.meter_provider_from_env(name, env) is None, name


def test_the_healthcheck_command_passes_against_a_running_worker(compose, nats_url, tmp_path):
    service = compose["services"]["worker-backup"]
    port = free_port()
    address = f"127.0.0.1:{port}"
    args = command(service)
    args[args.index("--config") + 1] = str(ROOT / "lifeline.example.toml")
    args[args.index("--health-port") + 1] = address
    worker = LifelineProcess([*args, "--nats-url", nats_url], tmp_path / "worker.log")
    try:
        worker.wait_for_log("worker backup serving")
        test = [part.replace("127.0.0.1:8081", address) for part in service["healthcheck"]["test"]]
        assert test[1] == "python"
        result = subprocess.run(
            [sys.executable, *test[2:]], capture_output=True, text=True, timeout=30, check=False
        )
        assert result.returncode == 0, result.stderr
    finally:
        worker.stop()
    result = subprocess.run(
        [sys.executable, *test[2:]], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode != 0  # nobody answers: unhealthy


def test_what_the_image_copies_is_enough_to_pip_install(compose, tmp_path):
    """The inline Dockerfile's COPY lines, played here: pip builds Lifeline from just those
    files, as the image's `RUN pip install .` will (offline: no build isolation)."""
    build = compose["services"]["dispatcher"]["build"]
    src = tmp_path / "build"
    src.mkdir()
    for line in build["dockerfile_inline"].splitlines():
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for name in sources:  # each to its own name, as the Dockerfile's are
                if (ROOT / name).is_dir():
                    skip = shutil.ignore_patterns("__pycache__")
                    shutil.copytree(ROOT / name, src / name, ignore=skip)
                else:
                    shutil.copy(ROOT / name, src / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "wheel"), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = (tmp_path / "wheel").glob("lifeline-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert {"service/cli.py", "workers/runtime.py", "schemas/wire.py"} <= set(
            archive.namelist()
        )
