"""The gate verdict as JUnit XML, the format every CI system shows natively.

One <testsuite> per report, one <testcase> per rule: a failed rule is a <failure> whose
message is the figure against the threshold (with its interval); an inconclusive rule is
<skipped> with the reason and how many more samples would likely decide it — CI shows it
as neither green nor red, and the command's exit code (4) says the gate did not pass.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

from quantize_pipeline.run.rundir import atomic_write_bytes
from quantize_pipeline.verdict.record import Report, Rule, RuleState

_BAD_SIDE = {"min": "<", "max": ">"}


def _comparison(rule: Rule) -> str:
    """'figure 0.951 [0.93, 0.97] < threshold 0.97' (the sign says which side is bad)."""
    sign = _BAD_SIDE.get(rule.rule.split("_", 1)[0], "vs")
    interval = rule.interval
    interval_text = f" (interval [{interval[0]}, {interval[1]}] at {rule.confidence})" if interval else ""
    return f"{rule.rule}: figure {rule.figure}{interval_text} {sign} threshold {rule.threshold}"


def junit_xml(report: Report) -> bytes:
    rules = report.rules
    states = [rule.state for rule in rules]
    suite = ElementTree.Element("testsuite", {
        "name": f"quantize-pipeline gate: {report.recipe}",
        "tests": str(len(rules)),
        "failures": str(states.count(RuleState.FAIL)),
        "skipped": str(states.count(RuleState.INCONCLUSIVE)),
        "errors": "0",
    })
    properties = ElementTree.SubElement(suite, "properties")
    for name, value in (("verdict", report.verdict), ("scheme", report.scheme), ("run_dir", report.run_dir)):
        ElementTree.SubElement(properties, "property", {"name": name, "value": str(value)})
    for rule in rules:
        case = ElementTree.SubElement(suite, "testcase", {"classname": f"gate.{report.recipe}", "name": rule.rule})
        if rule.state == RuleState.FAIL:
            failure = ElementTree.SubElement(case, "failure", {"message": _comparison(rule), "type": "GateFailed"})
            failure.text = rule.detail
        elif rule.state == RuleState.INCONCLUSIVE:
            more = rule.more_samples_to_decide
            hint = f"; ~{more} more {rule.unit or 'samples'} would likely decide it" if more else ""
            ElementTree.SubElement(case, "skipped", {"message": f"inconclusive: {_comparison(rule)}{hint}"})
        output = ElementTree.SubElement(case, "system-out")
        output.text = rule.detail
    return ElementTree.tostring(ElementTree.ElementTree(suite).getroot(), encoding="utf-8", xml_declaration=True)


def write_junit(report: Report, path: Path) -> None:
    """Written whole or not at all (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, junit_xml(report))
