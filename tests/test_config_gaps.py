"""Config mistakes that check-config said OK to, each found only later, at run time: the
loader now names the key and says what to do."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import LIFELINE, cli_env, config, fake

from service.config import ConfigError, parse_config


def error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    return str(exc.value)


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LIFELINE, "check-config", "--config", str(path)],
        env=cli_env(),
        capture_output=True,
        text=True,
        check=False,
    )


def with_template(**template: str) -> dict[str, Any]:
    data = config({"p": fake()}, routes={"r": {"targets": ["t"]}})
    data["templates"] = {"terse": template}
    data["targets"] = {"t": {"provider": "p", "template": "terse"}}
    return data


def chain(*targets: Any, **tables: Any) -> dict[str, Any]:
    return {
        **config({"p": fake(), "q": fake()}, routes={"r": {"targets": list(targets)}}),
        **tables,
    }


# ---- prompt templates ------------------------------------------------------------------


def test_a_misspelt_placeholder_is_refused_naming_the_ones_its_field_fills():
    """{sytem} went to the provider as written, and the request's own system prompt was
    dropped without a word."""
    assert error(with_template(system="Be brief. {sytem}")) == (
        "templates.terse: `system` has {sytem}, not a placeholder it fills ({system}, "
        "{previous_errors}): did you mean {system}? (for braces sent as written, put a space "
        "inside: { sytem })"
    )


@pytest.mark.parametrize(
    ("template", "wanted"),
    [
        ({"system": "{input}"}, "`system` has {input}, not a placeholder it fills ({system}, "),
        (
            {"user": "{input} {system}"},
            "`user` has {system}, not a placeholder it fills ({input}, ",
        ),
        ({"system": "Be brief. {System}"}, "did you mean {system}?"),
        ({"user": "{input} ({previous_error})"}, "did you mean {previous_errors}?"),
    ],
)
def test_a_placeholder_of_the_other_field_or_a_near_miss_is_refused(template, wanted):
    message = error(with_template(**template))
    assert message.startswith("templates.terse: ") and wanted in message, message


def test_braces_around_anything_but_a_bare_name_are_still_sent_as_written():
    text = 'Answer as {"answer": ...}, {a, b} or { name }. {system}'
    parsed = parse_config(with_template(system=text, user="{input} {{input}}"))
    assert parsed.templates["terse"].system == text
