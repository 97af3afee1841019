"""The bench's regression check against the README's figures: the comparison logic and the
committed reference, on made-up figures. Nothing here is timed; `make bench` measures."""

from __future__ import annotations

import math
import re

import pytest
from helpers import ROOT

from tests.bench.__main__ import exit_status, parse_args
from tests.bench.regression import (
    Figure,
    Reference,
    compare,
    figures_of,
    load_reference,
    section,
)

RATIO = Figure("ratio", "lifeline / relay", 0.50, "higher")
FALLBACK = Figure("fallback", "a fallback adds (ms)", 0.20, "lower", slack=0.1)
MEMORY = Figure("memory", "KiB per request", 10.0, "lower")
REFERENCE = Reference("AMD EPYC", "AMD EPYC, 2 cores", [RATIO, FALLBACK, MEMORY])


def verdicts(measured: dict[str, float | None], tolerance: float = 0.15) -> dict[str, str]:
    return {row.figure.key: row.verdict for row in compare(REFERENCE, measured, tolerance)}


def test_a_figure_worse_by_more_than_the_tolerance_regressed_in_its_own_direction():
    assert verdicts({"ratio": 0.42, "fallback": 0.20, "memory": 11.6}) == {
        "ratio": "regressed",  # 16 % lower, and higher is better
        "fallback": "ok",
        "memory": "regressed",  # 16 % higher, and lower is better
    }
    assert verdicts({"ratio": 0.43, "fallback": 0.20, "memory": 11.4}) == {
        "ratio": "ok",  # 14 % lower
        "fallback": "ok",
        "memory": "ok",  # 14 % higher
    }


def test_a_better_figure_is_never_a_regression_however_far_it_moved():
    assert set(verdicts({"ratio": 0.9, "fallback": 0.01, "memory": 2.0}).values()) == {"ok"}


def test_the_slack_is_a_floor_for_small_figures_and_the_tolerance_decides_above_it():
    # 0.2 ms may grow by 0.1 ms (50 %), not by 15 % (0.03 ms) only ...
    assert verdicts({"ratio": 0.5, "fallback": 0.29, "memory": 10})["fallback"] == "ok"
    assert verdicts({"ratio": 0.5, "fallback": 0.31, "memory": 10})["fallback"] == "regressed"
    # ... and where the tolerance allows more than the slack, the tolerance counts.
    assert (
        verdicts({"ratio": 0.5, "fallback": 0.31, "memory": 10}, tolerance=0.6)["fallback"] == "ok"
    )


def test_the_tolerance_can_be_set_per_run():
    assert verdicts({"ratio": 0.42, "fallback": 0.2, "memory": 10}, tolerance=0.2)["ratio"] == "ok"
    assert verdicts({"ratio": 0.48, "fallback": 0.2, "memory": 10}, tolerance=0.02)["ratio"] == (
        "regressed"
    )


def test_a_figure_the_run_could_not_measure_gets_no_verdict():
    rows = compare(REFERENCE, {"ratio": math.nan, "fallback": None})
    assert [(row.verdict, row.measured) for row in rows] == [("n/a", None)] * 3


def test_the_section_shows_each_figure_and_sums_up_the_regressions():
    rows = compare(REFERENCE, {"ratio": 0.40, "fallback": 0.25, "memory": 10.0})
    text = section(rows, REFERENCE, 0.15, "AMD EPYC 7B13, 2 cores")
    assert "| lifeline / relay | higher | 0.5 | 0.40 | -20.0 % | 15 % | REGRESSED |" in text
    assert (
        "| a fallback adds (ms) | lower | 0.2 | 0.25 | +25.0 % | 15 % (at least 0.1) | ok |" in text
    )
    assert "1 of 3 figures regressed beyond the tolerance" in text
    assert "not the README's machine" not in text and "quick run" not in text
    other = section(rows, REFERENCE, 0.15, "Intel Xeon, 2 cores", quick=True)
    assert "not the README's machine (AMD EPYC)" in other and "quick run" in other
    calm = section(compare(REFERENCE, {"ratio": 0.5}), REFERENCE, 0.15, "AMD EPYC")
    assert "no figure regressed beyond the tolerance (3 compared)" in calm


def test_only_check_turns_a_regression_into_a_failing_exit_status():
    assert exit_status(True, ["ratio"], check=False) == 0
    assert exit_status(True, ["ratio"], check=True) == 1
    assert exit_status(True, [], check=True) == 0
    assert exit_status(False, [], check=False) == 1  # a failed request breaks the run anyway
    args = parse_args(["--check", "--tolerance", "20"])
    assert (args.check, args.tolerance) == (True, 20)
    assert (parse_args([]).check, parse_args([]).tolerance) == (False, 15)


def test_the_committed_reference_is_what_the_readme_quotes():
    reference = load_reference()
    assert reference.figures and all(f.value > 0 for f in reference.figures)
    benchmarks = re.search(
        r"\n## Benchmarks\n(.*?)\n## ", (ROOT / "README.md").read_text(), re.DOTALL
    )
    assert benchmarks is not None
    for figure in reference.figures:
        assert f"{figure.value:g}" in benchmarks.group(1), (figure.key, figure.value)
    assert reference.cpu in reference.run and reference.cpu in benchmarks.group(1)


def test_a_run_gives_a_value_for_every_reference_figure():
    data = {
        "comparisons": {
            "rps_ratio_64": 0.45,
            "fallback_503_added_ms": 0.5,
            "fallback_noresp_added_ms": 0.2,
            "hang_lateness_p99_ms": 4.0,
        },
        "memory": {"bytes_per_in_flight": 10.0 * 1024},
    }
    measured = figures_of(data)
    assert set(measured) == {f.key for f in load_reference().figures}
    assert measured["kib_per_in_flight"] == pytest.approx(10.0)
