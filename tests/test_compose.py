"""docker-compose.yml, the stack an operator runs: checked as far as it can be without a
container engine. A compose implementation parses and resolves it when one is installed
(Debian's `docker-compose`, or `docker compose`); the rest is read here: a worker for every
provider of the example config, a healthcheck on every Lifeline service (and that command run
against a real worker), one image built from the checkout, nothing pip-installed at start,
traces to Jaeger with no metrics export for it to refuse; NATS on the least-privilege config
that `lifeline nats-config` writes, each Lifeline service connected as its role with its
password from a compose secret, and none written in the file (those scripts run here too, with
a real nats-server, a worker, the gateway and `lifeline health`).

What the README said was run, until 2026-12-04: Debian's `docker-compose` 1.29.2 parses and
resolves the file (`docker-compose config`; it predates `dockerfile_inline`, so it is given the
file with that one key renamed), and this module does so whenever a compose is installed
(`docker compose` v2 gets the file as it is), checks the rest in Python (a worker per provider,
a healthcheck per Lifeline service, nothing installed at start, no metrics export, a user and a
secret per Lifeline service, no password in the file), builds a wheel from exactly the files
the image copies, runs the healthcheck's command against a real worker, and runs the stack's
scripts with `sh` and their paths moved: the generator, nats-server on its output with the
README's secrets, a worker connecting as `worker-backup`, the gateway as `gateway` (refusing a
request without its key, letting one with it through) and `lifeline health` as `operator`."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from helpers import ROOT, LifelineProcess, free_port

from service import permissions, telemetry
from service.embedded import server_binary

COMPOSE = ROOT / "docker-compose.yml"
IMAGE = "lifeline:local"
GENERATOR = "nats-config"  # the one-shot service that writes nats-server's config
CONFIG = "/etc/lifeline/lifeline.toml"
KEYS = "gateway-keys"  # the one secret that is no NATS user's password: the gateway's API keys


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def lifeline_services(compose: dict[str, Any], tools: bool = False) -> dict[str, dict]:
    """The services running the Lifeline image, but the generator (the one-off tools only
    with `tools`)."""
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("image") == IMAGE
        and name != GENERATOR
        and (tools or "tools" not in service.get("profiles", []))
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
        if args[0] == "gateway":  # its probes are on its own HTTP port
            address = f"127.0.0.1:{args[args.index('--port') + 1]}"
        else:
            address = args[args.index("--health-port") + 1]
        assert f"http://{address}/readyz" in test[-1], name


def test_every_lifeline_service_outlasts_its_shutdown_grace_before_compose_kills_it(compose):
    """Compose sends SIGKILL 10 s after SIGTERM by default: exactly when the shutdown grace
    ends, before the requests still running could be answered shutting_down."""
    grace_s = tomllib.loads((ROOT / "lifeline.example.toml").read_text())["dispatcher"][
        "shutdown_grace_s"
    ]
    for name, service in lifeline_services(compose).items():
        period = service.get("stop_grace_period", "10s")
        assert period.endswith("s") and float(period[:-1]) >= grace_s + 5, name


def test_one_image_is_built_from_the_checkout_and_nothing_installs_at_start(compose):
    services = {**lifeline_services(compose, tools=True), GENERATOR: compose["services"][GENERATOR]}
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
    assert "-js" in nats_server_args(compose) and "healthcheck" in nats
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
    files, as the image's `RUN pip install .` will (offline: no build isolation). Links are
    copied as links, as Docker's COPY does: service/example.toml links to the example config,
    and without it the wheel had no example, and `lifeline run` in the image no config."""
    build = compose["services"]["dispatcher"]["build"]
    src = tmp_path / "build"
    src.mkdir()
    for line in build["dockerfile_inline"].splitlines():
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for name in sources:  # each to its own name, as the Dockerfile's are
                if (ROOT / name).is_dir():
                    skip = shutil.ignore_patterns("__pycache__")
                    shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=skip)
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
        assert {
            "service/cli.py",
            "workers/runtime.py",
            "schemas/wire.py",
            "service/example.toml",
        } <= set(archive.namelist())


