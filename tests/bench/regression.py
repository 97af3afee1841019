"""This run's headline figures against the ones README.md quotes (kept in reference.toml).

A figure regressed when it is worse than the README's by more than the tolerance (a share
of the README's value, 15 % unless --tolerance says otherwise) and by more than its slack
(an absolute floor, for figures so small that 15 % of them is jitter). Better, or worse
within that, is "ok"; a figure this run could not measure is "n/a" and no verdict. The
lifeline/relay ratio holds across machines; times and memory compare loosely between
different ones, so the section names the README's run and this one.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REFERENCE = Path(__file__).with_name("reference.toml")
DEFAULT_TOLERANCE = 0.15


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    value: float  # as the README quotes it
    better: str  # "higher" or "lower"
    slack: float = 0.0


@dataclass(frozen=True)
class Reference:
    cpu: str  # a part of the README's machine's CPU model name
    run: str  # the machine and settings of the README's run
    figures: list[Figure]


@dataclass(frozen=True)
class Row:
    figure: Figure
    measured: float | None
    change: float | None  # measured / README - 1
    verdict: str  # "ok", "regressed" or "n/a"


def load_reference(path: Path = REFERENCE) -> Reference:
    data = tomllib.loads(path.read_text())
    cpu, run = data.pop("cpu"), data.pop("run")
    figures = []
    for key, table in data.items():
        if table["better"] not in ("higher", "lower"):
            raise ValueError(f"{path}: {key}.better must be 'higher' or 'lower'")
        figures.append(
            Figure(
                key, table["label"], float(table["value"]), table["better"], table.get("slack", 0.0)
            )
        )
    return Reference(cpu, run, figures)


def figures_of(data: dict[str, Any]) -> dict[str, float | None]:
    """This run's values of the reference figures, from a report's data (results.json)."""
    c, m = data["comparisons"], data["memory"]
    return {
        "rps_ratio_64": c["rps_ratio_64"],
        "fallback_503_added_ms": c["fallback_503_added_ms"],
        "fallback_noresp_added_ms": c["fallback_noresp_added_ms"],
        "hang_lateness_p99_ms": c["hang_lateness_p99_ms"],
        "kib_per_in_flight": m["bytes_per_in_flight"] / 1024,
        "stream_cpu_us_per_chunk": c.get("stream_cpu_us_per_chunk"),
        "stream_ttft_added_p50_ms": c.get("stream_ttft_added_p50_ms"),
        "gateway_p50_added_ms": c.get("gateway_p50_added_ms"),
        "gateway_rps_ratio_64": c.get("gateway_rps_ratio_64"),
    }


def compare(
    reference: Reference, measured: dict[str, float | None], tolerance: float = DEFAULT_TOLERANCE
) -> list[Row]:
    rows = []
    for figure in reference.figures:
        value = measured.get(figure.key)
        if value is None or math.isnan(value):
            rows.append(Row(figure, None, None, "n/a"))
            continue
        worse_by = figure.value - value if figure.better == "higher" else value - figure.value
        allowed = max(tolerance * abs(figure.value), figure.slack)
        change = value / figure.value - 1 if figure.value else None
        rows.append(Row(figure, value, change, "regressed" if worse_by > allowed else "ok"))
    return rows


def section(
    rows: list[Row],
    reference: Reference,
    tolerance: float,
    this_run: str,
    quick: bool = False,
) -> str:
    """The comparison as Markdown: a table and a line that sums it up."""
    lines = [
        "### Against the README's figures (tests/bench/reference.toml)",
        "",
        "| figure | better | README | this run | change | may be worse by | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        f = row.figure
        allowed = f"{tolerance * 100:g} %"
        if f.slack > tolerance * abs(f.value):
            allowed += f" (at least {f.slack:g})"
        measured = "n/a" if row.measured is None else f"{row.measured:.2f}"
        change = "n/a" if row.change is None else f"{row.change * 100:+.1f} %"
        verdict = {"ok": "ok", "regressed": "REGRESSED", "n/a": "n/a"}[row.verdict]
        lines.append(
            f"| {f.label} | {f.better} | {f.value:g} | {measured} | {change} | {allowed} "
            f"| {verdict} |"
        )
    regressed = [row for row in rows if row.verdict == "regressed"]
    summary = (
        f"{len(regressed)} of {len(rows)} figures regressed beyond the tolerance"
        if regressed
        else f"no figure regressed beyond the tolerance ({len(rows)} compared)"
    )
    lines += ["", f"{summary}. README's run: {reference.run}. This run: {this_run}."]
    if reference.cpu.lower() not in this_run.lower():
        lines.append(
            f"(not the README's machine ({reference.cpu}): trust the ratio; times and memory "
            "compare loosely)"
        )
    if quick:
        lines.append("(quick run: its figures are noise, so this is no verdict)")
    return "\n".join(lines)


def as_data(rows: list[Row], reference: Reference, tolerance: float) -> dict[str, Any]:
    return {
        "reference_run": reference.run,
        "tolerance": tolerance,
        "figures": [
            {
                "figure": row.figure.key,
                "label": row.figure.label,
                "readme": row.figure.value,
                "better": row.figure.better,
                "slack": row.figure.slack,
                "measured": row.measured,
                "change": row.change,
                "verdict": row.verdict,
            }
            for row in rows
        ],
    }
