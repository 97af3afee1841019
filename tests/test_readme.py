"""The README against the code: the config it shows is a config Lifeline takes, every key
Lifeline takes is in it, every option it gives a `lifeline` command is one that command
has, and the Quick start's Python runs as pasted. A newcomer copies these; a key renamed or
a flag dropped in the code must fail here, not in their terminal."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest
from helpers import LifelineProcess, cli_env

from schemas.wire import TargetSpec
from service import config, permissions
from service.cli import build_parser
from service.health import BreakerSettings
from service.natsopts import NatsSettings
from service.shaping import Template
from workers.registry import known_kinds, settings_type

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
TOML_BLOCKS = [
    block
    for block in re.findall(r"```toml\n(.*?)```", README, re.DOTALL)
    if "[project." not in block  # a plug-in's pyproject.toml, not Lifeline's config
]
# What the README's snippets lean on without defining: the providers and routes they name.
BASE: dict[str, Any] = {
    "providers": {
        name: {"kind": "fake"} for name in ("primary", "backup", "openai", "claude", "local")
    },
    "routes": {name: {"targets": ["backup"]} for name in ("default", "chat")},
}


def _merged(base: dict[str, Any], snippet: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in snippet.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def test_the_readme_shows_config_examples():
    assert len(TOML_BLOCKS) >= 12, "the README's TOML examples were not found"


@pytest.mark.parametrize("block", TOML_BLOCKS, ids=lambda b: b.strip().splitlines()[0][:40])
def test_every_config_example_of_the_readme_is_a_config_lifeline_takes(block):
    snippet = tomllib.loads(textwrap.dedent(block))
    config.parse_config(_merged(BASE, snippet), source="README.md")


def test_an_inbox_prefix_the_readme_sets_is_the_one_nats_config_grants_its_user():
    """The [nats] example set inbox_prefix = "_INBOX_lifeline": copied into a deployment
    secured by `lifeline nats-config`, the user could not subscribe there nor a dispatcher
    answer there, and no reply came. A user's prefix is the one the generated file grants it."""
    examples = [
        tomllib.loads(textwrap.dedent(block))["nats"]
        for block in TOML_BLOCKS
        if "inbox_prefix" in tomllib.loads(textwrap.dedent(block)).get("nats", {})
    ]
    assert examples, "the README's [nats] example with an inbox_prefix was not found"
    base = config.parse_config(BASE, source="README.md")
    for nats in examples:
        granted = permissions.client(nats.get("user", ""), base).inbox_prefix
        assert nats["inbox_prefix"] == granted, nats


# Every table of the config and the Struct that reads it (a provider's by its kind).
TABLES: dict[str, type[msgspec.Struct]] = {
    "[dispatcher]": config.DispatcherSettings,
    "[jobs]": config.JobsSettings,
    "[jetstream]": config.JetStreamSettings,
    "[audit]": config.AuditSettings,
    "[routes.<name>]": config.RouteConfig,
    "a route's group": config.GroupSpec,
    "[fallbacks]": config.FallbacksConfig,
    "[breaker]": BreakerSettings,
    "[nats]": NatsSettings,
    "[templates.<name>]": Template,
    "a target": TargetSpec,
} | {f"[providers.<name>] of kind {kind}": settings_type({"kind": kind}) for kind in known_kinds()}


def _named(key: str) -> bool:
    """Whether the README names a key: `key`, or `key = ...` in a TOML example."""
    k = re.escape(key)
    return re.search(rf"`{k}`|`{k} =|^\s*{k} =|[{{,] *{k} =", README, re.MULTILINE) is not None


def test_every_config_key_lifeline_takes_is_in_the_readme():
    undocumented = [
        f"{table}: {field.encode_name}"
        for table, struct in TABLES.items()
        for field in msgspec.structs.fields(struct)
        if not _named(field.encode_name)
    ]
    assert not undocumented, f"config keys the README never names: {undocumented}"