def nats_server_args(compose: dict[str, Any]) -> list[str]:
    """The arguments of the nats service's `exec nats-server` (its entrypoint is a script)."""
    entrypoint = compose["services"]["nats"]["entrypoint"]
    assert entrypoint[:2] == ["sh", "-c"]
    [line] = [line for line in entrypoint[2].splitlines() if line.startswith("exec nats-server ")]
    return shlex.split(line)[2:]


def role_user(name: str, service: dict[str, Any]) -> tuple[str, str | None]:
    """The NATS user a Lifeline service should connect as, and its inbox prefix (None: the
    role's default), from what the service runs."""
    args = command(service) or service["entrypoint"][4:]  # the tools: sh -c SCRIPT lifeline ...
    if args[0] == "dispatcher":
        return "dispatcher", None
    if args[0] == "worker":
        return f"worker-{args[1]}", None
    user = {"ask": "ask", "health": "operator", "gateway": "gateway"}[args[0]]
    return user, f"_INBOX.{user}"  # a client's, an operator's and a gateway's


def generator_flags(compose: dict[str, Any]) -> list[str]:
    """`lifeline nats-config`'s arguments in the generator's script, up to its redirection."""
    script = compose["services"][GENERATOR]["entrypoint"][2]
    args = shlex.split(script)
    assert args[:2] == ["lifeline", "nats-config"]
    return args[2 : args.index(">")]


def generated_config(compose: dict[str, Any]) -> str:
    """The nats-server config the generator writes, generated here from the example config."""
    flags = [
        f if f != CONFIG else str(ROOT / "lifeline.example.toml") for f in generator_flags(compose)
    ]
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "nats-config", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return done.stdout


def test_every_lifeline_service_connects_as_its_role_with_its_secret(compose):
    connect = compose["x-lifeline"]["entrypoint"]
    assert connect[:2] == ["sh", "-c"] and "/run/secrets/nats_password" in connect[2]
    for name, service in lifeline_services(compose, tools=True).items():
        user, prefix = role_user(name, service)
        env = service["environment"]
        assert env["NATS_USER"] == user, name
        assert env.get("NATS_INBOX_PREFIX") == prefix, name
        assert service["secrets"][0] == {"source": user, "target": "nats_password"}, name
        assert compose["secrets"][user] == {"file": f"./secrets/{user}.txt"}, name
        if name == "gateway":  # its API keys too, read as the password is, before it
            assert service["secrets"][1:] == [{"source": KEYS, "target": "gateway_keys"}]
            keys = 'LIFELINE_GATEWAY_KEYS="$$(cat /run/secrets/gateway_keys)"'
            script = service["entrypoint"][2]
            assert script.startswith(keys) and script.endswith(connect[2]), script
            assert service["entrypoint"][:2] + service["entrypoint"][3:4] == connect[:2] + [
                connect[3]
            ]
        else:
            assert len(service["secrets"]) == 1, name
            assert service["entrypoint"][:4] == connect, name  # reads the secret, then lifeline


def test_nats_runs_the_generated_least_privilege_config(compose):
    services = compose["services"]
    generator, nats = services[GENERATOR], services["nats"]
    flags = generator_flags(compose)
    assert flags[flags.index("--config") + 1] == CONFIG
    assert generator["volumes"][0] == compose["x-lifeline"]["volumes"][0]  # the same config
    assert nats["depends_on"] == {GENERATOR: {"condition": "service_completed_successfully"}}
    written = shlex.split(generator["entrypoint"][2])[-1]  # ... && mv new <this>
    volume = next(v for v in generator["volumes"] if not v.startswith("./"))
    name, path = volume.split(":")
    assert f"{name}:{path}:ro" in nats["volumes"] and written.startswith(path + "/")
    args = nats_server_args(compose)
    assert args[args.index("-c") + 1] == written
    assert {"-js", "-m"} <= set(args)
    # every user of that config has its secret, all of them mounted in nats, and no other
    env_names = set(re.findall(r"password: \$(LIFELINE_\w+_PASSWORD)", generated_config(compose)))
    users = set(compose["secrets"]) - {KEYS}
    assert env_names == {permissions.password_env(u) for u in users}
    assert set(nats["secrets"]) == users


