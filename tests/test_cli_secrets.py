"""What every `lifeline` command writes when it fails: the credentials it was given (a NATS
URL's password, a token, an NKey seed, a .creds file, a provider's key in the config) never in
it, whichever exception the line quotes, and still what to do. Real processes, a real
nats-server."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nkeys
import pytest
from helpers import cli_env, fake, free_port, lifelines_side_by_side, run_lifeline, write_config

from service.embedded import EmbeddedNats

MARK = f"MARK-{secrets.token_hex(8)}"  # every planted secret holds it

# Each command that takes --config, with what it needs besides (`ask` reads [nats] only).
COMMANDS = {
    "check-config": ["check-config"],
    "run": ["run", "--port", "-1", "--no-gateway"],
    "dispatcher": ["dispatcher"],
    "worker": ["worker", "echo"],
    "gateway": ["gateway", "--port", "0"],
    "nats-config": ["nats-config"],
    "ask": ["ask", "hi"],
    "submit": ["submit", "hi"],
    "result": ["result", "job-1"],
    "audit": ["audit"],
    "status": ["status"],
    "health": ["health", "--expect-all"],
}


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedNats]:
    """A nats-server taking one user, whose password no test gives."""
    nats = EmbeddedNats(
        port=-1, conf='authorization { users = [ { user: alice, password: "right-one" } ] }\n'
    )
    nats.start()
    yield nats
    nats.stop()


def test_a_config_error_quoting_a_url_hides_its_user_info_in_every_command(tmp_path):
    """A base_url with a key in its user info, refused for its scheme: each command names the
    key at fault and the URL, its user info as ***."""
    bad = {"kind": "openai", "model": "gpt-4o-mini", "base_url": f"ftp://user:{MARK}@proxy"}
    path = write_config(
        tmp_path / "lifeline.toml",
        {
            "providers": {"echo": fake(), "upstream": bad},
            "routes": {"default": {"targets": ["echo"]}},
        },
    )
    commands = {
        name: [*argv, "--config", str(path)] for name, argv in COMMANDS.items() if name != "ask"
    }
    commands["batch"] = ["batch", str(_jobs(tmp_path)), "--config", str(path)]
    with lifelines_side_by_side(commands, parallel=3) as runs:
        for name, run in runs.items():
            ran = run.result()
            assert ran.returncode == 2, (name, ran.stderr)
            assert "providers.upstream: base_url must start with http:// or https://" in ran.stderr
            assert "ftp://***@proxy" in ran.stderr, (name, ran.stderr)
            assert MARK not in ran.stdout + ran.stderr, name


def test_a_plug_in_s_key_in_its_settings_is_not_printed_when_making_it_fails(tmp_path):
    """check-config and the worker make the class; its error quotes the key it was given in
    [providers.NAME.settings], which it did not declare in `secrets`."""
    plugin = {
        "kind": "python",
        "class": "tests.plugin_models:KeyInSettingsInitRaises",
        "settings": {"api_key": f"sk-{MARK}"},
    }
    path = write_config(tmp_path / "lifeline.toml", {"providers": {"mine": plugin}})
    commands = {
        "check-config": ["check-config", "--config", str(path)],
        "worker": ["worker", "mine", "--config", str(path)],
    }
    with lifelines_side_by_side(commands) as runs:
        for name, run in runs.items():
            ran = run.result()
            assert ran.returncode == 2, (name, ran.stderr)
            assert (
                "could not be made (RuntimeError: 401 Unauthorized: key *** is not valid"
                in ran.stderr
            )
            assert MARK not in ran.stdout + ran.stderr, name


@pytest.mark.parametrize("way", ["url", "token", "nkey", "creds"])
def test_a_refused_nats_credential_is_named_not_shown_by_every_client_command(
    way, tmp_path, server
):
    """Each client command given a credential the server refuses, each way it takes one:
    exit 1, one line saying what was refused, no secret."""
    argv, env = _credential(way, server, tmp_path)
    commands = {
        name: [*COMMANDS[name], *argv]
        for name in ("ask", "submit", "result", "audit", "status", "health")
    }
    commands["batch"] = ["batch", str(_jobs(tmp_path)), *argv]
    with lifelines_side_by_side(commands, env=cli_env(**env), parallel=3) as runs:
        for name, run in runs.items():
            ran = run.result()
            assert ran.returncode == 1, (name, ran.stderr)
            assert "refused" in ran.stderr, (name, ran.stderr)
            assert MARK not in ran.stdout + ran.stderr, name
            assert _seed_of(tmp_path) not in ran.stdout + ran.stderr, name


def test_an_unreachable_nats_url_is_shown_without_its_user_info(tmp_path):
    url = f"nats://alice:{MARK}@127.0.0.1:{free_port()}"
    commands = {name: COMMANDS[name] for name in ("ask", "status", "health", "audit")}
    with lifelines_side_by_side(commands, env=cli_env(NATS_URL=url), parallel=2) as runs:
        for name, run in runs.items():
            ran = run.result()
            assert ran.returncode == 1, (name, ran.stderr)
            assert "cannot reach NATS at nats://***@127.0.0.1" in ran.stderr, (name, ran.stderr)
            assert MARK not in ran.stdout + ran.stderr, name


def _jobs(folder: Path) -> Path:
    path = folder / "jobs.jsonl"
    path.write_text('{"id": "job-1", "messages": [{"role": "user", "content": "hi"}]}\n')
    return path


def _seed_of(folder: Path) -> str:
    path = folder / "user.nk"
    if not path.exists():
        path.write_text(nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER).decode())
    return path.read_text().strip()


def _credential(way: str, server: EmbeddedNats, folder: Path) -> tuple[list[str], dict[str, str]]:
    url = server.url
    if way == "url":
        return ["--nats-url", url.replace("//", f"//alice:{MARK}@")], {}
    if way == "token":
        return ["--nats-url", url], {"NATS_TOKEN": MARK}
    seed = _seed_of(folder)
    if way == "nkey":
        return ["--nats-url", url, "--nats-nkey", str(folder / "user.nk")], {}
    creds = folder / "user.creds"
    creds.write_text(
        "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ.e30.e30\n"
        "------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
    return ["--nats-url", url], {"NATS_CREDS": str(creds)}


def test_a_bugs_traceback_goes_through_the_same_scrubbing():
    """An exception no command catches still ends in a traceback and exit status 1, without
    the credential its message quotes."""
    bug = (
        "import sys\n"
        "from service import cli\n"
        "async def failing(args):\n"
        f"    raise RuntimeError('unexpected: token {MARK} in hand')\n"
        "cli.cmd_status = failing\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", bug, "status", "--nats-token", MARK],
        capture_output=True,
        text=True,
        timeout=30,
        env=cli_env(),
        check=False,
    )
    assert ran.returncode == 1, ran.stderr
    assert "Traceback" in ran.stderr and "RuntimeError: unexpected: token *** in hand" in ran.stderr
    assert MARK not in ran.stdout + ran.stderr


def test_a_user_name_and_a_short_password_leave_the_lines_readable(tmp_path):
    """Only what is secret is hidden: a user whose password the config names is no token,
    and a password of a few letters ("nats") is a word every line may hold."""
    table = {"password_env": "SWEEP_NATS_PASSWORD"}
    path = write_config(tmp_path / "lifeline.toml", {"nats": table, "providers": {"e": fake()}})
    commands = {
        "user": ["status", "--config", str(path), "--nats-user", "lifeline"],
        "short": ["status", "--nats-user", "alice", "--nats-password", "nats"],
    }
    env = cli_env(NATS_URL=f"nats://127.0.0.1:{free_port()}", SWEEP_NATS_PASSWORD=MARK)
    with lifelines_side_by_side(commands, env=env) as runs:
        for name, run in runs.items():
            ran = run.result()
            assert ran.returncode == 1, (name, ran.stderr)
            assert "lifeline: cannot reach NATS at nats://127.0.0.1:" in ran.stderr, ran.stderr


def test_a_secret_file_that_is_a_pipe_is_not_read_for_scrubbing(tmp_path):
    """Files the config names for secrets are read for their values, a regular file's start
    only: a pipe (or /dev/zero) named there would have been read without end."""
    fifo = tmp_path / "token.pipe"
    os.mkfifo(fifo)
    plugin = {
        "kind": "python",
        "class": "tests.plugin_models:KeyInSettingsInitRaises",
        "settings": {"api_key": f"sk-{MARK}", "token_file": str(fifo)},
    }
    path = write_config(tmp_path / "lifeline.toml", {"providers": {"mine": plugin}})
    ran = run_lifeline("check-config", "--config", str(path))
    assert ran.returncode == 2 and "token_file" in ran.stderr, ran.stderr
