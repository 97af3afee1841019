"""LiteLLM's proxy for the gateway comparison, answering every request with a mock response.

LiteLLM pins its own dependencies and pulls in many, so it never enters Lifeline's venv: the
first full run installs `litellm[proxy]` from PyPI into `.venv-litellm` (git-ignored; a few
minutes, once), and every run starts it as a process of its own, one worker, on a free port of
127.0.0.1, with its request logging off (as the gateway's is) and its model cost map read
from the package, not fetched. When it cannot be installed or does not come up, the case is
skipped with the reason in the report; `--no-litellm` skips it outright.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-litellm"
PACKAGE = "litellm[proxy]"
MODEL = "main"  # the model name every HTTP case asks for
ANSWER = "Hello"
# The key every HTTP case sends; LiteLLM refuses to start without a strong master key, and the
# gateway checks it as well, so both pay for a key check. Not a secret: a local benchmark's.
API_KEY = "sk-lifeline-bench-7f3c9a1e5b2d4f6a8c0e1b3d5f7a9c2e"

# One model whose every call is answered with ANSWER by LiteLLM itself (no provider called).
CONFIG = f"""\
model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_key: not-used
      mock_response: {ANSWER}
litellm_settings:
  set_verbose: false
  telemetry: false
"""

# uvicorn's access log off, as the gateway's is: the comparison is of the request path.
LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"uvicorn.access": {"level": "WARNING"}, "uvicorn.error": {"level": "WARNING"}},
}

Log = Callable[..., None]


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    url: str  # the OpenAI base URL, .../v1 (LiteLLM also serves /v1/chat/completions)
    version: str
    workdir: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def installed() -> Path | None:
    exe = VENV / "bin" / "litellm"
    return exe if exe.exists() else None


def install(log: Log) -> tuple[Path | None, str]:
    """The proxy's executable, installed into .venv-litellm first if needed; else None and why."""
    if (exe := installed()) is not None:
        return exe, ""
    log(f"installing {PACKAGE} into {VENV.name} for the LiteLLM case (once; a few minutes) ...")
    started = time.monotonic()
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=300
        )
        subprocess.run(
            [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", PACKAGE],
            check=True,
            capture_output=True,
            timeout=1800,
        )
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(VENV, ignore_errors=True)
        tail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
        return None, f"`pip install {PACKAGE}` failed: {' / '.join(tail) or exc}"
    except (subprocess.TimeoutExpired, OSError) as exc:
        shutil.rmtree(VENV, ignore_errors=True)
        return None, f"`pip install {PACKAGE}` did not finish: {exc}"
    log(f"installed {PACKAGE} in {time.monotonic() - started:.0f} s")
    return installed(), ""


def start(log: Log, timeout_s: float = 180.0) -> tuple[Proxy | None, str]:
    """LiteLLM's proxy up and answering, or None and why not."""
    exe, why = install(log)
    if exe is None:
        return None, why
    workdir = Path(tempfile.mkdtemp(prefix="lifeline-litellm-"))
    (workdir / "config.yaml").write_text(CONFIG)
    (workdir / "log.json").write_text(json.dumps(LOG_CONFIG))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LITELLM_"))}
    env |= {
        "LITELLM_MASTER_KEY": API_KEY,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the cost map from the internet
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "NO_DOCS": "True",
    }
    log_file = (workdir / "litellm.log").open("wb")
    process = subprocess.Popen(
        [
            str(exe),
            "--config",
            str(workdir / "config.yaml"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
            "--log_config",
            str(workdir / "log.json"),
        ],
        cwd=workdir,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log_file.close()
    proxy = Proxy(process, f"http://127.0.0.1:{port}/v1", _version(), workdir)
    log(f"starting LiteLLM {proxy.version}'s proxy on 127.0.0.1:{port} ...", end=" ", flush=True)
    started = time.monotonic()
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if _answers(proxy.url):
            log(f"up in {time.monotonic() - started:.0f} s")
            return proxy, ""
        time.sleep(0.5)
    output = (workdir / "litellm.log").read_text(errors="replace").strip().splitlines()[-5:]
    proxy.stop()
    log("failed")
    return None, f"LiteLLM's proxy did not come up in {timeout_s:g} s: {' / '.join(output)}"


def _answers(url: str) -> bool:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}]}
    try:
        response = httpx.post(
            f"{url}/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {API_KEY}"},
            timeout=5,
        )
        return response.status_code == 200 and ANSWER in response.text
    except httpx.HTTPError:
        return False


def _version() -> str:
    try:
        out = subprocess.run(
            [str(VENV / "bin" / "python"), "-m", "pip", "show", "litellm"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return next(
        (line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Version:")),
        "unknown",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