def test_no_password_is_written_in_the_file(compose):
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        assert not [k for k in env if re.search("PASSWORD|TOKEN", k)], name
        assert "--nats-password" not in " ".join(_strings(service)), name
    for name, secret in compose["secrets"].items():
        assert set(secret) == {"file"} and secret["file"].startswith("./secrets/"), name
    assert "/secrets/" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_readme_creates_a_secret_file_per_user(compose, tmp_path):
    """README.md's commands make one file per user, each a password nats-server takes:
    letters and digits, starting with a letter (it would parse digits alone as a number)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### The compose stack") :].split("\n## ")[0]
    [block] = [b for b in re.findall(r"```sh\n(.*?)```", section, re.DOTALL) if "secrets/" in b]
    if not shutil.which("openssl"):
        pytest.skip("no openssl here")
    subprocess.run(["sh", "-c", block], cwd=tmp_path, check=True, timeout=30)
    made = {p.name: p.read_text() for p in (tmp_path / "secrets").iterdir()}
    assert set(made) == {f"{user}.txt" for user in compose["secrets"]}
    for name, text in made.items():
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]{15,}\n", text), name
    assert len(set(made.values())) == len(made)


def _script(compose_script: str, paths: dict[str, str]) -> str:
    """A compose script as the container's shell gets it ($$ is $), paths moved here."""
    script = compose_script.replace("$$", "$")
    for old, new in paths.items():
        script = script.replace(old, new)
    return script


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text(errors="replace")):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    log = path.read_text(errors="replace") if path.exists() else ""
    raise AssertionError(f"never logged {pattern!r} (exit {proc.poll()}); log:\n{log[-3000:]}")


