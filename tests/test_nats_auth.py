"""Every way NATS authenticates, end to end over real nats-servers; a wrong credential failing
fast; no secret in any output.

Each method's test starts a nats-server that demands it and a Lifeline stack (dispatcher and
worker) connected with it, then `lifeline ask` and `lifeline status` as real processes, each
taking the method from another place (a flag, the config's [nats] table, the environment), so
every place is used by some method. The keys are made here: NKeys with the nkeys package, the
operator, account and user JWTs signed with them, a private CA and its certificates with
openssl.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nkeys
import pytest
from helpers import LIFELINE, ROOT, LifelineProcess, cli_env, free_port, write_config

from service import cli
from service.app import NatsRefused, connect, start_stack
from service.config import ConfigError, parse_config
from service.embedded import EmbeddedNats
from service.natsopts import NatsOptionError, NatsOptions, NatsSettings, resolve
from service.telemetry import Tracing

# Distinctive, so that finding it anywhere it was printed is certain.
SECRET = f"Hunter2-LIFELINE-{secrets.token_hex(6)}"
LIFELINE_CONFIG = {
    "providers": {"echo": {"kind": "fake", "model": "echo-1"}},
    "routes": {"default": {"targets": ["echo"]}},
}
QUESTION = "Why did the chicken cross the road?"
JWT_HEADER = b'{"typ":"JWT","alg":"ed25519-nkey"}'


# ---- keys, JWTs and certificates --------------------------------------------------------


def _keypair(prefix: int) -> tuple[str, str, nkeys.KeyPair]:
    """(seed, public key, key pair) of a new NKey of the given kind."""
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    pair = nkeys.from_seed(bytearray(seed))
    return seed.decode(), pair.public_key.decode(), pair


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _jwt(issuer: nkeys.KeyPair, subject: str, name: str, claims: dict[str, Any]) -> str:
    """A NATS JWT (v2), signed by `issuer` as nsc would."""
    body: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {**claims, "version": 2},
    }
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    signed = f"{_b64(JWT_HEADER)}.{_b64(json.dumps(body).encode())}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A user NKey seed file; an operator-mode server config and a .creds file it accepts; a
    private CA, a server certificate and a client certificate it signed, and another CA."""
    d = tmp_path_factory.mktemp("keys")
    seed, public, _ = _keypair(nkeys.PREFIX_BYTE_USER)
    (d / "user.nk").write_text(seed + "\n")

    _, operator_pub, operator = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    _, system_pub, _ = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    _, account_pub, account = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    user_seed, user_pub, _ = _keypair(nkeys.PREFIX_BYTE_USER)
    unlimited = {"subs": -1, "conn": -1, "leaf": -1, "imports": -1, "exports": -1, "data": -1}
    unlimited |= {"payload": -1, "wildcards": True}
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    user_claims = {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}
    user_jwt = _jwt(account, user_pub, "lifeline", user_claims)
    (d / "user.creds").write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user_seed}\n------END USER NKEY SEED------\n"
    )
    operator_jwt = _jwt(operator, operator_pub, "op", {"type": "operator"})
    system_jwt = _jwt(operator, system_pub, "SYS", {"type": "account", "limits": unlimited})
    account_limits = {"type": "account", "limits": unlimited | jetstream}
    account_jwt = _jwt(operator, account_pub, "LIFELINE", account_limits)
    operator_conf = (
        f"operator: {operator_jwt}\nsystem_account: {system_pub}\nresolver: MEMORY\n"
        f"resolver_preload: {{\n  {system_pub}: {system_jwt}\n  {account_pub}: {account_jwt}\n}}\n"
    )

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
    ca_ext = ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign"]
    signed_by_ca = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2"]
    for ca in ("ca", "other-ca"):
        files = ["-keyout", f"{ca}.key", "-out", f"{ca}.pem"]
        openssl("req", "-x509", *ec, *files, *ca_ext, "-subj", f"/CN=Lifeline test {ca}")
    for name, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        (d / f"{name}.ext").write_text(
            f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n"
        )
        files = ["-keyout", f"{name}.key", "-out", f"{name}.csr"]
        openssl("req", *ec[:-2], *files, "-subj", f"/CN=lifeline-{name}")
        cert = ["-in", f"{name}.csr", "-out", f"{name}.pem", "-extfile", f"{name}.ext"]
        openssl("x509", "-req", *cert, *signed_by_ca)
    files = {
        k: str(d / k)
        for k in ("user.nk", "user.creds", "ca.pem", "other-ca.pem")
        + ("server.pem", "server.key", "client.pem", "client.key")
    }
    return {**files, "nkey_public": public, "operator_conf": operator_conf}


