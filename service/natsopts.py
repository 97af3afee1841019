"""How a Lifeline process connects to NATS: its servers, credentials, TLS and inbox prefix.

Every command resolves them the same way, option by option: its command-line flag, else the
config file's [nats] table, else the environment variable the `nats` CLI reads for it.

    flag                 [nats] key                      environment
    --nats-url           url                             NATS_URL
    --nats-user          user                            NATS_USER
    --nats-password      password_env, password_file     NATS_PASSWORD
    --nats-token         token_env, token_file           NATS_TOKEN
    --nats-nkey          nkey        (a seed file)       NATS_NKEY
    --nats-creds         creds       (a .creds file)     NATS_CREDS
    --nats-ca            ca                              NATS_CA
    --nats-cert          cert                            NATS_CERT
    --nats-key           key                             NATS_KEY
    --nats-inbox-prefix  inbox_prefix                    NATS_INBOX_PREFIX

The config file holds no secret: a password or token is named by the environment variable or
the file that holds it. A user without a password is a token, as for the `nats` CLI, and user
info in a URL (nats://user:pass@host, nats://token@host) still works. Nothing here is ever
printed but `shown` (the URLs without their user info) and `describe()` (which options are
set and where from, never their values).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import ssl
import stat
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from service.embedded import redact_url

# The options, by their [nats] key (also the --nats-<key> flag's name, '_' as '-').
ENV = {
    "url": "NATS_URL",
    "user": "NATS_USER",
    "password": "NATS_PASSWORD",
    "token": "NATS_TOKEN",
    "nkey": "NATS_NKEY",
    "creds": "NATS_CREDS",
    "ca": "NATS_CA",
    "cert": "NATS_CERT",
    "key": "NATS_KEY",
    "inbox_prefix": "NATS_INBOX_PREFIX",
}
SECRETS = ("password", "token")  # never a value in the [nats] table: *_env or *_file
_ENV_NAME = r"^([A-Za-z_][A-Za-z0-9_]*)?$"
# Subject tokens separated by dots, no wildcards: nats-py appends ".<unique id>".
_INBOX_PREFIX = r"^([A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*)?$"
_INBOX_PREFIX_WANTED = (
    "expected subject tokens separated by dots, without wildcards or spaces (e.g. _INBOX.alice)"
)


class NatsOptionError(ValueError):
    """A connection option is wrong: conflicting, or its file missing or unreadable. The
    message names the option, where it came from and the file, never a secret."""


class NatsSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The config file's [nats] table (validated with the rest of the config)."""

    url: str = ""  # one URL, or a cluster's comma-separated; no user info
    user: str = ""
    password_env: str = ""  # the name of the variable that holds it, e.g. "NATS_PASSWORD"
    password_file: str = ""  # e.g. a compose or Kubernetes secret: /run/secrets/nats_password
    token_env: str = ""
    token_file: str = ""
    nkey: str = ""  # a user NKey seed file
    creds: str = ""  # a .creds file: user JWT and seed
    ca: str = ""  # the CA certificates (PEM) that signed the servers' certificates
    cert: str = ""  # a client certificate (PEM), for servers that verify clients
    key: str = ""  # its private key (PEM, not encrypted)
    inbox_prefix: str = ""

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for each mistake msgspec's types cannot see."""
        found = []
        problem = url_problem(self.url)
        if problem is not None:
            found.append(("url", problem))
        if any("@" in part for part in self.url.split(",")):
            why = "user info in the config file is a secret written down; use user with "
            found.append(("url", why + "password_env or password_file (or token_env, token_file)"))
        for secret in SECRETS:
            env_key = f"{secret}_env"
            if not re.match(_ENV_NAME, getattr(self, env_key)):
                found.append((env_key, "expected the name of an environment variable"))
            if getattr(self, env_key) and getattr(self, f"{secret}_file"):
                found.append((env_key, f"set it or {secret}_file, not both"))
        if not re.match(_INBOX_PREFIX, self.inbox_prefix):
            found.append(("inbox_prefix", _INBOX_PREFIX_WANTED))
        return found


