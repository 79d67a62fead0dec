"""bench/gpu_check.py, the GPU check, run at its CPU sizes (`--device cpu`): its logic proven here before any GPU
time is spent, and a broken step shown to fail, named. quantize_pipeline/verify/export_equality.py, the comparison it shares
with the streaming-equality tests, is tested on small hand-made exports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "bench" / "gpu_check.py"


def _check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    summary = tmp_path / "gpu_check.json"
    completed = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--work", str(tmp_path / "work"),
                                "--json", str(summary), *args], capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert summary.is_file(), completed.stdout[-2000:] + completed.stderr[-3000:]
    return completed, json.loads(summary.read_text())


@pytest.mark.slow
def test_the_gpu_check_passes_at_its_cpu_sizes(tmp_path):
    """The only CI run of the check's four steps (the tiny model fp8 streaming and in memory, a synthetic shape
    against plan, `check` with the transformers engine), ~5 min here."""
    completed, summary = _check(tmp_path)
    assert completed.returncode == 0 and summary["passed"], completed.stderr[-3000:]
    assert sorted(summary["steps"]) == ["1", "2", "3", "4"]
    lines = [line for line in completed.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" ", 2)[1] for line in lines] == ["1", "2", "3", "4"]
    assert summary["steps"]["1"]["verified"] and summary["steps"]["2"]["equal"] and summary["steps"]["3"]["verified"]
    synthetic = summary["steps"]["3"]
    assert synthetic["shape"] == "135m-4layers" and abs(synthetic["measured_over_plan"]["host"] - 1) <= 0.25
    assert synthetic["host_peak_gib"] > 0.3  # the process tree's peak was sampled (the libraries alone are more)
    figures = summary["steps"]["4"]["figures"]
    assert {"max_mean_kl", "min_top1_agreement", "max_perplexity_ratio", "no_garbage"} <= set(figures)
    for rule in figures.values():
        low, high = rule["cpu_interval"]
        assert low <= rule["figure"] <= high


@pytest.mark.slow
def test_a_broken_step_fails_and_is_named(tmp_path):
    """One FP8 weight of step 3's export stored back in bf16 (--corrupt-step, for this test): verify refuses it,
    the check exits 1 naming the step, and its JSON says so."""
    completed, summary = _check(tmp_path, "--steps", "3", "--corrupt-step", "3")
    assert completed.returncode == 1 and not summary["passed"]
    assert summary["failed"]["step"] == "step 3 (synthetic)"
    assert "FAILED step 3 (synthetic): verify failed" in completed.stderr
    assert "weight stored as BF16, expected F8_E4M3" in summary["failed"]["message"]


def test_without_a_gpu_the_cuda_check_says_so_and_exits_2(tmp_path):
    completed = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path)], capture_output=True, text=True,
                               cwd=REPO, timeout=300)
    assert completed.returncode == 2 and "torch sees no CUDA device" in completed.stderr


def _export(folder: Path, tensors: dict, config: dict | None = None) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"quantization_config": config or {"quant_method": "quark"}}))
    return folder


def test_export_differences_name_every_kind_of_difference(tmp_path):
    import torch

    from quantize_pipeline.verify.export_equality import differences

    codes = torch.randint(-100, 100, (100, 100), dtype=torch.int8)
    scale, input_scale = torch.tensor([0.5]), torch.tensor([1.0])
    tensors = {"w": codes, "w_scale": scale, "x_scale.input_scale": input_scale}
    reference = _export(tmp_path / "a", tensors)
    assert differences(reference, _export(tmp_path / "same", dict(tensors))) == []
    # Within tolerance: an activation scale a bf16 step off, one integer code on a tie (1 of 10000).
    tie = codes.clone()
    tie[0, 0] += 1
    close = _export(tmp_path / "close", {"w": tie, "w_scale": scale, "x_scale.input_scale": input_scale * (1 + 2**-8)})
    assert differences(reference, close) == []
    shifted = codes.clone()
    shifted[:2] += 1
    far = _export(tmp_path / "far", {"w": shifted, "w_scale": scale * 1.01, "extra": scale}, {"quant_method": "other"})
    found = differences(reference, far)
    assert any(line.startswith("tensor names differ") for line in found)
    assert any(line.startswith("w: 200 integer codes differ") for line in found)
    assert any(line.startswith("w_scale:") for line in found) and "quantization_config differs" in found
    wrong_dtype = _export(tmp_path / "dtype", {**tensors, "w": codes.to(torch.bfloat16)})
    assert differences(reference, wrong_dtype) == ["w: torch.bfloat16 [100, 100] != torch.int8 [100, 100]"]
