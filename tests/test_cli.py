"""The `lifeline` command as a user runs it: real processes, a real nats-server."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "lifeline.example.toml")
LIFELINE = [sys.executable, "-m", "service.cli"]


def lifeline(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LIFELINE, *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
        env=env or _env(),
    )


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_URL", "OTEL_"))}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


_unread: dict[int, bytes] = {}  # per process: output read past the last line waited for


def _wait_for_line(
    proc: subprocess.Popen[str], pattern: str, timeout_s: float = 20
) -> tuple[str, list[str]]:
    """The first new line of proc's stdout matching `pattern`. Reads the pipe with select(),
    so a process that goes quiet fails the test after timeout_s instead of hanging it."""
    deadline, seen = time.monotonic() + timeout_s, []
    assert proc.stdout is not None
    fd, buffer = proc.stdout.fileno(), _unread.pop(proc.pid, b"")
    while True:
        while b"\n" in buffer:
            raw, buffer = buffer.split(b"\n", 1)
            line = raw.decode() + "\n"
            seen.append(line)
            if re.search(pattern, line):
                _unread[proc.pid] = buffer
                return line, seen
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buffer += chunk
    stderr = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
    raise AssertionError(
        f"never printed {pattern!r}; got:\n{''.join(seen)}{buffer.decode()}\n{stderr}"
    )


def _rest(proc: subprocess.Popen[str]) -> str:
    """What proc printed after the last line waited for, up to its exit."""
    assert proc.stdout is not None
    return _unread.pop(proc.pid, b"").decode() + proc.stdout.read()


@pytest.fixture
def running() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`lifeline run` on an embedded NATS on a free port, with the example config."""
    proc = subprocess.Popen(
        [*LIFELINE, "run", "--port", "-1", "--config", EXAMPLE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_env(),
        start_new_session=True,  # its own process group, as in a terminal
    )
    try:
        line, _ = _wait_for_line(proc, r"dispatcher ready")
        url = re.search(r"nats://[\d.]+:\d+", line).group(0)  # type: ignore[union-attr]
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            stream and stream.close()


def test_help_lists_every_command_with_an_example():
    out = lifeline("--help").stdout
    for command in ("run", "dispatcher", "worker", "ask", "check-config"):
        assert command in out
    assert 'lifeline ask "Why did the chicken cross the road?"' in out


def test_run_then_ask_shows_the_answer_the_provider_and_every_attempt(running):
    proc, url = running
    result = lifeline("ask", "--nats-url", url, "Why did the chicken cross the road?")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("Why did the chicken cross the road?")  # the example's backup echoes
    assert "served by backup" in out
    assert re.search(r"1\. flaky .* rate_limit 429", out)
    assert re.search(r"2\. sleepy .* timeout", out)
    assert re.search(r"3\. backup .* ok", out)
    # `run` prints a line per request from the audit subject, and stops cleanly on Ctrl-C,
    # which a terminal sends to the whole process group (the embedded server included).
    _wait_for_line(
        proc,
        r"\[ok\] id=\w+ .*flaky:rate_limit 429->fallback -> sleepy:timeout->fallback -> backup:ok",
    )
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=15) == 0
    assert "stopped" in _rest(proc)


def test_ask_exits_non_zero_and_explains_an_error_reply(running):
    _, url = running
    result = lifeline("ask", "--nats-url", url, "--route", "nope", "hi")
    assert result.returncode == 1
    assert "unknown_route" in result.stdout and "'default'" in result.stdout


def test_dispatcher_and_worker_run_as_separate_processes(nats_url):
    procs = [
        subprocess.Popen(
            [*LIFELINE, *args, "--config", EXAMPLE, "--nats-url", nats_url],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in (["worker", "backup"], ["dispatcher"])
    ]
    try:
        deadline = time.monotonic() + 20
        while True:  # until both have subscribed
            result = lifeline(
                "ask", "--nats-url", nats_url, "--target", "backup", "--timeout", "2", "ping"
            )
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "served by backup" in result.stdout
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(timeout=15) for proc in procs] == [0, 0]
        for proc in procs:
            proc.stderr and proc.stderr.close()


def test_a_bad_config_fails_at_start_up_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[providers.a]\nkind = "fake"\ntimeout_s = "soon"\n')
    result = lifeline("dispatcher", "--config", str(bad), "--nats-url", "nats://127.0.0.1:1")
    assert result.returncode == 2
    assert "providers.a.timeout_s" in result.stderr


def test_a_bad_policy_key_fails_at_start_up_naming_it(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[providers.a]\nkind = "fake"\n\n[templates.terse]\nuser = "Be terse."\n\n'
        '[routes.default]\ntargets = [{ provider = "a", template = "terse" }]\n'
    )
    result = lifeline("dispatcher", "--config", str(bad), "--nats-url", "nats://127.0.0.1:1")
    assert result.returncode == 2
    assert "templates.terse: `user` must contain {input}" in result.stderr


def test_ask_can_simulate_a_fault_and_show_the_retry(tmp_path, nats_url):
    cfg = tmp_path / "faults.toml"
    cfg.write_text(
        '[dispatcher]\nallow_fault_injection = true\n\n[providers.a]\nkind = "fake"\nreply = "from a"\n\n'
        '[routes.default]\ntargets = [{ provider = "a", retries = 1, backoff_s = 0 }]\n'
    )
    proc = subprocess.Popen(
        [*LIFELINE, "run", "--config", str(cfg), "--nats-url", nats_url, "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_env(),
    )
    try:
        _wait_for_line(proc, r"dispatcher ready")
        result = lifeline("ask", "--nats-url", nats_url, "--fault", "a=503,ok", "hi")
        assert result.returncode == 0, result.stdout + result.stderr
        assert re.search(r"1\. a .* server_error 503->retry", result.stdout)
        assert re.search(r"2\. a \(retry 1\) .* ok", result.stdout)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        for stream in (proc.stdout, proc.stderr):
            stream and stream.close()


def test_a_worker_without_its_api_key_says_which_variable_to_set(tmp_path):
    cfg = tmp_path / "openai.toml"
    cfg.write_text(
        '[providers.gpt]\nkind = "openai"\nmodel = "gpt-4o-mini"\napi_key_env = "LIFELINE_TEST_KEY"\n'
    )
    result = lifeline("worker", "gpt", "--config", str(cfg), "--nats-url", "nats://127.0.0.1:1")
    assert result.returncode == 2
    assert "LIFELINE_TEST_KEY" in result.stderr


def test_ask_without_a_server_says_how_to_start_one():
    result = lifeline("ask", "--nats-url", "nats://127.0.0.1:1", "hi")
    assert result.returncode != 0
    assert "lifeline run" in result.stderr


def test_check_config_shows_groups_and_error_class_chains(tmp_path):
    cfg = tmp_path / "groups.toml"
    cfg.write_text(
        '[providers.a]\nkind = "fake"\n[providers.b]\nkind = "fake"\n\n[routes.default]\n'
        'targets = [{ group = [{ provider = "a", weight = 3 }, "b"] }, "b"]\ncontext_length_fallbacks = ["b"]\n'
    )
    result = lifeline("check-config", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    assert "{a x3 | b} -> b" in result.stdout
    assert "on context_length: b" in result.stdout