@dataclass(frozen=True, repr=False)
class NatsOptions:
    """Resolved connection options. `servers` may carry user info: print `shown` instead."""

    servers: str = "nats://127.0.0.1:4222"
    user: str | None = None  # a token when no password
    password: str | None = None
    token: str | None = None
    nkey: str | None = None  # paths
    creds: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    inbox_prefix: str | None = None
    origin: Mapping[str, str] = field(default_factory=dict, compare=False)  # key -> whence
    # creds and nkey given as a pipe (<(vault read ...)), read once: it gives its content once
    piped: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __repr__(self) -> str:  # no secret, should one be logged
        return f"NatsOptions({self.describe()})"

    @property
    def shown(self) -> str:
        """The servers fit to print: user info becomes '***'."""
        return redact_url(self.servers)

    @property
    def who(self) -> str:
        """The NATS user, as a message names it: by name when it has one."""
        return f"NATS user {self.user}" if self.user and self.password else "this NATS user"

    def where(self, key: str) -> str:
        """Where an option came from, for messages: '--nats-creds', '$NATS_CREDS', ..."""
        return self.origin.get(key, f"--nats-{key.replace('_', '-')}")

    def auth(self) -> str:
        """How this connection authenticates, said without a secret."""
        if self.creds:
            return f"the credentials file {self.creds} ({self.where('creds')})"
        if self.nkey:
            return f"the NKey seed file {self.nkey} ({self.where('nkey')})"
        if self.user is not None and self.password is not None:
            return (
                f"user and password ({self.where('user')}, {self.where('password')})"
                if self.user
                else f"a password ({self.where('password')})"
            )
        if self.token is not None:
            return f"a token ({self.where('token')})"
        if self.user is not None:
            return f"a token ({self.where('user')}, a user without a password)"
        if any("@" in part for part in self.servers.split(",")):
            return "the user info in the URL"
        return "no credentials"

    def describe(self) -> str:
        """The servers and what is set, for a start-up line: no secret, only file paths."""
        parts = [] if self.auth() == "no credentials" else [f"auth: {self.auth()}"]
        if self.ca:
            parts.append(f"CA {self.ca}")
        if self.cert:
            parts.append(f"client certificate {self.cert}")
        if self.inbox_prefix:
            parts.append(f"inbox prefix {self.inbox_prefix}")
        return self.shown + (f" ({'; '.join(parts)})" if parts else "")

    @property
    def uses_tls_files(self) -> bool:
        return bool(self.ca or self.cert or self.key)

    def connect_kwargs(self) -> dict[str, Any]:
        """nats-py's connect() arguments; NatsOptionError on a conflict or a bad file, checked
        here, before connecting (nats-py would retry a missing file forever)."""
        methods = [
            name
            for name, value in (
                ("creds", self.creds),
                ("nkey", self.nkey),
                ("user", self.user),
                ("token", self.token),
            )
            if value
        ]
        if len(methods) > 1:
            raise NatsOptionError(
                "NATS: more than one way to authenticate: "
                + " and ".join(f"{m} ({self.where(m)})" for m in methods)
                + "; keep one"
            )
        if self.password is not None and not self.user:
            raise NatsOptionError(
                f"NATS: a password ({self.where('password')}) without a user: "
                "set --nats-user, [nats] user or NATS_USER too"
            )
        kwargs: dict[str, Any] = {"servers": server_list(self.servers)}
        if self.creds:
            text = self._content("creds")
            if "BEGIN NATS USER JWT" not in text or "BEGIN USER NKEY SEED" not in text:
                raise NatsOptionError(
                    f"NATS {self.where('creds')} {self.creds}: not a .creds file "
                    "(it needs a user JWT and a user NKey seed, as `nsc` writes them)"
                )
            # nats-py reads a path again at each connect: a pipe's content goes as it is
            if "creds" in self.piped:
                from nats.aio.client import RawCredentials  # nats-py's, loaded only for this

                kwargs["user_credentials"] = RawCredentials(text)
            else:
                kwargs["user_credentials"] = self.creds
        if self.nkey:
            seed = self._content("nkey")
            _check_seed(seed, f"NATS {self.where('nkey')} {self.nkey}")
            if "nkey" in self.piped:
                kwargs["nkeys_seed_str"] = seed.strip()
            else:
                kwargs["nkeys_seed"] = self.nkey
        if self.user and self.password is not None:
            kwargs["user"], kwargs["password"] = self.user, self.password
        elif self.user:  # as the `nats` CLI: a user without a password is a token
            kwargs["token"] = self.user
        if self.token:
            kwargs["token"] = self.token
        tls = self.tls_context()
        if tls is not None:
            kwargs["tls"] = tls
        if self.inbox_prefix:
            kwargs["inbox_prefix"] = self.inbox_prefix
        return kwargs

    def _content(self, key: str) -> str:
        """The creds or nkey file's content: a pipe's as read by `resolve`."""
        if key in self.piped:
            return self.piped[key]
        return _read(getattr(self, key), self.where(key), _FILES[key])

    def tls_context(self) -> ssl.SSLContext | None:
        """None when no TLS file is set (a tls:// server then uses the system's CAs)."""
        if not self.uses_tls_files:
            return None
        if bool(self.cert) != bool(self.key):
            have, lack = ("cert", "key") if self.cert else ("key", "cert")
            raise NatsOptionError(
                f"NATS {self.where(have)} without {lack}: a client certificate needs its key "
                f"(--nats-{lack}, [nats] {lack} or {ENV[lack]})"
            )
        for key in ("ca", "cert", "key"):  # ssl opens them by name: a pipe read here is empty there
            if getattr(self, key) and _is_pipe(getattr(self, key)):
                raise NatsOptionError(
                    f"NATS {self.where(key)} {getattr(self, key)}: a pipe, which TLS cannot read "
                    "(it opens the file by its name); give a file"
                )
        try:
            if self.ca:
                _read(self.ca, self.where("ca"), "CA file")
                context = ssl.create_default_context(cafile=self.ca)
            else:
                context = ssl.create_default_context()
        except ssl.SSLError as exc:
            raise NatsOptionError(
                f"NATS {self.where('ca')} {self.ca}: no PEM certificate in it ({exc.reason})"
            ) from None
        if self.cert and self.key:
            _read(self.cert, self.where("cert"), "certificate file")
            _read(self.key, self.where("key"), "key file")
            try:
                context.load_cert_chain(self.cert, self.key, password=_no_passphrase)
            except (ssl.SSLError, _Encrypted) as exc:
                why = (
                    "the key is encrypted: give it unencrypted, readable only by this user"
                    if isinstance(exc, _Encrypted)
                    else f"not a PEM certificate and its matching key ({exc.reason})"
                )
                raise NatsOptionError(
                    f"NATS {self.where('cert')} {self.cert} and {self.where('key')} "
                    f"{self.key}: {why}"
                ) from None
        return context


