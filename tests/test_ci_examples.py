"""The CI examples users copy (examples/, explained in docs/ci.md): every `quantize-pipeline` command in them
exists with the options they pass, the validate and plan steps run here as written, exit codes and the Hub
token are handled as docs/ci.md says."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO

GITHUB = REPO / "examples" / "github-actions" / "quantize.yml"
GITLAB = REPO / "examples" / "gitlab-ci" / ".gitlab-ci.yml"
BINARY = ".venv/bin/quantize-pipeline"


def _shell_lines(path) -> list[str]:
    data = yaml.safe_load(path.read_text())
    if path == GITHUB:
        blocks = [step["run"] for job in data["jobs"].values() for step in job["steps"] if "run" in step]
    else:
        blocks = [line for job in data.values() if isinstance(job, dict) and "script" in job for line in job["script"]]
    return [line.strip() for block in blocks for line in block.splitlines()]


def _commands(path) -> list[list[str]]:
    """Each `quantize-pipeline ...` line as arguments, $RECIPE as the file's own variable, shell arrays left out."""
    data = yaml.safe_load(path.read_text())
    recipe = data["jobs"]["quantize"]["env"]["RECIPE"] if path == GITHUB else data["variables"]["RECIPE"]
    commands = []
    for line in _shell_lines(path):
        if BINARY in line:
            words = shlex.split(line[line.index(BINARY) + len(BINARY):].replace("$RECIPE", recipe))
            commands.append([word for word in words if not word.startswith("${")])
    return commands


@pytest.mark.parametrize("path", [GITHUB, GITLAB], ids=["github", "gitlab"])
def test_every_command_exists_with_the_options_it_passes(path):
    commands = _commands(path)
    assert {command[0] for command in commands} == {"validate", "plan", "run"}
    for command in commands:
        helped = subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", command[0], "--help"], capture_output=True,
                                text=True, cwd=REPO, timeout=120)
        assert helped.returncode == 0, helped.stderr
        for option in (word for word in command if word.startswith("--")):
            assert option in helped.stdout, (command, option)
    run = next(command for command in commands if command[0] == "run")
    assert "--junit-xml" in run and "--output-dir" in run


@pytest.mark.parametrize("path", [GITHUB, GITLAB], ids=["github", "gitlab"])
def test_the_validate_and_plan_steps_pass_here_as_written(path):
    for command in (command for command in _commands(path) if command[0] in ("validate", "plan")):
        done = subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", *command], capture_output=True, text=True,
                              cwd=REPO, timeout=300)
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])


def test_exit_codes_and_the_token_are_handled_as_documented():
    github = yaml.safe_load(GITHUB.read_text())["jobs"]["quantize"]
    gate_step = next(step for step in github["steps"] if step.get("id") == "gate")
    assert gate_step["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
    assert "4) echo" in gate_step["run"] and "*) exit $code" in gate_step["run"]
    assert all(step.get("if") == "always()" for step in github["steps"][-2:])  # reports kept on a failed gate
    gitlab = yaml.safe_load(GITLAB.read_text())["quantize"]
    assert gitlab["allow_failure"] == {"exit_codes": [4]} and gitlab["artifacts"]["reports"]["junit"] == "gate.xml"
    assert gitlab["artifacts"]["when"] == "always"
    for path in (GITHUB, GITLAB):  # the token is passed by the environment, never printed
        assert not any("HF_TOKEN" in line for line in _shell_lines(path) if "echo" in line or "quantize-pipeline" in line)
    docs = (REPO / "docs" / "ci.md").read_text()
    assert "examples/github-actions/quantize.yml" in docs and "examples/gitlab-ci/.gitlab-ci.yml" in docs
