"""A Quark algorithm with recipe options on the real tiny model: calibrate -> quantize (SmoothQuant,
alpha from the recipe) -> freeze -> export -> verify, in a child process as `run` does.

Slow, but cheaper than a full run: serving and evaluation are what the scheme tests already cover;
here the question is whether the options reach Quark and the export stays what the scheme says.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantize_pipeline.recipe.schema import Recipe
from tests.export_only import quantize_and_verify

pytestmark = pytest.mark.slow


def test_smoothquant_options_reach_quark_and_the_export(tmp_path):
    recipe = Recipe.model_validate({
        "name": "smoothquant-options",
        "model": {"source": "builtin:smollm2-135m-instruct"},
        "calibration": {"samples": 8, "max_seq_len": 128},
        "quantization": {"scheme": "int8_per_channel", "algorithm": {"name": "smoothquant", "options": {"alpha": 0.5}}},
    })
    records, result, folders = quantize_and_verify(recipe, tmp_path)
    summary = records["quantize"]["summary"]
    assert (summary["algorithm"], summary["algorithm_options"]) == ("smoothquant", {"alpha": 0.5})
    exported = json.loads((folders["model"] / "config.json").read_text())["quantization_config"]
    [algorithm] = exported["algo_config"]
    assert algorithm["name"] == "smooth" and algorithm["alpha"] == 0.5 and algorithm["scaling_layers"]
    assert result["passed"] and result["quantized_layers_checked"] == 30 * 7
    print(f"quantize wall {records['quantize']['wall_s']:.1f} s")
