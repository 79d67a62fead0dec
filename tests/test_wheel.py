"""The package as users install it: the wheel built from this checkout, installed into a fresh virtualenv that
sees the test environment's heavy packages (torch, vLLM, Quark, lm-eval: installed from the same constraints) but
not the checkout, driven from a folder outside it: `recipes`, `init`, `validate`, `plan` of a shipped recipe
offline, and a CI-sized run of the default recipe (its calibration and held-out text from the wheel), stopped
after verify, moved and finished elsewhere (`run --until`, `run --resume RUN_DIR`).

Slow: one run of the tiny model (quantize, vLLM, lm-eval at the shared CI sizes) and one more quantize.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from quantize_pipeline.recipe.schema import load_recipe
from quantize_pipeline.run.resume import STAGES
from quantize_pipeline.run.rundir import sha256_file
from tests.ci_recipes import CI_GATES, ci_sized
from tests.conftest import REPO
from tests.export_only import quantize_and_verify

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


def test_the_wheel_runs_the_shipped_default_outside_the_checkout_quantizing_here_and_evaluating_there(installed, tmp_path):
    """The installed package, from folders outside the checkout: `recipes`, `init`, `plan` of the 70B recipe from
    the shipped model config, `validate`, then the CI-sized default quantized on one "machine" with `run --until
    verify`, its folder moved to another and finished there by `run --resume RUN_DIR` alone: every stopped stage
    kept, the gate passed, the export published equal (sha256) to an uninterrupted quantize of the same recipe.
    A copy with one byte of the export changed is refused in one line."""
    where = subprocess.run([str(installed / "bin" / "python"), "-c", "import quantize_pipeline; print(quantize_pipeline.__file__)"],
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

    here = tmp_path / "quantize-box"
    here.mkdir()
    assert _outside(installed, here, "init", "--from", "smollm2-135m-int8", "-o", "recipe.yaml").returncode == 0
    text = ci_sized((here / "recipe.yaml").read_text())
    for default, looser in CI_GATES.items():
        text = text.replace(f"  {default}", f"  {looser}")
    (here / "recipe.yaml").write_text(text)
    validated = _outside(installed, here, "validate", "recipe.yaml")
    assert validated.returncode == 0 and validated.stdout.startswith("recipe.yaml: ok (smollm2-135m-int8"), validated.stderr

    stopped = _outside(installed, here, "run", "recipe.yaml", "--until", "verify", timeout=1800)
    assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert "stopped after verify (--until)" in stopped.stdout and "gate:" not in stopped.stdout
    run_dir = here / stopped.stdout.split("run directory: ")[-1].splitlines()[0]  # relative to its cwd
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "stopped" and tuple(manifest["stages"]) == STAGES[:5]
    # The calibration text came from the wheel (there is no other copy on this interpreter's path).
    assert manifest["stages"]["calibrate"]["summary"]["source"] == "wikipedia"
    assert not (run_dir / "serve").exists() and not (run_dir / "report.json").exists()

    there = tmp_path / "serving-box"
    there.mkdir()
    moved = Path(shutil.move(str(run_dir), there / run_dir.name))
    shutil.rmtree(here)  # nothing of the first machine is left to lean on

    tampered = Path(shutil.copytree(moved, there / "tampered"))
    with open(tampered / "model" / "model.safetensors", "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    refused = _outside(installed, there, "run", "--resume", str(tampered))
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: {tampered / 'manifest.json'}: model/model.safetensors does not match its sha256 in the manifest "
        "(1 file(s) missing or changed since the run stopped): not resumed")

    finished = _outside(installed, there, "run", "--resume", str(moved), "--json", timeout=1800)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    result = json.loads(finished.stdout.splitlines()[-1])
    assert result["verdict"] == "pass" and Path(result["run_dir"]) == moved
    stages = json.loads((moved / "manifest.json").read_text())["stages"]
    assert tuple(stage for stage, record in stages.items() if record.get("reused")) == STAGES[:5], stages
    published = there / "exports" / "published" / "smollm2-135m-int8" / "model.safetensors"

    uninterrupted = tmp_path / "uninterrupted"
    uninterrupted.mkdir()
    _, verified, folders = quantize_and_verify(load_recipe(moved / "recipe.yaml"), uninterrupted)
    assert verified["passed"] and sha256_file(published) == sha256_file(folders["model"] / "model.safetensors")