def resolve(
    flags: Mapping[str, str | None],
    table: NatsSettings | None = None,
    environ: Mapping[str, str] = os.environ,
    *,
    default_url: str = "nats://127.0.0.1:4222",
    source: str = "config",
) -> NatsOptions:
    """Each option from its flag (flags["creds"] for --nats-creds ...), else the [nats]
    table of the config file `source`, else its environment variable; then checked (its
    files read). Ways to authenticate from different places do not add up: the one from the
    first place wins (--nats-creds over a NATS_USER left in the shell); two from the same
    place are an error. An empty default_url and no URL anywhere give servers == ""."""
    table = table or NatsSettings()
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    level: dict[str, int] = {}
    for key, env in ENV.items():
        flag = flags.get(key)
        if flag:
            values[key], origin[key], level[key] = flag, f"--nats-{key.replace('_', '-')}", 0
            continue
        found = _from_table(table, key, source, environ)
        if found is not None:
            (values[key], origin[key]), level[key] = found, 1
            continue
        if environ.get(env):
            values[key], origin[key], level[key] = environ[env], f"${env}", 2
    url = values.pop("url", None) or default_url
    if url and not server_list(url):  # commas and spaces only: nats-py would spin on nothing
        raise NatsOptionError(
            f"NATS {origin.get('url', 'URL')} {url!r} names no server; give one, e.g. "
            "nats://127.0.0.1:4222 (a cluster's, comma-separated)"
        )
    problem = url_problem(url)
    if problem is not None:
        raise NatsOptionError(f"NATS {origin.get('url', 'URL')}: {problem}")
    methods = [m for m in ("creds", "nkey", "token", "user") if m in values]
    if "@" in url and "url" in level:  # user info in the URL is a way too
        methods.append("url")
    if methods:
        first = min(level[m] for m in methods)
        chosen = [m for m in methods if level[m] == first]
        if len(chosen) > 1:
            raise NatsOptionError(
                "NATS: more than one way to authenticate: "
                + " and ".join(f"{m} ({origin[m]})" for m in chosen)
                + "; keep one"
            )
        for dropped in (m for m in methods if m not in (chosen[0], "url")):
            del values[dropped], origin[dropped]
        if chosen[0] != "user" and "password" in values:
            if level["password"] == first:  # beside another way from its own place: an error,
                # not a password silently dropped (it has no user there to go with)
                raise NatsOptionError(
                    f"NATS: a password ({origin['password']}) beside {chosen[0]} "
                    f"({origin[chosen[0]]}), which takes none; keep one"
                )
            del values["password"], origin["password"]
    prefix = values.get("inbox_prefix")
    if prefix and not re.match(_INBOX_PREFIX, prefix):
        raise NatsOptionError(f"NATS {origin['inbox_prefix']} {prefix!r}: {_INBOX_PREFIX_WANTED}")
    piped = {
        key: _read(values[key], origin[key], _FILES[key])
        for key in _FILES
        if key in values and _is_pipe(values[key])
    }
    options = NatsOptions(servers=url, origin=origin, piped=piped, **values)
    if url:
        options.connect_kwargs()  # conflicts and files: an error now, not at connect time
    return options


