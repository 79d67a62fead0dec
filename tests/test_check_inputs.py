"""`check` refuses bad inputs in one line, exit 2, before loading anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def _check(export_dir, *extra):
    return subprocess.run(
        [sys.executable, "-m", "quantize_pipeline.cli", "check", str(export_dir), "--base", "builtin:smollm2-135m-instruct", *extra],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )


def test_an_unquantized_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    done = _check(tmp_path, "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "quantization_config: missing: not a quantized export" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_an_unknown_scheme_needs_a_recipe(tmp_path):
    config = {"quantization_config": {"quant_method": "quark", "global_quant_config": {"weight": {"dtype": "mxfp4"}}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    done = _check(tmp_path, "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 2 and "pass --recipe" in done.stderr


def test_a_folder_without_config_is_refused(tmp_path):
    done = _check(tmp_path)
    assert done.returncode == 2 and "not a model folder (no config.json)" in done.stderr


@pytest.mark.parametrize("arguments, exit_code, says", [
    (["report", "{tmp}"], 2, "report.json: not found"),  # raised in a helper, not the command
    (["init", "-o", "{tmp}/r.yaml"], 2, "init: give MODEL with --scheme"),
    (["prepare-model", "no-such-model"], 1, "unknown builtin model 'no-such-model'"),
    (["plan", "{tmp}/missing.yaml"], 2, "missing.yaml"),
])
def test_every_command_fails_through_the_one_error_boundary(tmp_path, monkeypatch, arguments, exit_code, says):
    """The CLI's error boundary (`cli._Commands`): whichever command raises, one `error:` line and the error's
    exit code, no traceback; each command holds no except of its own for it."""
    from click.testing import CliRunner

    from quantize_pipeline import cli

    monkeypatch.delenv("QP_DEBUG", raising=False)
    result = CliRunner().invoke(cli.main, [part.format(tmp=tmp_path) for part in arguments])
    assert result.exit_code == exit_code, result.output
    lines = [line for line in result.output.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], result.output
    assert result.exc_info is None or result.exc_info[0] is SystemExit
    source = Path(cli.__file__).read_text()
    assert source.count("_fail(exc)") == 1  # the boundary's, only
