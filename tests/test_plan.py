"""plan from a config alone (meta device), and validate's checks against a local model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from quantize_pipeline.recipe import checks
from quantize_pipeline.recipe.plan import make_plan
from quantize_pipeline.recipe.schema import load_recipe
from tests.conftest import REPO

CONFIGS = REPO / "recipes" / "model-configs"


def _plan(recipe: str, config: str):
    return make_plan(load_recipe(REPO / "recipes" / recipe), CONFIGS / config / "config.json")


def test_llama70b_fp8_plan_offline():
    plan = _plan("llama70b-fp8.yaml", "llama-3.1-70b-instruct")
    assert plan.layer_schemes["lm_head"] is None
    assert plan.counts["fp8"] == 80 * 7  # q k v o gate up down in 80 layers
    assert 65e9 < plan.base_size_bytes / 2 < 75e9  # ~70B parameters in bf16
    assert 0.45 < plan.export_size_bytes / plan.base_size_bytes < 0.55
    assert plan.engines["vllm-cuda"].supported and not plan.engines["vllm-cpu"].supported


def test_mixtral_router_gates_stay_unquantized():
    plan = _plan("mixtral-fp8.yaml", "mixtral-8x7b-instruct")
    routers = [name for name in plan.layer_schemes if name.endswith(".gate")]
    assert len(routers) == 32 and all(plan.layer_schemes[name] is None for name in routers)


def test_mixtral_int4_fp8_only_on_experts_is_served_on_rocm():
    plan = _plan("mixtral-int4-fp8.yaml", "mixtral-8x7b-instruct")
    int4 = [name for name, scheme in plan.layer_schemes.items() if scheme == "int4_fp8"]
    # One layer per expert projection, under the checkpoint's names: 32 layers x 8 experts x w1/w2/w3.
    assert len(int4) == 32 * 8 * 3 and all(".block_sparse_moe.experts." in name for name in int4)
    assert "model.layers.0.block_sparse_moe.experts.7.w3" in int4
    routers = [name for name in plan.layer_schemes if name.endswith("block_sparse_moe.gate")]
    assert len(routers) == 32 and all(plan.layer_schemes[name] is None for name in routers)  # kept
    assert plan.engines["vllm-rocm"].supported and not plan.engines["vllm-cuda"].supported
    # 93 GB of bf16, more than this machine holds: streamed, one decoder layer (its 8 experts) at a time.
    assert plan.mode == "streaming" and plan.quantize_peaks["streaming"]["host"] < plan.quantize_peaks["in_memory"]["host"]


def test_dense_int4_fp8_is_refused_with_the_reason():
    recipe = load_recipe(REPO / "tests" / "fixtures" / "dense-int4-fp8.yaml")
    plan = make_plan(recipe, CONFIGS / "llama-3.1-8b-instruct" / "config.json")
    for engine in ("vllm-cuda", "vllm-rocm", "vllm-cpu"):
        assert not plan.engines[engine].supported
        assert "QuarkW4A8Fp8MoEMethod" in plan.engines[engine].reason
    assert not checks.recipe_support(recipe, "vllm-cuda").supported


def test_plan_command_json():
    done = subprocess.run(
        [sys.executable, "-m", "quantize_pipeline.cli", "plan", "recipes/llama8b-ptpc-fp8.yaml", "--json",
         "--model-config", str(CONFIGS / "llama-3.1-8b-instruct" / "config.json")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["layer_counts"]["ptpc_fp8"] == 32 * 7
    assert result["stages"][-1] == "publish"


@pytest.fixture
def local_model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 576, "intermediate_size": 1536, "tie_word_embeddings": True}))
    save_file({
        "model.embed_tokens.weight": np.zeros((8, 4), np.float32),
        "model.layers.0.mlp.gate_proj.weight": np.zeros((8, 4), np.float32),
        "model.layers.0.self_attn.q_proj.weight": np.zeros((4, 4), np.float32),
    }, str(folder / "model.safetensors"))
    return folder


def _recipe_for(tmp_path, model_dir, scheme: str, exclude: str):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nmodel: {{source: {model_dir}}}\nquantization: {{scheme: {scheme}, exclude: {exclude}}}\n")
    return path


def test_group_size_must_divide_the_model(tmp_path, local_model):
    problems = checks.model_problems(load_recipe(_recipe_for(tmp_path, local_model, "int4_wo_128", "[lm_head]")), local_model)
    assert problems == [("quantization.scheme", problems[0][1])]
    assert "group size 128 does not divide the model's hidden_size 576" in problems[0][1]
    assert checks.model_problems(load_recipe(_recipe_for(tmp_path, local_model, "int4_wo_64", "[lm_head]")), local_model) == []


def test_exclude_pattern_must_match_a_layer(tmp_path, local_model):
    recipe_path = _recipe_for(tmp_path, local_model, "int8_per_channel", "[lm_head, 'o_projj']")
    done = subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", "validate", str(recipe_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 2
    assert f"{recipe_path}: quantization.exclude: pattern 'o_projj' matches no layer of the model" in done.stderr


@pytest.fixture
def fused_model(tmp_path):
    """One decoder layer's linear shapes in names: q/k/v and gate/up are fused by vLLM."""
    folder = tmp_path / "fused-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128}))
    leaves = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")
    save_file({f"model.layers.0.{leaf}.weight": np.zeros((64, 64), np.float32) for leaf in leaves}
              | {"lm_head.weight": np.zeros((8, 64), np.float32)}, str(folder / "model.safetensors"))
    return folder