def secrets_given(
    flags: Mapping[str, str | None],
    environ: Mapping[str, str] = os.environ,
    *,
    password_elsewhere: bool = False,
) -> list[str]:
    """Every NATS credential the flags and the environment hold, by value, whether `resolve`
    would use it or refuse it: what a process's output is scrubbed of (service/cli.py), should
    an error quote one. A user without a password is a token; a URL's user info counts whole
    and as its password; an NKey or .creds file counts by its seed."""

    def given(key: str) -> list[str]:
        return [value for value in (flags.get(key), environ.get(ENV[key])) if value]

    found = given("password") + given("token")
    if not found and not password_elsewhere:  # a user alone is a token
        found += given("user")
    for url in given("url"):
        found += _user_info(url)
    for path in given("nkey") + given("creds"):
        found += _SEED.findall(head_of(path))
    return found


def head_of(path: str) -> str:
    """The start of a regular file that may hold a secret (its first 64 KiB), else "": never
    a device or a pipe, which could be read without end."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if Path(path).is_file():
            with open(path, encoding="utf-8", errors="strict") as file:
                return file.read(65536)
    return ""


# A user, account or operator NKey seed as `nsc` writes it: base32, 58 characters.
_SEED = re.compile(r"\bS[UAO][A-Z2-7]{56}\b")


def _user_info(url: str) -> list[str]:
    """The user info of each server in `url` (and its password), and of the whole of a single
    server's, whose password may hold a comma."""
    found = []
    pieces = url.split(",") if url.count("://") > 1 else [url]
    for piece in pieces:
        info = (piece.partition("://")[2] or piece).rpartition("@")[0].strip()
        found += [info, info.partition(":")[2]] if info else []
    return found


def server_list(url: str) -> list[str]:
    """A NATS URL, or a comma-separated list of a cluster's URLs as the `nats` CLI takes them
    (nats-py wants a list). Any one reachable server is enough to start: the client learns
    the cluster's other servers from it and fails over to them."""
    return [part.strip() for part in url.split(",") if part.strip()]


