"""Compare two test runs' wall time per module (issue #24).

`make test` writes .pytest_cache/ci_times.json (tests/conftest.py: setup + call + teardown of every
test, per module and per test; QP_CI_TIMES names another file). Keep one from before a change and
one from after, then:

    python bench/ci_time.py BEFORE.json AFTER.json [--tests N]

prints a Markdown table: each module's seconds before and after, the ratio, and the totals; with
--tests, the N slowest tests of the second run beside their time in the first.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


def _ratio(before: float | None, after: float | None) -> str:
    if not before or after is None:
        return "-"
    return f"{after / before:.2f}"


def _cell(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.0f}"


def comparison_table(before: dict, after: dict) -> str:
    """Markdown: module | before s | after s | after/before, slowest (after) first, totals last."""
    modules = sorted(set(before["modules"]) | set(after["modules"]),
                     key=lambda name: -(after["modules"].get(name) or before["modules"].get(name) or 0))
    lines = ["| module | before s | after s | after/before |", "|---|---:|---:|---:|"]
    for name in modules:
        old, new = before["modules"].get(name), after["modules"].get(name)
        lines.append(f"| {name} | {_cell(old)} | {_cell(new)} | {_ratio(old, new)} |")
    lines.append(f"| **all tests (sum)** | {_cell(before['total_s'])} | {_cell(after['total_s'])} | "
                 f"{_ratio(before['total_s'], after['total_s'])} |")
    # Wall time: the run's own clock (files from before it was recorded: one worker, so the sum is the wall).
    before_wall, after_wall = before.get("wall_s", before["total_s"]), after.get("wall_s", after["total_s"])
    lines.append(f"| **wall** | {_cell(before_wall)} | {_cell(after_wall)} | {_ratio(before_wall, after_wall)} |")
    return "\n".join(lines)


def slowest_tests(before: dict, after: dict, count: int) -> str:
    lines = ["| test (slowest after) | before s | after s |", "|---|---:|---:|"]
    for name, seconds in list(after["tests"].items())[:count]:
        lines.append(f"| {name} | {_cell(before['tests'].get(name))} | {_cell(seconds)} |")
    return "\n".join(lines)


@click.command()
@click.argument("before", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("after", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tests", "test_count", type=int, default=0, help="also list the N slowest tests of AFTER")
def main(before: Path, after: Path, test_count: int) -> None:
    first, second = json.loads(before.read_text()), json.loads(after.read_text())
    click.echo(comparison_table(first, second))
    if test_count:
        click.echo("")
        click.echo(slowest_tests(first, second, test_count))


if __name__ == "__main__":
    main()