# ---- the methods ------------------------------------------------------------------------


@dataclass
class Way:
    """One way for a `lifeline` process to be given the method: flags, [nats] keys, env."""

    flags: list[str] = field(default_factory=list)
    table: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Method:
    conf: str  # the nats-server's configuration
    stack: dict[str, str]  # NatsOptions for the in-process stack
    ask: Way  # how `lifeline ask` is given the method
    status: Way  # and `lifeline status`
    scheme: str = "nats"


def method(name: str, keys: dict[str, str], tmp_path: Path) -> Method:
    tls = f'tls {{ cert_file: "{keys["server.pem"]}", key_file: "{keys["server.key"]}"'
    ca, cert, key = keys["ca.pem"], keys["client.pem"], keys["client.key"]
    if name == "user_password":
        password_file = tmp_path / "nats-password"
        password_file.write_text(SECRET + "\n")
        return Method(
            f'authorization {{ users = [ {{ user: alice, password: "{SECRET}" }} ] }}',
            {"user": "alice", "password": SECRET},
            Way(flags=["--nats-user", "alice"], env={"NATS_PASSWORD": SECRET}),
            Way(table={"user": "alice", "password_file": str(password_file)}),
        )
    if name == "token":
        return Method(
            f'authorization {{ token: "{SECRET}" }}',
            {"token": SECRET},
            Way(env={"NATS_TOKEN": SECRET}),
            Way(table={"token_env": "LIFELINE_TEST_TOKEN"}, env={"LIFELINE_TEST_TOKEN": SECRET}),
        )
    if name == "nkey":
        return Method(
            f"authorization {{ users = [ {{ nkey: {keys['nkey_public']} }} ] }}",
            {"nkey": keys["user.nk"]},
            Way(table={"nkey": keys["user.nk"]}),
            Way(env={"NATS_NKEY": keys["user.nk"]}),
        )
    if name == "creds":
        return Method(
            keys["operator_conf"],
            {"creds": keys["user.creds"]},
            Way(env={"NATS_CREDS": keys["user.creds"]}),
            Way(flags=["--nats-creds", keys["user.creds"]]),
        )
    if name == "tls":
        return Method(
            tls + " }",
            {"ca": ca},
            Way(flags=["--nats-ca", ca]),
            Way(env={"NATS_CA": ca}),
            scheme="tls",
        )
    assert name == "mutual_tls"
    return Method(
        tls + f', ca_file: "{ca}", verify: true }}',
        {"ca": ca, "cert": cert, "key": key},
        Way(table={"ca": ca, "cert": cert, "key": key}),
        Way(env={"NATS_CA": ca, "NATS_CERT": cert, "NATS_KEY": key}),
    )


METHODS = ["user_password", "token", "nkey", "creds", "tls", "mutual_tls"]


@dataclass
class Ran:
    code: int
    out: str
    err: str