_SCHEMES = ("nats", "tls", "ws", "wss")


def url_problem(url: str) -> str | None:
    """What nats-py would refuse (or try to resolve as a host name) in a URL list, found
    before anything connects; None when each server in it can be dialled."""
    servers = server_list(url)
    listed = {part.strip() for part in redact_url(url).split(",")}
    for server in servers:
        shown = redact_url(server)
        # Not a server of the list as shown: a piece of a password holding a ',' (split at
        # it), which must not be quoted, nor what urlsplit's error quotes of it.
        cut = shown not in listed
        if cut:
            shown = redact_url(url)
        scheme, sep, _ = server.partition("://")
        if cut and sep:  # nats://alice:1234,<rest>@host would dial alice:1234
            return f"{shown!r} is not a URL ({_COMMA_IN_USER_INFO}); e.g. nats://127.0.0.1:4222"
        if sep and scheme not in _SCHEMES:
            return f"{scheme}:// is not a NATS scheme (nats://, tls://, ws://, wss://)"
        try:
            parts = urlsplit(server if sep else f"nats://{server}")
            parts.port  # noqa: B018 - raises on a port that is not 0 to 65535
        except ValueError as exc:
            why = _COMMA_IN_USER_INFO if cut else _unparsed(server, exc)
            return f"{shown!r} is not a URL ({why}); e.g. nats://127.0.0.1:4222"
        # Parsed, but with the user info cut short: alice:1234/x@host would dial alice:1234.
        if "@" in server and "@" not in parts.netloc:
            why = _CUT_USER_INFO
            return f"{shown!r} is not a URL ({why}); e.g. nats://127.0.0.1:4222"
        host = parts.hostname or ""
        if not host or any(c.isspace() or not c.isprintable() for c in host):
            return f"{shown!r} names no host; e.g. nats://127.0.0.1:4222"
    websockets = {server.startswith(("ws://", "wss://")) for server in servers}
    if len(websockets) > 1:
        return "ws:// and wss:// servers cannot be mixed with nats:// or tls:// ones"
    return None


def _unparsed(server: str, exc: ValueError) -> str:
    """Why urlsplit refused `server`, never quoting its user info. urlsplit ends the host part
    at the first '/', '?' or '#', so in a password holding one (as base64 ones do) what it
    reads as the port is the password's start, and its error quotes it ("Port could not be
    cast to integer value as 'Hunt'"): the reason is worked out again on the URL as shown."""
    shown = redact_url(server)
    if shown == server.strip():  # no user info
        return str(exc)
    try:
        urlsplit(shown if "://" in shown else f"nats://{shown}").port  # noqa: B018
    except ValueError as shown_exc:  # the host or the port is wrong, whatever the user info
        return str(shown_exc)
    return _CUT_USER_INFO


_COMMA_IN_USER_INFO = (
    "a ',' separates a cluster's URLs, so a password cannot hold one: give the credentials as "
    "NATS_USER and NATS_PASSWORD (or NATS_TOKEN) instead"
)
_CUT_USER_INFO = (
    "its user info holds a '/', '?' or '#', which ends a URL's host, and nats-py does not "
    "undo percent-encoding: give the credentials as NATS_USER and NATS_PASSWORD (or "
    "NATS_TOKEN) instead"
)


def _from_table(
    table: NatsSettings, key: str, source: str, environ: Mapping[str, str]
) -> tuple[str, str] | None:
    """The [nats] table's value for `key` and where it came from, or None when unset."""
    if key in SECRETS:
        env_name, path = getattr(table, f"{key}_env"), getattr(table, f"{key}_file")
        if env_name:
            shown = f"${env_name}" if _SHOWN_ENV_NAME.fullmatch(env_name) else "its variable"
            where = f"{source} [nats] {key}_env ({shown})"
            if not environ.get(env_name):
                raise NatsOptionError(
                    f"NATS {where}: {shown} is not set"
                    + (
                        ""
                        if shown != "its variable"
                        else " (its name is not shown: it does not "
                        "look like a variable's name; is it the secret itself?)"
                    )
                )
            return environ[env_name], where
        if path:
            where = f"{source} [nats] {key}_file"
            secret = _read(path, where, f"{key} file").strip()
            if not secret:  # e.g. a secret mounted before its key was set: fail here, not at auth
                raise NatsOptionError(f"NATS {where}: the {key} file {path} is empty")
            return secret, f"{where} ({path})"
        return None
    value = getattr(table, key)
    return (value, f"{source} [nats] {key}") if value else None