def test_the_scripts_run_nats_with_the_secrets_and_lifeline_connects_as_its_role(compose, tmp_path):
    """The generator's, nats's and the Lifeline services' scripts, run here with `sh` (their
    paths moved to tmp_path): nats-server starts on the generated config with a password
    from each secret file, a worker connects as worker-backup and `lifeline health` as the
    operator finds it ready."""
    bin_dir, conf_dir, secrets_dir = tmp_path / "bin", tmp_path / "conf", tmp_path / "secrets"
    for d in (bin_dir, conf_dir, secrets_dir, tmp_path / "data"):
        d.mkdir()
    (bin_dir / "lifeline").write_text(f'#!/bin/sh\nexec {sys.executable} -m service.cli "$@"\n')
    (bin_dir / "lifeline").chmod(0o755)
    (bin_dir / "nats-server").symlink_to(server_binary())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "OTEL_", "LIFELINE_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHONPATH=str(ROOT), OTEL_SDK_DISABLED="true")
    for user in compose["secrets"]:
        (secrets_dir / f"{user}.txt").write_text(f"p{os.urandom(12).hex()}\n")
    generator = compose["services"][GENERATOR]["entrypoint"]
    volume_path = compose["services"][GENERATOR]["volumes"][1].split(":")[1]
    moves = {CONFIG: str(ROOT / "lifeline.example.toml"), volume_path: str(conf_dir)}
    subprocess.run([*generator[:2], _script(generator[2], moves)], env=env, check=True, timeout=60)
    # nats: its secrets are mounted at /run/secrets/<user>
    nats_secrets = tmp_path / "nats-secrets"
    nats_secrets.mkdir()
    for user in compose["services"]["nats"]["secrets"]:
        shutil.copy(secrets_dir / f"{user}.txt", nats_secrets / user)
    port, monitor = free_port(), free_port()
    nats_script = _script(
        compose["services"]["nats"]["entrypoint"][2],
        {
            "/run/secrets": str(nats_secrets),
            volume_path: str(conf_dir),
            "-sd /data": f"-sd {tmp_path / 'data'} -a 127.0.0.1 -p {port}",
            "-m 8222": f"-m {monitor} -l {tmp_path / 'nats.log'}",
        },
    )
    procs = []
    try:
        nats = subprocess.Popen(["sh", "-c", nats_script], env=env, start_new_session=True)
        procs.append(nats)
        _wait_for(tmp_path / "nats.log", "Server is ready", nats)

        def lifeline(name: str, args: list[str]) -> list[str]:
            """The service's entrypoint with `args` after `sh -c SCRIPT lifeline`, and its
            secret where that script reads it."""
            service = compose["services"][name]
            secret = tmp_path / f"run-{name}"
            secret.mkdir()
            for mounted in service["secrets"]:
                shutil.copy(secrets_dir / f"{mounted['source']}.txt", secret / mounted["target"])
            script = _script(service["entrypoint"][2], {"/run/secrets": str(secret)})
            return ["sh", "-c", script, "lifeline", *args]

        def role_env(name: str) -> dict[str, str]:
            found = compose["services"][name]["environment"]
            nats_env = {k: str(v) for k, v in found.items() if k.startswith("NATS_")}
            return {**env, **nats_env, "NATS_URL": f"nats://127.0.0.1:{port}"}

        def start(name: str, changes: dict[str, str]) -> tuple[subprocess.Popen, Path]:
            """The service's command, its options in `changes` given other values, started
            as the service would start it; its output in <name>.log."""
            args = command(compose["services"][name])
            changes = {"--config": str(ROOT / "lifeline.example.toml"), **changes}
            for option, value in changes.items():
                args[args.index(option) + 1] = value
            log = tmp_path / f"{name}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    lifeline(name, args),
                    env=role_env(name),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            procs.append(proc)
            return proc, log

        worker, log = start("worker-backup", {"--health-port": f"127.0.0.1:{free_port()}"})
        _wait_for(log, "worker backup serving", worker)
        assert "auth: user and password (" in log.read_text()
        # the gateway, its API key from its secret
        gateway, gateway_log = start("gateway", {"--host": "127.0.0.1", "--port": "0"})
        _wait_for(gateway_log, r"gateway on http://\S+/v1 \(.*1 API key", gateway)
        [url] = re.findall(r"gateway on (http://\S+/v1)", gateway_log.read_text())
        key = (secrets_dir / f"{KEYS}.txt").read_text().strip()
        request = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
        refused = httpx.post(f"{url}/chat/completions", json=request, timeout=10)
        assert refused.status_code == 401, refused.text
        sent = httpx.post(
            f"{url}/chat/completions",
            json=request,
            headers={"authorization": f"Bearer {key}"},
            timeout=10,
        )  # let in: no dispatcher runs here, so the gateway says that
        assert (sent.status_code, sent.json()["error"]["code"]) == (503, "no_dispatcher")
        # the health tool as the operator, without --expect-all (the only worker is backup's)
        args = compose["services"]["health"]["entrypoint"][4:]
        args.remove("--expect-all")
        args[args.index("--config") + 1] = str(ROOT / "lifeline.example.toml")
        health = subprocess.run(
            lifeline("health", args),
            env=role_env("health"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert health.returncode == 0, health.stdout + health.stderr
        assert "lifeline-worker-backup" in health.stdout
        assert "lifeline-gateway" in health.stdout and url in health.stdout
        assert "Violation" not in (tmp_path / "nats.log").read_text()
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=10)
