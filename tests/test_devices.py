"""resources: device resolution, memory budgets, and plan's mode choice (issue 11)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quantize_pipeline.errors import RecipeError
from quantize_pipeline.recipe import devices, plan
from quantize_pipeline.recipe.schema import Recipe, ResourcesSpec, load_recipe
from tests.conftest import REPO

NONE_SEEN = devices.Accelerators("2.13.0+cpu", None, 0, (), ())
TWO_CUDA = devices.Accelerators("2.13.0+cu128", "cuda", 2, (80 * 2**30, 80 * 2**30), ("H100", "H100"))
ONE_ROCM = devices.Accelerators("2.13.0+rocm6.4", "rocm", 1, (192 * 2**30,), ("MI300X",))
LLAMA70B = REPO / "recipes" / "llama70b-fp8.yaml"
GIB = 2**30


@pytest.mark.parametrize("requested, seen, expected", [
    ("cpu", TWO_CUDA, "cpu"), ("auto", NONE_SEEN, "cpu"), ("auto", TWO_CUDA, "cuda"), ("auto", ONE_ROCM, "cuda"),
    ("cuda", TWO_CUDA, "cuda"), ("rocm", ONE_ROCM, "cuda"),  # ROCm builds of torch call their GPUs "cuda"
])
def test_device_resolution(requested, seen, expected):
    assert devices.resolve_device(ResourcesSpec(device=requested), "r.yaml", seen) == expected


@pytest.mark.parametrize("requested, seen", [("cuda", NONE_SEEN), ("rocm", TWO_CUDA), ("cuda", ONE_ROCM)])
def test_a_device_that_is_not_there_is_refused_naming_the_field(requested, seen):
    with pytest.raises(RecipeError) as caught:
        devices.resolve_device(ResourcesSpec(device=requested), "r.yaml", seen)
    assert caught.value.one_line().startswith(f"r.yaml: resources.device: {requested} requested but torch")


def test_this_machine_has_no_accelerator():
    """CI's machines have no GPU: the cheap device-node check answers without importing torch."""
    assert devices.accelerators().kind is None


def test_per_device_limits_become_accelerate_max_memory():
    assert devices.max_memory(ResourcesSpec(device_memory_gb=70), 2) == {0: "70GiB", 1: "70GiB"}
    assert devices.max_memory(ResourcesSpec(device_memory_gb={1: 40.5}), 2) == {1: "40.5GiB"}
    assert devices.max_memory(ResourcesSpec(), 2) is None


@pytest.mark.parametrize("limits", [0, -1, {0: 0}, {-1: 10}])
def test_bad_memory_limits_are_refused(limits):
    with pytest.raises(ValueError):
        ResourcesSpec(device_memory_gb=limits)


def test_host_budget_from_the_recipe_or_the_machine(minimal_recipe_text, write_recipe):
    recipe = load_recipe(write_recipe(minimal_recipe_text + "resources:\n  host_memory_gb: 12\n"))
    assert devices.host_memory_budget_bytes(recipe) == 12 * GIB
    default = load_recipe(write_recipe(minimal_recipe_text))
    assert 0 < devices.host_memory_budget_bytes(default) < 64 * GIB


def _plan(recipe: Recipe, **kwargs):
    return plan.make_plan(recipe, plan.shipped_config(recipe.model.source), **kwargs)


def test_the_flagship_streams_on_the_cpu_too_held_up_by_its_calibration_hidden_states():
    """Planned on the CPU, the 70B streams: a tenth of the in-memory peak, most of it the hidden states of
    its 512 x 2048 calibration tokens at a layer boundary (held once: each output replaces its input)."""
    result = _plan(load_recipe(LLAMA70B), device="cpu", host_budget=20 * GIB)
    assert result.mode == "streaming" and "> budget" in result.mode_reason
    in_memory, streaming = result.quantize_peaks["in_memory"]["host"], result.quantize_peaks["streaming"]["host"]
    assert in_memory > 250 * GIB and result.quantize_peak_bytes == streaming < in_memory / 10
    hidden_states = 512 * 2048 * 8192 * 2
    assert hidden_states < streaming < hidden_states + 10 * GIB


def _with_quantization(recipe: Recipe, **changes) -> Recipe:
    return recipe.model_copy(update={"quantization": recipe.quantization.model_copy(update=changes)})


def test_auto_mode_goes_data_free_without_calibration_else_keeps_in_memory_when_it_fits():
    """ptpc_fp8 (per-token dynamic activations) needs no calibration: data_free at any budget, its peak a few
    groups of weights, output files and the embedding matrix; static fp8 needs calibrated scales: in memory
    when it fits, else streaming. A recipe may force any mode."""
    recipe = load_recipe(REPO / "recipes" / "llama8b-ptpc-fp8.yaml")
    for budget in (100 * GIB, 10 * GIB):
        result = _plan(recipe, device="cpu", host_budget=budget)
        assert result.mode == "data_free" and "no calibration needed" in result.mode_reason
        peaks = result.quantize_peaks
        assert result.quantize_peak_bytes == peaks["data_free"]["host"] < peaks["in_memory"]["host"] / 4
    static = _with_quantization(recipe, scheme="fp8")
    assert _plan(static, device="cpu", host_budget=100 * GIB).mode == "in_memory"
    assert _plan(static, device="cpu", host_budget=10 * GIB).mode == "streaming"
    for mode in ("in_memory", "streaming"):
        assert _plan(_with_quantization(recipe, mode=mode), device="cpu", host_budget=10 * GIB).mode == mode


def test_auto_on_gpus_streams_unless_in_memory_is_known_to_fit():
    recipe = load_recipe(LLAMA70B)
    assert _plan(recipe, device="cuda", host_budget=20 * GIB).mode == "streaming"  # GPU memory unknown offline
    assert _plan(recipe, device="cuda", host_budget=20 * GIB, device_budget=8 * 80 * GIB).mode == "in_memory"
    streaming = _plan(recipe, device="cuda", host_budget=20 * GIB).quantize_peaks["streaming"]
    assert streaming["host"] < 8 * GIB < streaming["device"] < 40 * GIB  # hidden states and the layer on the GPU


def test_plan_of_the_flagship_works_as_typed():
    """No --model-config: the config shipped under recipes/model-configs/ is found offline."""
    done = subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", "plan", "recipes/llama70b-fp8.yaml", "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["quantize_mode"] == "streaming"
    assert result["quantize_device"] == "cuda"  # the recipe's resources.device
    assert result["quantize_peaks_bytes"]["streaming"]["host"] < 24 * GIB
    text = subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", "plan", "recipes/llama70b-fp8.yaml"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "mode streaming" in text.stdout and "streaming peak memory (estimate): host" in text.stdout


def test_run_refuses_a_missing_device_before_anything_loads(tmp_path, minimal_recipe_text, write_recipe):
    recipe = write_recipe(minimal_recipe_text + "resources:\n  device: cuda\n")
    done = subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", "run", str(recipe), "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {recipe}: resources.device: cuda requested but"), done.stderr
    assert not (tmp_path / "out").exists()  # no run directory, nothing loaded