# How long a pipe or a device named for a file may take to give its content (`<(vault read
# ...)` does at once), and the most read from one (/dev/zero would never end).
READ_WAIT_S = 10.0
_MOST_CHARS = 1 << 20


_FILES = {"creds": "credentials file", "nkey": "NKey seed file"}


def _is_pipe(path: str) -> bool:
    """A FIFO, or a shell's <(...): its content can be read once."""
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _read(path: str, where: str, what: str) -> str:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO nobody writes blocks open()
            return _read_waiting(path, where, what)
        return Path(path).read_text()
    except FileNotFoundError:
        problem = "no such file"
    except IsADirectoryError:
        problem = "a directory, not a file"
    except PermissionError:
        problem = "not readable by this user"
    except (OSError, UnicodeDecodeError) as exc:
        problem = f"cannot read it ({type(exc).__name__})"
    raise NatsOptionError(f"NATS {where}: the {what} {path}: {problem}")


def _read_waiting(path: str, where: str, what: str) -> str:
    """A pipe's (or device's) content, read in a thread for at most READ_WAIT_S. While this
    waits, whatever event loop is running cannot see a stop signal, so SIGINT, SIGTERM and
    SIGHUP take their default action meanwhile (in the main thread): they stop the process,
    which has sent nothing yet."""
    done: list[str | BaseException] = []

    def read() -> None:
        try:
            with open(path, encoding="utf-8") as file:
                done.append(file.read(_MOST_CHARS + 1))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            done.append(exc)

    reader = threading.Thread(target=read, name=f"read {what}", daemon=True)
    with _default_stop_signals():
        reader.start()
        reader.join(READ_WAIT_S)
    if not done:  # the thread stays blocked in open(): a daemon, it ends with the process
        raise NatsOptionError(
            f"NATS {where}: the {what} {path}: nothing came from it in {READ_WAIT_S:g} s "
            "(a pipe nobody writes to?)"
        )
    if isinstance(done[0], BaseException):
        raise done[0]
    if len(done[0]) > _MOST_CHARS:
        raise NatsOptionError(f"NATS {where}: the {what} {path}: more than 1 MiB, not a {what}")
    return done[0]


@contextlib.contextmanager
def _default_stop_signals() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt, SIGTERM and SIGHUP kill, as with no handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in _STOP_SIGNALS[1:]:
        signal.signal(sig, signal.SIG_DFL)
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _check_seed(text: str, label: str) -> None:
    """A user NKey seed (SU...), said wrong without quoting it."""
    import nkeys  # nats-py's own NKey module (the `nkeys` package)

    seed = text.strip()
    try:
        nkeys.from_seed(bytearray(seed.encode())).wipe()
    except Exception:  # noqa: BLE001 - nkeys raises several types for a malformed seed
        raise NatsOptionError(f"{label}: not an NKey seed (a file with one line, SU...)") from None
    if not seed.startswith("SU"):
        raise NatsOptionError(f"{label}: not a user NKey seed (a user's starts with SU)")


class _Encrypted(Exception):
    pass


def _no_passphrase() -> str:
    """load_cert_chain would ask for a passphrase on the terminal: say instead."""
    raise _Encrypted


_SHOWN_ENV_NAME = re.compile(
    r"[A-Z_][A-Z0-9_]{0,63}"
)  # as workers.base shows names: the convention


def looks_like_env_name(name: str) -> bool:
    """Whether `name` looks like a variable's name (else it may be a secret pasted there)."""
    return _SHOWN_ENV_NAME.fullmatch(name) is not None