def _layers_recipe(tmp_path, model_dir, exclude: str = "", overrides: str = ""):
    path = tmp_path / "fused.yaml"
    path.write_text(f"name: t\nmodel: {{source: {model_dir}}}\n"
                    f"quantization: {{scheme: int8_per_channel, exclude: [lm_head{exclude}]{overrides}}}\n")
    return load_recipe(path)


def test_shards_vllm_fuses_must_share_one_scheme(tmp_path, fused_model):
    """vLLM refuses an export whose gate_proj and up_proj (or q/k/v) differ: "Found different quantization
    schemes for the shards of model.layers.29.mlp.gate_up_proj" (measured). Refused before anything loads."""
    split_override = _layers_recipe(tmp_path, fused_model, overrides=", layers: {'model.layers.0.mlp.up_proj': int4_wo_64}")
    assert checks.model_problems(split_override, fused_model) == [(
        "quantization.layers", "model.layers.0.mlp.gate_proj gets int8_per_channel but model.layers.0.mlp.up_proj "
        "int4_wo_64: vLLM fuses them into one layer with one scheme; give them the same scheme")]
    split_exclude = _layers_recipe(tmp_path, fused_model, exclude=", model.layers.0.self_attn.k_proj")
    problems = checks.model_problems(split_exclude, fused_model)
    assert [field for field, _ in problems] == ["quantization.exclude"]
    assert "k_proj excluded without model.layers.0.self_attn.q_proj, model.layers.0.self_attn.v_proj" in problems[0][1]
    whole_groups = _layers_recipe(tmp_path, fused_model, exclude=", 're:.*(gate|up)_proj'",
                                  overrides=", layers: {'re:.*[qkv]_proj': int4_wo_64}")
    assert checks.model_problems(whole_groups, fused_model) == []


@pytest.mark.slow  # builds two of the largest open MoE models on the meta device (~25 s)
@pytest.mark.parametrize(("config", "experts", "layers", "routers"), [
    ("qwen3-235b-a22b", 128, 94, 94),
    ("deepseek-v3", 256, 61, 58),  # its first 3 layers are dense
])
def test_plan_of_the_largest_moe_configs_offline_prints_experts_routers_and_streaming_peak(config, experts, layers,
                                                                                           routers):
    """The plan's figures in process; the command's printed lines once, offline (a subprocess: no Hub client)."""
    recipe = load_recipe(REPO / "recipes" / "mixtral-int4-fp8.yaml")
    plan = make_plan(recipe, CONFIGS / config / "config.json")
    assert plan.moe["experts_per_layer"] == experts
    assert plan.moe["expert_schemes"] == {"int4_fp8": routers * experts * 3}  # one layer per expert projection
    assert plan.moe["routers"] == plan.moe["routers_kept"] == routers and plan.moe["keep_routers"]
    assert plan.mode == "streaming"  # a layer of experts at a time: no machine holds these in memory
    assert 0 < plan.quantize_peaks["streaming"]["host"] < plan.quantize_peaks["in_memory"]["host"]
    printed = subprocess.run(
        [sys.executable, "-m", "quantize_pipeline.cli", "plan", "recipes/mixtral-int4-fp8.yaml",
         "--model-config", str(CONFIGS / config / "config.json")], capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert printed.returncode == 0, printed.stderr
    assert f"MoE: {experts} experts a layer; expert layers: {routers * experts * 3} int4_fp8; routers: {routers} of " \
           f"{routers} kept in the model dtype" in printed.stdout
    assert "streaming peak memory (estimate)" in printed.stdout


@pytest.mark.parametrize("recipe_name", ["mixtral-int4-fp8.yaml", "mixtral-fp8.yaml", "llama70b-fp8.yaml"])
def test_can_serve_answers_the_same_from_the_layers_as_from_the_recipe_alone(recipe_name):
    """One can-serve answer: plan (the meta model's layers) and validate/run/check of a Hub id not on disk (the
    recipe's patterns alone) agree, reason included, on every engine."""
    from quantize_pipeline.engines import compat

    recipe = load_recipe(REPO / "recipes" / recipe_name)
    config = "mixtral-8x7b-instruct" if recipe_name.startswith("mixtral") else "llama-3.1-70b-instruct"
    plan = make_plan(recipe, CONFIGS / config / "config.json")
    for engine in compat.ENGINES:
        assert compat.can_serve(recipe, engine, None) == plan.engines[engine], engine
