"""report.json through the typed models: files of earlier releases load, and what loads writes back unchanged."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quantize_pipeline.errors import InputError
from quantize_pipeline.evaluate.record import Evaluation
from quantize_pipeline.verdict.junit import junit_xml
from quantize_pipeline.verdict.record import RuleState, Verdict, load_report
from quantize_pipeline.verdict.report import render_markdown
from tests.conftest import REPO

FIXTURE = Path(__file__).parent / "fixtures" / "int8-default-run"
OLD_REPORT = FIXTURE / "report.json"  # written by the release before the typed report (schema 3)


def test_a_report_of_the_last_release_loads_and_writes_back_byte_for_byte(tmp_path):
    report = load_report(OLD_REPORT)
    assert report.schema_version == 3 and report.verdict == Verdict.PASS
    assert {rule.state for rule in report.rules} == {RuleState.PASS}
    assert report.evaluation.tasks["arc_easy"].paired.questions == 200
    assert report.evaluation.divergence.mean_kl is not None and report.serve.completions
    report.write(tmp_path / "report.json")
    assert (tmp_path / "report.json").read_bytes() == OLD_REPORT.read_bytes()


def test_the_evaluation_of_a_recorded_run_round_trips():
    data = json.loads((FIXTURE / "evaluate" / "evaluate.json").read_text())
    assert Evaluation.model_validate(data).to_json() == data


def test_schema_1_and_2_reports_load(tmp_path):
    data = json.loads(OLD_REPORT.read_text())
    schema_2 = {key: value for key, value in data.items() if key != "quantize_warnings"} | {"schema_version": 2}
    assert load_report(_write(tmp_path / "2.json", schema_2)).quantize_warnings == []
    # Schema 1: rules had only `passed`, no state, interval or samples; the verdict was pass or fail.
    failed = dict(data["rules"][0], passed=False)
    rules = [{key: rule[key] for key in ("rule", "figure", "threshold", "passed", "detail")}
             for rule in [failed, *data["rules"][1:]]]
    schema_1 = {key: data[key] for key in ("recipe", "scheme", "evaluation", "export", "serve")} | {
        "schema_version": 1, "verdict": "fail", "failed_rules": [failed["rule"]], "rules": rules}
    report = load_report(_write(tmp_path / "1.json", schema_1))
    assert [rule.state for rule in report.rules] == [RuleState.FAIL] + [RuleState.PASS] * (len(rules) - 1)
    markdown = render_markdown(report)
    assert f"| {failed['rule']} |" in markdown and "**FAIL**" in markdown
    assert b'failures="1"' in junit_xml(report)


def test_a_file_that_is_not_a_report_is_one_line_naming_the_field(tmp_path):
    data = json.loads(OLD_REPORT.read_text())
    data["rules"][2]["state"] = "maybe"
    with pytest.raises(InputError, match=r"report\.json: rules\.2\.state: Input should be 'pass', 'fail' or "):
        load_report(_write(tmp_path / "report.json", data))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InputError, match="broken.json: not JSON"):
        load_report(tmp_path / "broken.json")


def test_report_command_on_a_report_of_the_last_release(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(OLD_REPORT, run_dir / "report.json")
    done = subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", "report", str(run_dir)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# smollm2-135m-int8: PASS") and "| min_recovery[arc_easy] |" in done.stdout
    (run_dir / "report.json").write_text(json.dumps({"verdict": "unsure"}))
    refused = subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", "report", str(run_dir)],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "report.json: verdict: Input should be" in refused.stderr


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path