async def lifeline(*args: str, env: dict[str, str] | None = None, timeout_s: float = 30) -> Ran:
    """`lifeline <args>` as a process, without blocking this test's event loop (its stack).
    One that has not ended within timeout_s (a hang: a refusal retried for good) fails."""
    proc = await asyncio.create_subprocess_exec(
        *LIFELINE,
        *args,
        cwd=ROOT,
        env=cli_env(**(env or {})),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


@pytest.fixture
def here(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """`lifeline <command> <args>` run in this process (as a process would, its environment
    set, its output captured): the same code without a process's start-up. One that has not
    returned within 30 s (a hang: a refusal retried for good) fails."""
    for name in [n for n in os.environ if n.startswith("NATS_")]:
        monkeypatch.delenv(name)

    async def run(*argv: str, env: dict[str, str] | None = None) -> Ran:
        with monkeypatch.context() as patch:
            for name, value in (env or {}).items():
                patch.setenv(name, value)
            args = cli.build_parser().parse_args(list(argv))
            async with asyncio.timeout(30):
                code = await getattr(cli, f"cmd_{args.command}")(args)
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


def client_args(way: Way, url: str, tmp_path: Path, name: str) -> tuple[list[str], dict[str, str]]:
    config = write_config(tmp_path / f"{name}.toml", {**LIFELINE_CONFIG, "nats": way.table})
    return ["--config", str(config), "--nats-url", url, *way.flags], way.env


@pytest.fixture
def server_for() -> Iterator[Any]:
    servers: list[EmbeddedNats] = []

    def start(conf: str) -> EmbeddedNats:
        server = EmbeddedNats(port=-1, conf=conf + "\n")
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
async def stacks(tracers: Tracing) -> AsyncIterator[list[Any]]:
    started: list[Any] = []
    yield started
    for stack in started:
        await stack.stop()


# ---- each method, end to end ------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
async def test_each_auth_method_serves_a_request_end_to_end(
    name, keys, tmp_path, server_for, stacks, tracers, here
):
    """The dispatcher and worker connect with the method, `lifeline ask` gets its answer
    through them and `lifeline status` reads the shared health bucket, each given the method
    another way. (In this process, to keep the file quick: the tests below run `lifeline` as
    processes, services and clients, given credentials by the environment, the [nats] table,
    flags and the URL.)"""
    m = method(name, keys, tmp_path)
    server = server_for(m.conf)
    url = f"{m.scheme}://{server.host}:{server.port}"
    options = NatsOptions(servers=url, **m.stack)
    stacks.append(await start_stack(parse_config(LIFELINE_CONFIG), options, tracers))

    ask_args, ask_env = client_args(m.ask, url, tmp_path, "ask")
    asked = await here("ask", *ask_args, QUESTION, env=ask_env)
    assert asked.code == 0, asked.err
    assert asked.out.strip() == QUESTION  # the fake provider echoes; stdout has the answer only
    assert "served by echo" in asked.err

    status_args, status_env = client_args(m.status, url, tmp_path, "status")
    status = await here("status", *status_args, env=status_env)
    assert status.code == 0, status.err
    assert status.out.startswith(f"bucket lifeline_health on {url}: ")
    for ran in (asked, status):
        assert SECRET not in ran.out + ran.err


async def test_a_command_over_tls_prints_no_asyncio_warning_as_it_closes(
    keys, tmp_path, server_for, stacks, tracers
):
    """Every command over TLS (and every service as it stopped) printed "WARNING asyncio
    returning true from eof_received() has no effect when using ssl": nats-py upgrades its
    connection with start_tls, which never tells the stream protocol it is over TLS."""
    m = method("mutual_tls", keys, tmp_path)
    server = server_for(m.conf)
    url = f"tls://{server.host}:{server.port}"
    stacks.append(
        await start_stack(
            parse_config(LIFELINE_CONFIG), NatsOptions(servers=url, **m.stack), tracers
        )
    )
    env = m.status.env
    asked = await lifeline("ask", "--nats-url", url, QUESTION, env=env)
    status = await lifeline("status", "--nats-url", url, env=env)
    for ran in (asked, status):
        assert ran.code == 0, ran.err
        assert "eof_received" not in ran.err, ran.err


# ---- failing fast -----------------------------------------------------------------------


async def test_a_wrong_credential_fails_fast_with_a_clear_message(keys, tmp_path, server_for, here):
    """A service (which waits for a server that is not up yet) and a client both stop at the
    first refusal, saying what was refused and where it came from; so do a TLS handshake the
    server refuses (no client certificate) and one the client refuses (another CA); and a
    missing file is named with its option before anything connects."""
    users = server_for(f'authorization {{ users = [ {{ user: alice, password: "{SECRET}" }} ] }}')
    mtls = server_for(method("mutual_tls", keys, tmp_path).conf)
    config = write_config(tmp_path / "lifeline.toml", LIFELINE_CONFIG)
    wrong = "Wrong-" + SECRET[::-1]
    service, client = await asyncio.gather(
        lifeline(
            "dispatcher",
            "--config",
            str(config),
            "--nats-url",
            users.url,
            "--nats-user",
            "alice",
            env={"NATS_PASSWORD": wrong},
        ),
        lifeline("ask", "--nats-url", users.url.replace("//", f"//alice:{wrong}@"), "hi"),
    )
    assert service.code == 2, service.err
    assert "refused user and password (--nats-user, $NATS_PASSWORD)" in service.err
    assert "Authorization Violation" in service.err and "not retrying" in service.err
    assert client.code == 1 and "refused the user info in the URL" in client.err, client.err
    assert "nats://***@127.0.0.1" in client.err

    no_cert = await here("status", "--nats-url", mtls.url, "--nats-ca", keys["ca.pem"])
    # The server's "certificate required" alert may come as a TLS error or, under load, as the
    # connection reset after it: refused or unreachable, one line and no retrying either way.
    assert no_cert.code == 1, no_cert.err
    assert "TLS handshake failed" in no_cert.err or "cannot reach NATS" in no_cert.err
    assert "--nats-cert and --nats-key" in no_cert.err  # what to set, either way
    other_ca = await here("status", "--nats-url", mtls.url, env={"NATS_CA": keys["other-ca.pem"]})
    assert other_ca.code == 1 and "TLS handshake failed" in other_ca.err, other_ca.err
    assert f"CA {keys['other-ca.pem']} ($NATS_CA)" in other_ca.err
    for ran in (service, client, no_cert, other_ca):  # each ended: none retried for good
        # One line saying what was refused, no traceback; a service may have logged the
        # connection the server reset on its way to the refusal (a retry, as it logs them).
        *before, _ = ran.err.strip().splitlines()
        assert "Traceback" not in ran.err, ran.err
        assert not before or (ran is service and all(" WARNING " in x for x in before)), ran.err
        assert SECRET not in ran.out + ran.err and wrong not in ran.out + ran.err

    gone = tmp_path / "gone.creds"
    with pytest.raises(NatsOptionError, match=f"--nats-creds: the credentials file {gone}: no "):
        await here("status", "--nats-url", users.url, "--nats-creds", str(gone))
    with pytest.raises(NatsOptionError, match=r"\$NATS_KEY: the key file /nowhere: no such"):
        await here("status", env={"NATS_CERT": keys["client.pem"], "NATS_KEY": "/nowhere"})


async def test_an_unreachable_tls_server_without_a_client_certificate_names_the_flags(here):
    """A server that verifies clients may reset the connection instead of refusing it: then
    "cannot reach" is all nats-py says, so the message names what may be missing."""
    tls = await here("status", "--nats-url", f"tls://127.0.0.1:{free_port()}")
    assert tls.code == 1 and "cannot reach NATS" in tls.err, tls.err
    assert "set --nats-cert and --nats-key" in tls.err
    plain = await here("status", "--nats-url", f"nats://127.0.0.1:{free_port()}")
    assert plain.code == 1 and "--nats-cert" not in plain.err, plain.err


async def test_connect_raises_at_once_on_a_refusal_even_for_a_service_that_waits(server_for):
    server = server_for(f'authorization {{ token: "{SECRET}" }}')
    # A service retries an unreachable server for good: a refusal retried would hang out the
    # bound; raised at once, it ends the wait.
    async with asyncio.timeout(30):
        with pytest.raises(NatsRefused, match="refused a token") as refused:
            await connect(NatsOptions(servers=server.url, token="not-it"), "test")
    assert "not-it" not in str(refused.value)


# ---- no secret in any output -------------------------------------------------------------


async def test_no_secret_in_logs_status_replies_audit_or_spans(tmp_path, server_for, here, caplog):
    """A dispatcher and a worker as processes, logging at DEBUG and printing their spans,
    given the password by the environment and by the [nats] table; clients given it in the
    URL, as flags and as variables. The password shows up nowhere; the URL is shown as ***."""
    server = server_for(f'authorization {{ users = [ {{ user: alice, password: "{SECRET}" }} ] }}')
    secret_url = f"nats://alice:{SECRET}@{server.host}:{server.port}"
    table = {"user": "alice", "password_env": "LIFELINE_TEST_NATS_PASSWORD"}
    config = write_config(tmp_path / "lifeline.toml", {**LIFELINE_CONFIG, "nats": table})
    debug = {"LIFELINE_LOG_LEVEL": "DEBUG", "OTEL_TRACES_EXPORTER": "console"}
    dispatcher = LifelineProcess(
        ["dispatcher", "--config", str(config), "--nats-url", server.url],
        tmp_path / "dispatcher.log",
        {**debug, "LIFELINE_TEST_NATS_PASSWORD": SECRET},
    )
    plain = write_config(tmp_path / "plain.toml", LIFELINE_CONFIG)
    worker = LifelineProcess(
        ["worker", "echo", "--config", str(plain), "--nats-url", secret_url],
        tmp_path / "worker.log",
        debug,
    )
    try:
        for proc, ready in ((dispatcher, "dispatcher serving"), (worker, "worker echo serving")):
            await asyncio.to_thread(proc.wait_for_log, ready)
        caplog.set_level(logging.DEBUG)
        asked = await lifeline("ask", "--json", "--nats-url", secret_url, QUESTION)
        assert asked.code == 0, asked.err
        status = await here("status", "--nats-url", secret_url)
        audit = await here(
            "audit",
            "--json",
            "--nats-user",
            "alice",
            "--nats-url",
            server.url,
            env={"NATS_PASSWORD": SECRET},
        )
        refused = await here("status", "--nats-url", secret_url.replace("alice", "mallory"))
    finally:
        for proc in (worker, dispatcher):
            proc.stop()  # flushes the spans
    assert f"bucket lifeline_health on nats://***@127.0.0.1:{server.port}" in status.out
    assert json.loads(asked.out)["content"] == QUESTION
    assert json.loads(asked.out)["id"] in audit.out
    assert refused.code == 1 and "nats://***@127.0.0.1" in refused.err
    logs = dispatcher.log() + worker.log()
    assert '"span_id"' in logs  # the spans were printed
    assert "auth: user and password" in logs
    outputs = [*(ran.out + ran.err for ran in (asked, status, audit, refused)), logs, caplog.text]
    for text in outputs:
        assert SECRET not in text


@pytest.mark.parametrize("cut", ["/", "?", "#", ","])
async def test_a_password_a_url_cannot_hold_is_refused_without_quoting_any_of_it(tmp_path, cut):
    """A password with a '/', '?' or '#' (base64 ones have '/') ends the URL's host there, and
    one with a ',' is split as a cluster's list: the refusal quoted what urlsplit took for the
    port, the password's start ("Port could not be cast to integer value as 'Hunter2-...'");
    one whose start is digits was not refused at all, and alice:<digits> was dialled."""
    config = write_config(tmp_path / "lifeline.toml", LIFELINE_CONFIG)
    for password in (f"{SECRET}{cut}tail", f"1234{cut}{SECRET}"):
        url = f"nats://alice:{password}@127.0.0.1:4222"
        for command in (["check-config", "--config", str(config)], ["status"]):
            ran = await lifeline(*command, env={"NATS_URL": url})
            assert ran.code != 0, ran.out
            assert "nats://***@127.0.0.1:4222" in ran.err and "NATS_PASSWORD" in ran.err, ran.err
            assert SECRET not in ran.out + ran.err
            assert "1234" not in ran.err.replace("127.0.0.1:4222", "")


# ---- where options come from ------------------------------------------------------------


def test_a_flag_beats_the_config_which_beats_the_environment(tmp_path):
    env = {"NATS_URL": "nats://env:4222", "NATS_USER": "from-env", "NATS_PASSWORD": SECRET}
    env |= {"NATS_INBOX_PREFIX": "_INBOX_env"}
    table = NatsSettings(url="nats://config:4222", inbox_prefix="_INBOX_config")
    options = resolve({"url": "nats://flag:4222"}, table, env)
    assert (options.servers, options.inbox_prefix, options.user) == (
        "nats://flag:4222",
        "_INBOX_config",
        "from-env",
    )
    assert options.connect_kwargs()["inbox_prefix"] == "_INBOX_config"
    # A way to authenticate from a nearer place wins over one left in the environment
    creds = tmp_path / "u.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\nx\n-----BEGIN USER NKEY SEED-----\nSU\n")
    options = resolve({"creds": str(creds)}, None, env)
    assert options.creds == str(creds) and options.user is None and options.password is None
    secret_url = f"nats://alice:{SECRET}@h:4222"
    options = resolve({"url": secret_url}, None, env)  # the URL's user info, not $NATS_USER's
    assert options.user is None and options.auth() == "the user info in the URL"
    # ... and two from the same place are a mistake
    with pytest.raises(NatsOptionError, match="more than one way to authenticate"):
        resolve({"creds": str(creds), "token": "t"}, None, {})
    # ... a password among them too: it was dropped without a word, the URL's old one used
    for beside in ({"url": secret_url}, {"token": "t"}):
        with pytest.raises(NatsOptionError, match=r"a password \(--nats-password\) beside"):
            resolve({**beside, "password": "new"}, None, {})
    assert SECRET not in repr(options)


def test_the_nats_table_keeps_secrets_out_of_the_config_and_names_the_key():
    def problem(table: dict[str, Any]) -> str:
        with pytest.raises(ConfigError) as error:
            parse_config({**LIFELINE_CONFIG, "nats": table})
        return str(error.value)

    assert problem({"password": SECRET}).startswith("nats.password: a secret is never written")
    assert problem({"url": f"nats://a:{SECRET}@h:4222"}).startswith("nats.url: user info")
    assert problem({"password_env": SECRET + " !"}).startswith("nats.password_env: expected")
    assert problem({"inbox_prefix": "_INBOX.*"}).startswith("nats.inbox_prefix: expected")
    assert problem({"crds": "x"}) == "nats.crds: unknown key (did you mean 'creds'?)"


def _opened_by_a_reader(fifo: Path) -> int:
    """A write end of `fifo`, once a reader has it open (ENXIO until then)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing opened {fifo} to read it")


def test_a_secret_file_that_is_a_pipe_nobody_writes_to_ends_the_command(tmp_path):
    """A password_file naming a FIFO nobody writes to hung `lifeline status` in open() for
    good, deaf even to SIGTERM; one that is written (`<(vault read ...)`) is read."""
    fifo = tmp_path / "password.pipe"
    os.mkfifo(fifo)
    config = write_config(
        tmp_path / "lifeline.toml",
        {**LIFELINE_CONFIG, "nats": {"user": "alice", "password_file": str(fifo)}},
    )
    status = ["status", "--config", str(config), "--nats-url", f"nats://127.0.0.1:{free_port()}"]
    ran = subprocess.run(
        [*LIFELINE, *status], check=False, capture_output=True, text=True, env=cli_env(), timeout=60
    )
    assert ran.returncode == 2, ran.stderr  # as for a missing file
    said = f"[nats] password_file: the password file {fifo}: nothing came from it in 10 s"
    assert ran.stderr.strip().splitlines() == [
        f"lifeline: NATS {config} {said} (a pipe nobody writes to?)"
    ]
    # each stops it while it waits: SIGTERM by its default action, Ctrl-C as exit 130
    for sig, code in ((signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)):
        proc = subprocess.Popen([*LIFELINE, *status], env=cli_env(), stderr=subprocess.PIPE)
        writer = _opened_by_a_reader(fifo)  # it waits in open(): no byte is written
        try:
            proc.send_signal(sig)
            assert proc.wait(timeout=30) == code, sig
        finally:
            os.close(writer)
            proc.kill()
            proc.communicate()
    proc = subprocess.Popen([*LIFELINE, *status], env=cli_env(), stderr=subprocess.PIPE, text=True)
    writer = _opened_by_a_reader(fifo)
    os.write(writer, f"{SECRET}\n".encode())
    os.close(writer)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "cannot reach NATS" in err, err  # read, then connected
    assert SECRET not in err


def _in_bash(args: str) -> subprocess.CompletedProcess[str]:
    """`lifeline <args>` run by bash, so that `<(...)` in args gives it a pipe."""
    return subprocess.run(
        ["bash", "-c", f'exec "$@" {args}', "bash", *LIFELINE],
        check=False,
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=ROOT,
        timeout=60,
    )


@pytest.mark.parametrize("name", ["creds", "nkey"])
def test_a_creds_or_nkey_file_given_as_a_pipe_is_read_once_and_connects(name, keys, server_for):
    """`--nats-creds <(vault read ...)`: the pipe gives its content once, but it was read to
    check it and again to connect (nats-py at each connect), then found empty."""
    server = server_for(method(name, keys, Path()).conf)
    path = keys["user.creds" if name == "creds" else "user.nk"]
    url = f"nats://{server.host}:{server.port}"
    ran = _in_bash(f"status --nats-url {url} --nats-{name} <(cat {path})")
    # Connected and authenticated: it found no dispatcher's health there (none runs)
    assert "no dispatcher has shared its health there yet" in ran.stderr, ran.stderr
    assert "/dev/fd/" not in ran.stderr, ran.stderr


def test_a_tls_file_given_as_a_pipe_is_refused_saying_so(keys):
    """ssl opens the CA, certificate and key files by name, after the check read the pipe:
    it found it empty and said 'no PEM certificate' of a good one."""
    url = f"tls://127.0.0.1:{free_port()}"
    ran = _in_bash(f"status --nats-url {url} --nats-ca <(cat {keys['ca.pem']})")
    assert ran.returncode == 2, ran.stderr
    assert ran.stderr.strip().endswith(
        ": a pipe, which TLS cannot read (it opens the file by its name); give a file"
    )
    assert ran.stderr.startswith("lifeline: NATS --nats-ca /dev/fd/"), ran.stderr
