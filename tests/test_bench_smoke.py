"""The benchmark suite keeps working: one tiny run of `python -m tests.bench --quick`.

Its figures are noise at these counts and nothing here asserts on them: speed is judged
by `make bench`, whose ratios come from one run, never by timed assertions in tests.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT

pytestmark = pytest.mark.bench  # `pytest -m "not bench"` leaves it out; `make test` runs it


def test_the_quick_benchmark_runs_every_case_and_writes_its_reports(tmp_path):
    result = subprocess.run(
        # One round: every case runs and reports (two took 19 s of the suite's time, one 12).
        [sys.executable, "-m", "tests.bench", "--quick", "--rounds", "1", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,  # the assert below shows the output's end
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    figures = json.loads((tmp_path / "results.json").read_text())
    assert figures["request_errors"] == 0
    cases = (
        "direct@1",
        "relay@64",
        "lifeline@64",
        "fallback-503@1",
        "fallback-noresp@1",
        "fallback-hang@64",
        "scaling-2@64",
        "tick@8",
        "tail@8",
        "tail-hedged@8",
        "tail-budget@8",
        "stream-direct@8",
        "stream-lifeline@8",
        "stream-flood-direct@8",
        "stream-flood-lifeline@8",
        "jobs@1",
        "jobs@64",
        "gateway@1",
        "gateway@64",
        "canned@1",
    )
    assert set(cases) <= set(figures["cases"])
    assert {t["target"] for t in figures["targets"]} >= {
        "throughput vs relay",
        "memory per in-flight request",
        "hedging cuts the tail",
    }
    assert (
        figures["cases"]["tail-hedged@8"]["median"]["hedged_share"] > 0
    )  # the hedged route did hedge
    report = (tmp_path / "results.md").read_text()
    assert "| lifeline | 64 |" in report
    assert "### Hedging: p99 with a slow primary" in report
    assert "### Streaming: 8 streams in flight" in report
    assert "### Durable jobs against core requests" in report
    assert "### HTTP gateway" in report and "LiteLLM" in report  # not measured in --quick
    assert "litellm@1" not in figures["cases"]  # never installed by a quick run
    assert figures["cases"]["gateway@64"]["median"]["rps"] > 0
    assert figures["cases"]["jobs@64"]["median"]["rps"] > 0
    streamed = figures["cases"]["stream-lifeline@8"]["median"]
    assert streamed["chunk_p50_ms"] > 0 and streamed["cpu_us_per_chunk"]["dispatcher-1"] > 0
    # It ends comparing its figures with the README's; without --check that never fails it.
    assert "### Against the README's figures" in result.stdout.rsplit("### Targets", 1)[1]
    compared = figures["against_readme"]["figures"]
    assert {f["figure"] for f in compared} == {
        "rps_ratio_64",
        "fallback_503_added_ms",
        "fallback_noresp_added_ms",
        "hang_lateness_p99_ms",
        "kib_per_in_flight",
        "stream_cpu_us_per_chunk",
        "stream_ttft_added_p50_ms",
        "gateway_p50_added_ms",
        "gateway_rps_ratio_64",
    }


@pytest.mark.parametrize(
    ("mode", "summary"),
    [([], "B/A req/s: median"), (["--paired", "--route", "fail_ok"], "B-A median")],
)
def test_the_ab_comparison_loads_two_revisions_at_once_and_cleans_up_after_itself(mode, summary):
    """`make bench-ab` (and with PAIRED=1, through a fallback): HEAD against the working tree,
    one short round, and the temporary worktree of HEAD is gone afterwards."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.bench.ab", "HEAD", "--rounds", "1", "--duration", "0.3"]
        + mode,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,  # the assert below shows the output's end
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "A = HEAD, B = working tree" in result.stdout
    assert summary in result.stdout
    worktrees = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True, check=True
    )
    assert "lifeline-ab-" not in worktrees.stdout


def test_the_ab_comparison_names_a_revision_it_cannot_find():
    result = subprocess.run(
        [sys.executable, "-m", "tests.bench.ab", "no-such-revision"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "'no-such-revision' is no commit of this repository" in result.stderr
    assert "Traceback" not in result.stderr
