"""The one table of error kinds: what reads it agrees with it, and the README lists it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from schemas import errors
from schemas.errors import DEFAULT_RETRY_ON
from service.health import BreakerSettings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_the_readme_lists_exactly_the_error_kinds_and_request_errors_of_the_table():
    kinds_table = README.split("### Error kinds", 1)[1].split("\n### ", 1)[0]
    listed_kinds = set(re.findall(r"^\| `([a-z_]+)` \|", kinds_table, re.MULTILINE))
    assert listed_kinds == set(errors.ERROR_KINDS)
    request_table = README.split("| `error.type` | when |", 1)[1].split("\n\n", 1)[0]
    listed = {
        name
        for row in re.findall(r"^\| (`.+?`) \|", request_table, re.MULTILINE)
        for name in re.findall(r"`([a-z_]+)`", row)
    }
    assert listed == set(errors.REQUEST_ERRORS)


def test_retries_and_breakers_default_to_the_kinds_the_table_marks():
    assert DEFAULT_RETRY_ON == {"timeout", "rate_limit", "server_error", "connection"}
    # A spent quota is no passing trouble: not retried, but it benches the provider.
    assert BreakerSettings().trip_on == errors.DEFAULT_TRIP_ON == DEFAULT_RETRY_ON | {"quota"}


@pytest.mark.parametrize(
    "status, kind",
    [
        (429, "rate_limit"),
        (401, "auth"),
        (402, "quota"),
        (403, "auth"),
        (408, "timeout"),
        (500, "server_error"),
        (529, "server_error"),
        (404, "bad_request"),
        (413, "bad_request"),
    ],
)
def test_http_statuses_map_to_kinds_through_the_table(status, kind):
    assert errors.classify_status(status) == kind


@pytest.mark.parametrize(
    "entry, ok",
    [
        ("rate_limit", True),
        (503, True),
        (399, False),
        (600, False),
        ("nope", False),
        (True, False),
        (None, False),
    ],
)
def test_one_check_for_a_kind_or_a_status(entry, ok):
    assert (errors.kind_or_status_problem(entry) is None) is ok
