"""Dense architectures other than Llama, synthetic and tiny (bench/synthetic_llama.py: published configs cut to 4
layers, random weights, the default model's tokenizer): Qwen3 (q/k norms, tied embeddings) and Phi-3 (q/k/v and
gate/up already fused in the checkpoint) through calibrate -> quantize -> freeze -> export -> verify, and the
recipe checks that speak their layer names (vLLM's fused-shard rule, exclude patterns).

Serving: both ran through vLLM's CPU build by hand here (docs/schemes.md, "Other dense architectures"); CI stops them at
verify (each more vLLM run is ~2 min here, issue #24's budget). Slow: two quantizations of ~15M-parameter models.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quantize_pipeline.formats.safetensors_header import read_folder
from quantize_pipeline.recipe import checks
from quantize_pipeline.recipe.schema import load_recipe
from tests.conftest import write_synthetic_models

pytestmark = pytest.mark.slow  # the fixture writes two checkpoints with the default model's tokenizer

LAYERS = 4
# The linear layers of one decoder layer, as each checkpoint names them.
LINEAR = {
    "qwen3-tiny": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "phi3-tiny": ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    return write_synthetic_models(tmp_path_factory.mktemp("dense-models"), LINEAR, tiny_model_dir)


def _recipe(tmp_path: Path, model_dir: Path, exclude: str = "") -> Path:
    path = tmp_path / f"{model_dir.name}{'-excluded' if exclude else ''}.yaml"
    path.write_text(f"name: {model_dir.name}\nmodel: {{source: {model_dir}, dtype: bfloat16}}\n"
                    "calibration: {samples: 4, max_seq_len: 32}\n"
                    f"quantization: {{scheme: int8_per_channel, exclude: [lm_head{exclude}]}}\n")
    return path


@pytest.mark.parametrize("shape", list(LINEAR))
def test_quantize_export_verify(models, shape, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "quantize_pipeline.cli", "run", str(_recipe(tmp_path, models[shape])), "--until", "verify",
         "--output-dir", str(tmp_path / "exports")], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    run_dir = next((tmp_path / "exports").glob("*/*/manifest.json")).parent
    verify = json.loads((run_dir / "verify" / "verify.json").read_text())
    assert verify["passed"] and verify["quantized_layers_checked"] == LAYERS * len(LINEAR[shape])
    exported = read_folder(run_dir / "model")
    for layer in range(LAYERS):
        for linear in LINEAR[shape]:
            name = f"model.layers.{layer}.{linear}"
            assert exported[f"{name}.weight"]["dtype"] == "I8" and f"{name}.weight_scale" in exported, name
    if shape == "qwen3-tiny":  # its q/k norms stay as they were; the tied lm_head has no tensor of its own
        assert exported["model.layers.0.self_attn.q_norm.weight"]["dtype"] == "BF16"
        assert "lm_head.weight" not in exported
    else:
        assert exported["lm_head.weight"]["dtype"] == "BF16"


def test_fused_shard_rule_and_patterns_speak_each_checkpoint_s_names(models, tmp_path):
    """Qwen3's q/k/v are three checkpoint layers that vLLM fuses: excluding one alone is refused. Phi-3's are
    one layer already: excluding it whole is fine, and a pattern for the unfused names matches nothing."""
    qwen3, phi3 = models["qwen3-tiny"], models["phi3-tiny"]
    problems = checks.model_problems(load_recipe(_recipe(tmp_path, qwen3, ", model.layers.0.self_attn.k_proj")), qwen3)
    assert [field for field, _ in problems] == ["quantization.exclude"]
    assert "k_proj excluded without model.layers.0.self_attn.q_proj, model.layers.0.self_attn.v_proj" in problems[0][1]
    assert checks.model_problems(load_recipe(_recipe(tmp_path, phi3, ", 're:.*\\.qkv_proj$'")), phi3) == []
    problems = checks.model_problems(load_recipe(_recipe(tmp_path, phi3, ", 're:.*\\.k_proj$'")), phi3)
    assert [field for field, _ in problems] == ["quantization.exclude"] and "matches no layer" in problems[0][1]
