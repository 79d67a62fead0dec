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

_BAD_SIDE = {"min": "<", "max": ">"}


def _comparison(rule: dict) -> str:
    """'figure 0.951 [0.93, 0.97] < threshold 0.97' (the sign says which side is bad)."""
    sign = _BAD_SIDE.get(rule["rule"].split("_", 1)[0], "vs")
    interval = rule.get("interval")
    interval_text = f" (interval [{interval[0]}, {interval[1]}] at {rule.get('confidence')})" if interval else ""
    return f"{rule['rule']}: figure {rule['figure']}{interval_text} {sign} threshold {rule['threshold']}"


def junit_xml(report: dict) -> bytes:
    rules = report.get("rules", [])
    states = [rule.get("state") or ("pass" if rule.get("passed") else "fail") for rule in rules]
    suite = ElementTree.Element("testsuite", {
        "name": f"quantize-pipeline gate: {report.get('recipe')}",
        "tests": str(len(rules)),
        "failures": str(states.count("fail")),
        "skipped": str(states.count("inconclusive")),
        "errors": "0",
    })
    properties = ElementTree.SubElement(suite, "properties")
    for name in ("verdict", "scheme", "run_dir"):
        ElementTree.SubElement(properties, "property", {"name": name, "value": str(report.get(name))})
    for rule, state in zip(rules, states):
        case = ElementTree.SubElement(suite, "testcase", {"classname": f"gate.{report.get('recipe')}", "name": rule["rule"]})
        if state == "fail":
            failure = ElementTree.SubElement(case, "failure", {"message": _comparison(rule), "type": "GateFailed"})
            failure.text = rule.get("detail", "")
        elif state == "inconclusive":
            more = rule.get("more_samples_to_decide")
            hint = f"; ~{more} more {rule.get('unit', 'samples')} would likely decide it" if more else ""
            ElementTree.SubElement(case, "skipped", {"message": f"inconclusive: {_comparison(rule)}{hint}"})
        output = ElementTree.SubElement(case, "system-out")
        output.text = rule.get("detail", "")
    return ElementTree.tostring(ElementTree.ElementTree(suite).getroot(), encoding="utf-8", xml_declaration=True)


def write_junit(report: dict, path: Path) -> None:
    """Written whole or not at all (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, junit_xml(report))
