"""`check` refuses bad inputs in one line, exit 2, before loading anything."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def _check(export_dir, *extra):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "check", str(export_dir), "--base", "builtin:smollm2-135m-instruct", *extra],
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
