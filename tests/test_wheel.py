"""The package as users install it: the wheel built from this checkout, installed into a fresh virtualenv that
sees the test environment's heavy packages (torch, vLLM, Quark, lm-eval: installed from the same constraints) but
not the checkout, driven from a folder outside it: `recipes`, `init`, `validate`, `plan` of a shipped recipe
offline, and a CI-sized `run` of the default recipe, whose calibration and held-out text come from the wheel.

Slow: one run of the tiny model (quantize, vLLM, lm-eval at the shared CI sizes).
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ci_recipes import CI_GATES, ci_sized
from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtualenv holding the wheel; the heavy stack reached through a .pth line (no copy of GBs)."""
    root = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                            "-w", str(root / "dist")], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    wheel = next((root / "dist").glob("quantize_pipeline-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # A plain path line: the test environment's packages, but not its .pth files (the checkout's editable finder).
    purelib = next(Path(path) for path in site.getsitepackages() if path.endswith("site-packages"))
    (next(venv.glob("lib/python3*/site-packages")) / "test-environment.pth").write_text(f"{purelib}\n")
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return venv


def _outside(venv: Path, tmp_path: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([str(venv / "bin" / "quantize-pipeline"), *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=timeout)


def test_the_wheel_runs_the_shipped_default_outside_the_checkout(installed, tmp_path):
    where = subprocess.run([str(installed / "bin" / "python"), "-c", "import pipeline; print(pipeline.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout.strip()
    assert Path(where).is_relative_to(installed) and not Path(where).is_relative_to(REPO), where

    listed = _outside(installed, tmp_path, "recipes")
    assert listed.returncode == 0, listed.stderr
    assert f"smollm2-135m-int8: int8_per_channel on builtin:smollm2-135m-instruct ({installed}" in listed.stdout

    # plan of the 70B recipe: the shipped model config, offline.
    assert _outside(installed, tmp_path, "init", "--from", "llama70b-fp8", "-o", "big.yaml").returncode == 0
    planned = _outside(installed, tmp_path, "plan", "big.yaml", "--json")
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert json.loads(planned.stdout)["base_size_bytes"] > 140e9  # 70B parameters in bf16

    assert _outside(installed, tmp_path, "init", "--from", "smollm2-135m-int8", "-o", "recipe.yaml").returncode == 0
    text = ci_sized((tmp_path / "recipe.yaml").read_text())
    for default, looser in CI_GATES.items():
        text = text.replace(f"  {default}", f"  {looser}")
    (tmp_path / "recipe.yaml").write_text(text)
    validated = _outside(installed, tmp_path, "validate", "recipe.yaml")
    assert validated.returncode == 0 and validated.stdout.startswith("recipe.yaml: ok (smollm2-135m-int8"), validated.stderr

    ran = _outside(installed, tmp_path, "run", "recipe.yaml", "--json", timeout=1800)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    result = json.loads(ran.stdout.splitlines()[-1])
    assert result["verdict"] == "pass" and Path(result["run_dir"]).is_relative_to(tmp_path)
    calibrated = json.loads((Path(result["run_dir"]) / "manifest.json").read_text())["stages"]["calibrate"]["summary"]
    assert calibrated["source"] == "wikipedia" and calibrated["samples"] == 8, calibrated
    assert (tmp_path / "exports" / "published" / "smollm2-135m-int8" / "model.safetensors").is_file()