def _commands() -> argparse._SubParsersAction:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _command_lines() -> list[str]:
    """Inline code that runs `lifeline`, and every line of the shell and console blocks."""
    # A table row escapes its | as \|: read as the shell's pipe, it hid every option after it
    # (`run`'s after [--gateway-port P \| --no-gateway], `ask`'s after --tools JSON\|FILE).
    spans = [s.replace("\\|", " ") for s in re.findall(r"`([^`\n]*lifeline [^`\n]*)`", README)]
    blocks = re.findall(r"```(?:sh|console|bash)?\n(.*?)```", README, re.DOTALL)
    return spans + [line for block in blocks for line in block.splitlines()]


def _options_used() -> list[tuple[str, str, str]]:
    """(command, option, the line) for each option the README gives a `lifeline` command."""
    commands = _commands().choices
    used = []
    for line in _command_lines():
        # `lifeline [-v] COMMAND args`, up to a shell's ; | & or a comment
        for m in re.finditer(r"(?:^|[\s/;(])lifeline(?: +-\w+)* +([a-z][a-z-]*)([^;|&#]*)", line):
            if m.group(1) in commands:
                for option in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", m.group(2)):
                    used.append((m.group(1), option.split("=")[0], line.strip()))
    return used


def test_every_option_the_readme_gives_a_command_is_one_it_has():
    commands, top = _commands().choices, set(build_parser()._option_string_actions)
    used = _options_used()
    assert len({(command, option) for command, option, _ in used}) >= 75, (
        "the README's command lines were not found"
    )
    unknown = [
        f"lifeline {command} {option}  (in: {line[:80]})"
        for command, option, line in used
        if option not in commands[command]._option_string_actions and option not in top
    ]
    assert not unknown, f"options the README gives that the command does not have: {unknown}"


def _first(pattern: str, text: str) -> str:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in:\n{text}"
    return found.group(found.re.groups)


def test_the_quick_starts_three_ways_in_run_as_pasted_into_python_m_asyncio(tmp_path):
    """The block said which imports it needed in comments only: pasted as the README says,
    each way in ended in a NameError. Here it runs as written against `lifeline run` on the
    example config, its addresses swapped for the free ports this run has."""
    block = _first(r"(?s)\*\*Three ways in\*\*.*?```python\n(.*?)```", README)
    assert "nats.connect()" in block and "127.0.0.1:8080" in block
    run = LifelineProcess(
        ["run", "--port", "-1", "--gateway-port", "-1"], tmp_path / "run.log", cwd=tmp_path
    )
    try:
        run.wait_for_log(r"dispatcher ready")
        nats_url = _first(r"nats://[\d.]+:\d+", run.log())
        pasted = block.replace("nats.connect()", f"nats.connect({nats_url!r})")
        pasted = pasted.replace("127.0.0.1:8080", _first(r"gateway on http://(\S+:\d+)", run.log()))
        done = subprocess.run(
            [sys.executable, "-m", "asyncio"],
            input=pasted + "\n",  # the blank line that ends the last `async with` at a prompt
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env=cli_env(NATS_URL=nats_url),
            check=False,  # the asserts below show what it printed
        )
    finally:
        run.stop()
    assert "Error" not in done.stderr, done.stderr
    assert done.stdout.count("hi\n") == 3, done.stdout  # the example's backup echoes each "hi"


def _anchor(heading: str, taken: set[str]) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces as
    hyphens, a repeated one numbered."""
    base = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    anchor, n = base, 0
    while anchor in taken:
        n += 1
        anchor = f"{base}-{n}"
    return anchor


def test_every_link_within_the_readme_leads_to_one_of_its_headings():
    """The contents and the cross-references are how a reader finds their way through a long
    README: a heading reworded must not leave a link that goes nowhere."""
    prose = re.sub(r"```.*?```", "", README, flags=re.DOTALL)
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose, re.MULTILINE):
        anchors.add(_anchor(heading, anchors))
    links = set(re.findall(r"\]\(#([^)]+)\)", README))
    assert len(links) > 40  # the contents alone link to about thirty
    assert sorted(links - anchors) == []
