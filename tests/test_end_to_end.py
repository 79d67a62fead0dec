"""The default recipe through the real stack: Quark -> safetensors -> vLLM (CPU) -> lm-eval -> gate.

Slow (minutes): the base model's figures are cached after the first run, so the
second test reuses them, as users' runs do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.rundir import hash_tree, sha256_file
from pipeline.safetensors_header import read_folder
from tests.conftest import DEFAULT_RECIPE, REPO

pytestmark = pytest.mark.slow

STAGES = ("calibrate", "quantize", "freeze", "export", "verify", "serve", "evaluate", "gate", "publish")


def _run(recipe: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--output-dir", str(cwd / "exports")],
        cwd=cwd, capture_output=True, text=True, timeout=1800, env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _run_dir(completed: subprocess.CompletedProcess) -> Path:
    lines = [line for line in (completed.stdout + completed.stderr).splitlines() if line.startswith("run directory: ")]
    assert lines, completed.stdout + completed.stderr
    return Path(lines[-1].removeprefix("run directory: "))


def test_default_recipe_passes_and_publishes(tmp_path):
    completed = _run(DEFAULT_RECIPE, tmp_path)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "gate: pass" in completed.stdout
    run_dir = _run_dir(completed)

    # Every stage recorded with wall time and peak RSS; every file hashed.
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "passed"
    assert tuple(manifest["stages"]) == STAGES
    for stage, record in manifest["stages"].items():
        assert record["status"] == "done" and record["wall_s"] >= 0 and record["peak_rss_mb"] > 0, stage
        assert (run_dir / record["log"]).is_file(), stage
    for name, digest in manifest["files"].items():
        assert sha256_file(run_dir / name) == digest, name
    assert {"model/model.safetensors", "report.json", "report.md", "calibrate/tokens.jsonl"} <= set(manifest["files"])

    # The export is really INT8 per-channel, lm_head untouched.
    tensors = read_folder(run_dir / "model")
    up = "model.layers.0.mlp.up_proj"
    assert tensors[f"{up}.weight"]["dtype"] == "I8"
    assert tensors[f"{up}.weight_scale"]["shape"] in ([1536], [1536, 1])
    assert not any(name.startswith("lm_head.") and name.endswith("_scale") for name in tensors)
    config = json.loads((run_dir / "model" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "quark"

    # vLLM generated real text, with memory measured.
    serve = json.loads((run_dir / "serve" / "generations.json").read_text())
    assert serve["generated_tokens"] > 0 and serve["tokens_per_s"] > 0
    capital = next(item for item in serve["completions"] if "France" in item["prompt"])
    assert "Paris" in capital["completion"]
    assert manifest["stages"]["serve"]["peak_rss_mb"] > 500  # the vLLM process tree, not just the parent

    # The gate compared base and quantized on the same questions.
    report = json.loads((run_dir / "report.json").read_text())
    assert report["verdict"] == "pass" and report["schema_version"] == 1
    arc = report["evaluation"]["tasks"]["arc_easy"]
    assert arc["base"]["samples"] == arc["quantized"]["samples"] == 200
    assert 0.3 < arc["quantized"]["acc"] <= 1.0
    assert report["evaluation"]["perplexity"]["quantized"] > 1.0

    # Published: the same model files plus a card.
    published = tmp_path / "exports" / "published" / "smollm2-135m-int8"
    assert hash_tree(published)["model.safetensors"] == manifest["files"]["model/model.safetensors"]
    card = (published / "README.md").read_text()
    assert "base_model_relation: quantized" in card and "int8_per_channel" in card


def test_impossible_gate_exits_3_and_publishes_nothing(tmp_path):
    recipe = tmp_path / "impossible.yaml"
    recipe.write_text(
        DEFAULT_RECIPE.read_text()
        .replace("min_recovery: 0.95", "min_recovery: 100.0")
        .replace("samples: 64", "samples: 16")
        .replace("limit: 200", "limit: 50")
    )
    completed = _run(recipe, tmp_path)
    assert completed.returncode == 3, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "gate failed: min_recovery[arc_easy]" in completed.stderr
    run_dir = _run_dir(completed)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["verdict"] == "fail" and "min_recovery[arc_easy]" in report["failed_rules"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "publish" not in manifest["stages"]
    assert not (tmp_path / "exports" / "published").exists()
    assert not (run_dir / "publish").exists()
