"""JUnit XML of the gate, read back with a standard XML parser; `check --json` speaks the run's event stream."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

from quantize_pipeline.verdict.junit import write_junit
from tests.conftest import REPO
from tests.test_gate import _evaluation, _facts, _gate, _recipe


def _cases(path) -> dict:
    suite = ElementTree.parse(path).getroot()
    assert suite.tag == "testsuite"
    return suite, {case.get("name"): case for case in suite.findall("testcase")}


def test_each_rule_is_a_test_case_with_its_state(tmp_path):
    recipe = _recipe(min_recovery=0.97, max_mean_kl=0.01, max_export_size_ratio=0.9)
    report = _gate(recipe, _facts(), _evaluation(mean_kl=0.05), tmp_path, mean_kl=0.05)
    assert report.verdict == "fail"
    write_junit(report, tmp_path / "ci" / "gate.xml")
    suite, cases = _cases(tmp_path / "ci" / "gate.xml")
    assert set(cases) == {rule.rule for rule in report.rules}
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == (str(len(report.rules)), "1", "1")
    failure = cases["max_mean_kl"].find("failure")
    assert failure is not None and "> threshold 0.01" in failure.get("message") and "interval [" in failure.get("message")
    skipped = cases["min_recovery[arc_easy]"].find("skipped")
    assert skipped is not None and skipped.get("message").startswith("inconclusive: min_recovery[arc_easy]")
    assert "more questions would likely decide it" in skipped.get("message")
    passed = cases["max_export_size_ratio"]
    assert passed.find("failure") is None and passed.find("skipped") is None
    properties = {prop.get("name"): prop.get("value") for prop in suite.find("properties")}
    assert properties["verdict"] == "fail"


def test_check_json_prints_the_result_event_and_writes_no_junit_before_a_gate(tmp_path):
    not_quantized = tmp_path / "plain"
    not_quantized.mkdir()
    (not_quantized / "config.json").write_text(json.dumps({"model_type": "llama"}))
    done = subprocess.run(
        [sys.executable, "-m", "quantize_pipeline.cli", "check", str(not_quantized), "--base", "builtin:smollm2-135m-instruct",
         "--json", "--junit-xml", str(tmp_path / "gate.xml")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert done.returncode == 2
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [event["event"] for event in events] == ["result"]
    assert events[0]["exit_code"] == 2 and "quantization_config" in events[0]["error"] and events[0]["rules"] == []
    assert not (tmp_path / "gate.xml").exists()
