"""Mixture-of-Experts for real, on synthetic checkpoints in the Hub's layout (bench/synthetic_llama.py: random
weights, published configs cut to 4 layers, the default model's tokenizer): the shipped mixtral-int4-fp8 recipe at
CI size through `run` (INT4 experts, FP8 attention, routers kept; the transformers fallback evaluates it here) and
in streaming mode (equal to in memory), a Qwen3-MoE through verify in int4_fp8 and in fp8 with most experts
reached by no calibration token (in memory and streaming, equal), the Mixtral in fp8 and int8_per_channel through
every stage (the labelled fallback), and verify failing a mislabelled export and one whose experts stayed BF16.

Slow: seven quantizations of ~40M-parameter models and three evaluations by Quark's emulation (~6 min here).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quantize_pipeline.formats.safetensors_header import read_folder
from quantize_pipeline.recipe.schema import Recipe
from tests.conftest import REPO, write_synthetic_models

pytestmark = pytest.mark.slow

LAYERS, MIXTRAL_EXPERTS, QWEN_EXPERTS = 4, 8, 16
SMALL_EVALUATION = {"engine": "auto", "tasks": ["arc_easy"], "limit": 10, "max_limit": 10, "perplexity_limit": 8,
                    "divergence_limit": 8, "prompts": ["The capital of France is"], "max_new_tokens": 8,
                    "tensor_parallel_size": 1}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    return write_synthetic_models(tmp_path_factory.mktemp("moe-models"), ("mixtral-tiny", "qwen3-moe-tiny"),
                                  tiny_model_dir)


def _ci_copy(shipped: str, model_dir: Path, folder: Path, **quantization) -> Path:
    """The shipped recipe with the synthetic model, 8 x 128 calibration tokens and a tiny evaluation, no publish."""
    data = yaml.safe_load((REPO / "recipes" / shipped).read_text())
    data["name"] = f"ci-{model_dir.name}"
    data["model"] = {"source": str(model_dir), "dtype": "bfloat16"}
    data["calibration"] |= {"samples": 8, "max_seq_len": 128}
    data["quantization"] |= quantization
    data["evaluation"] = SMALL_EVALUATION
    data.pop("gates", None)
    data.pop("publish", None)
    path = folder / f"{model_dir.name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=1800)


@pytest.fixture(scope="module")
def mixtral_run(models, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    folder = tmp_path_factory.mktemp("mixtral-run")
    recipe = _ci_copy("mixtral-int4-fp8.yaml", models["mixtral-tiny"], folder)
    completed = _run("run", str(recipe), "--output-dir", str(folder / "exports"), "--json", cwd=folder)
    run_dirs = sorted((folder / "exports").glob("*/*/manifest.json"))
    assert len(run_dirs) == 1, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed, run_dirs[0].parent, recipe


def test_the_shipped_mixtral_int4_fp8_recipe_runs_with_int4_experts(mixtral_run):
    """The only CI run of int4_fp8 and of an MoE model through every stage."""
    completed, run_dir, _ = mixtral_run
    report = json.loads((run_dir / "gate" / "report.json").read_text())
    # Random weights: the base model's own completions are garbage, so no_garbage fails both; the exit code is
    # the verdict's, and the engine is the labelled fallback (vLLM's CPU build has no MoE W4A8 or static FP8).
    assert completed.returncode == {"pass": 0, "fail": 3, "inconclusive": 4}[report["verdict"]], completed.stderr[-2000:]
    assert report["engine"]["name"] == "transformers" and "FALLBACK" in report["engine"]["label"]
    exported = read_folder(run_dir / "model")
    for layer in range(LAYERS):
        for expert in range(MIXTRAL_EXPERTS):
            for projection in ("w1", "w2", "w3"):
                name = f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{projection}"
                assert exported[f"{name}.weight"]["dtype"] == "I32", name  # INT4, eight to an int32
                assert exported[f"{name}.weight_scale"]["shape"] in ([], [1]) and f"{name}.weight_scale_2" in exported
        assert exported[f"model.layers.{layer}.block_sparse_moe.gate.weight"]["dtype"] == "BF16"  # router kept
        assert exported[f"model.layers.{layer}.self_attn.q_proj.weight"]["dtype"] == "F8_E4M3"
    assert not any(".mlp." in name or "gate_up_proj" in name for name in exported)  # the checkpoint's names only
    verify = json.loads((run_dir / "verify" / "verify.json").read_text())
    assert verify["passed"] and verify["quantized_layers_checked"] == LAYERS * (MIXTRAL_EXPERTS * 3 + 4)
    quantize = json.loads((run_dir / "quantize" / "quantize.json").read_text())
    assert quantize["unfused_expert_modules"] == LAYERS and quantize["mode"] == "in_memory"
    assert "in-memory peak" in quantize["mode_reason"]  # auto: the tiny model fits (streaming: the test below)
    # 8 x 128 calibration tokens reach all 8 experts of each layer (top-2): nothing to flag, and nothing flagged.
    assert quantize["experts_without_calibration_tokens"]["count"] == 0 and report["quantize_warnings"] == []
    result = json.loads(completed.stdout.splitlines()[-1])
    assert result["event"] == "result" and result["quantize_warnings"] == []


def _verify(recipe_path: Path, base: Path, export: Path, out: Path) -> dict:
    from quantize_pipeline.quantize.quantize import layer_overrides
    from quantize_pipeline.recipe import checks
    from quantize_pipeline.verify import verify

    recipe = Recipe.model_validate(yaml.safe_load(recipe_path.read_text()))
    linear = checks.weight_layer_names(base)
    overrides = layer_overrides(recipe, linear, [])
    out.mkdir(parents=True, exist_ok=True)
    return verify.verify(recipe, base, export, linear, out, overrides)


def test_verify_fails_int4_experts_under_a_config_that_says_fp8(mixtral_run, models, tmp_path):
    from quantize_pipeline.errors import VerifyFailed

    _, run_dir, recipe = mixtral_run
    mislabelled = tmp_path / "mislabelled"
    shutil.copytree(run_dir / "model", mislabelled)
    config = json.loads((mislabelled / "config.json").read_text())
    quantization = config["quantization_config"]
    quantization["layer_quant_config"] = {key: quantization["global_quant_config"]  # every expert "fp8"
                                          for key in quantization["layer_quant_config"]}
    (mislabelled / "config.json").write_text(json.dumps(config))
    with pytest.raises(VerifyFailed, match=r"layer_quant_config\['model.layers.0.block_sparse_moe.experts.0.w\d'\]: "
                                           r"weight dtype is 'fp8_e4m3', expected 'int4'"):
        _verify(recipe, models["mixtral-tiny"], mislabelled, tmp_path / "verify")


def test_verify_fails_an_export_whose_experts_stayed_bf16(mixtral_run, models, tmp_path):
    """What a user got before (the experts as fused BF16 parameters Quark never saw), and per-expert BF16."""
    import torch
    from safetensors.torch import load_file, save_file

    from quantize_pipeline.errors import VerifyFailed

    _, run_dir, recipe = mixtral_run
    base = load_file(str(models["mixtral-tiny"] / "model-00001.safetensors"))
    bf16 = tmp_path / "bf16-experts"
    shutil.copytree(run_dir / "model", bf16)
    for path in bf16.glob("*.safetensors"):
        tensors = {name: tensor for name, tensor in load_file(str(path)).items()
                   if not (".experts.0." in name and name.rsplit(".", 1)[0].endswith(("w1", "w2", "w3")))}
        tensors |= {name: tensor.to(torch.bfloat16) for name, tensor in base.items() if ".experts.0." in name}
        save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(VerifyFailed, match=r"model.layers.\d.block_sparse_moe.experts.0.w\d: weight stored as BF16, "
                                           r"expected I32 for int4_fp8"):
        _verify(recipe, models["mixtral-tiny"], bf16, tmp_path / "verify")


def test_qwen3_moe_int4_fp8_experts_and_kept_routers_through_verify(models, tmp_path):
    recipe = _ci_copy("mixtral-int4-fp8.yaml", models["qwen3-moe-tiny"], tmp_path)
    completed = _run("run", str(recipe), "--until", "verify", "--output-dir", str(tmp_path / "exports"), cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    run_dir = next((tmp_path / "exports").glob("*/*/manifest.json")).parent
    exported = read_folder(run_dir / "model")
    experts = [name for name in exported if ".mlp.experts." in name and name.endswith(".weight")]
    assert len(experts) == LAYERS * QWEN_EXPERTS * 3 and all(exported[name]["dtype"] == "I32" for name in experts)
    verify = json.loads((run_dir / "verify" / "verify.json").read_text())
    assert verify["passed"] and verify["quantized_layers_checked"] == LAYERS * (QWEN_EXPERTS * 3 + 4)
    # Qwen3-MoE's router is an nn.Linear once unfused: kept by the default keep_routers, listed as excluded.
    assert sorted(verify["excluded_layers"]) == sorted(["lm_head", *(f"model.layers.{i}.mlp.gate" for i in range(LAYERS))])
    assert all(exported[f"model.layers.{i}.mlp.gate.weight"]["dtype"] == "BF16" for i in range(LAYERS))


def test_static_fp8_experts_no_token_reached_get_the_layers_largest_scale_and_a_warning(models, tmp_path):
    """fp8 (static input scales) on the Qwen3-MoE calibrated with one row of 16 tokens: 4 of 16 experts a token,
    so most experts see none. Measured before this fix: Quark left their input scale at its initial 1.0 and
    verify passed; vLLM serves a layer with the maximum input scale across its experts, so that 1.0 would have
    quantized every expert of the layer. Now each such expert gets the largest scale of the same projection
    among the layer's calibrated experts, listed in quantize.json and warned about in the report."""
    from safetensors import safe_open

    from quantize_pipeline.quantize.quantize import quantize_warnings

    recipe = _ci_copy("mixtral-int4-fp8.yaml", models["qwen3-moe-tiny"], tmp_path, scheme="fp8", layers={})
    data = yaml.safe_load(recipe.read_text())
    data["calibration"] |= {"samples": 1, "max_seq_len": 16}
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    completed = _run("run", str(recipe), "--until", "verify", "--output-dir", str(tmp_path / "exports"), cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    run_dir = next((tmp_path / "exports").glob("*/*/manifest.json")).parent
    assert json.loads((run_dir / "verify" / "verify.json").read_text())["passed"]
    summary = json.loads((run_dir / "quantize" / "quantize.json").read_text())
    uncalibrated = summary["experts_without_calibration_tokens"]
    filled = {expert["layer"]: expert["input_scale"] for expert in uncalibrated["experts"]}
    assert 0 < uncalibrated["count"] == len(filled) < LAYERS * QWEN_EXPERTS * 3
    scales = {}
    for shard in (run_dir / "model").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as tensors:
            scales |= {name.removesuffix(".input_scale"): tensors.get_tensor(name).float().item()
                       for name in tensors.keys() if ".mlp.experts." in name and name.endswith(".input_scale")}
    assert len(scales) == LAYERS * QWEN_EXPERTS * 3 and all(0 < scale < 1 for scale in scales.values())
    for layer, scale in filled.items():
        prefix, projection = layer.rsplit(".experts.", 1)[0], layer.rsplit(".", 1)[1]
        same = [value for name, value in scales.items() if name.startswith(prefix + ".experts.") and name.endswith(projection)]
        assert scales[layer] == scale == max(same), layer
    warning, = quantize_warnings(summary)
    assert f"{uncalibrated['count']} MoE expert layers received no calibration token" in warning
    assert "maximum across its experts" in warning
    assert "received no calibration token" in (run_dir / "logs" / "quantize.log").read_text()

    # Streaming (a decoder layer of 16 experts at a time) routes the same tokens, fills the same experts: equal.
    from quantize_pipeline.verify.export_equality import differences

    data["quantization"]["mode"] = "streaming"
    (streaming := tmp_path / "streaming.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    completed = _run("run", str(streaming), "--until", "verify", "--output-dir", str(tmp_path / "streamed"), cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    streamed = next((tmp_path / "streamed").glob("*/*/manifest.json")).parent
    streamed_summary = json.loads((streamed / "quantize" / "quantize.json").read_text())
    assert streamed_summary["mode"] == "streaming"
    assert streamed_summary["experts_without_calibration_tokens"] == uncalibrated
    assert differences(run_dir / "model", streamed / "model") == []


def test_patterns_naming_experts_are_refused_when_they_match_nothing(models, tmp_path):
    """A typo'd expert pattern: refused by validate in one line, naming the field."""
    typo = _ci_copy("mixtral-int4-fp8.yaml", models["mixtral-tiny"], tmp_path, layers={"re:.*\\.expertz\\..*": "int4_fp8"})
    completed = _run("validate", str(typo), cwd=tmp_path)
    assert completed.returncode == 2 and "quantization.layers: pattern 're:.*\\\\.expertz\\\\..*' matches no layer" \
        in completed.stderr, completed.stderr


def test_streaming_the_mixtral_one_layer_of_experts_at_a_time_equals_the_in_memory_export(mixtral_run, tmp_path):
    """The shipped int4_fp8 recipe (INT4 experts, FP8 attention, static activation scales) in streaming mode:
    each decoder layer's experts unfused on their own, calibrated on the tokens the router sends them, named
    as the checkpoint; equal tensor by tensor to the in-memory run's export (the dense equality test's
    tolerances) and verified."""
    from quantize_pipeline.verify.export_equality import differences

    _, in_memory_run, recipe = mixtral_run
    streaming = tmp_path / "streaming.yaml"
    data = yaml.safe_load(recipe.read_text())
    data["quantization"]["mode"] = "streaming"
    streaming.write_text(yaml.safe_dump(data, sort_keys=False))
    completed = _run("run", str(streaming), "--until", "verify", "--output-dir", str(tmp_path / "exports"), cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    run_dir = next((tmp_path / "exports").glob("*/*/manifest.json")).parent
    quantize = json.loads((run_dir / "quantize" / "quantize.json").read_text())
    assert quantize["mode"] == "streaming" and quantize["decoder_layers"] == LAYERS and quantize["calibrated_activations"]
    assert differences(in_memory_run / "model", run_dir / "model") == []
    assert json.loads((run_dir / "verify" / "verify.json").read_text())["passed"]


def test_vllm_cpu_serves_bf16_experts_but_not_int8_ones_and_auto_falls_back(models, tmp_path):
    """Measured once by hand (docs/schemes.md, MoE section): vLLM's CPU build served the synthetic Mixtral with int8
    attention and BF16 experts, and refused INT8 experts at load on this AVX2-only CPU. plan says the same
    offline, so `engine: auto` takes the labelled fallback for the second."""
    from quantize_pipeline.recipe.plan import make_plan

    def plan_of(exclude: list[str]):
        recipe = Recipe.model_validate({
            "name": "int8-moe", "model": {"source": str(models["mixtral-tiny"])},
            "quantization": {"scheme": "int8_per_channel", "exclude": exclude}})
        return make_plan(recipe, models["mixtral-tiny"] / "config.json", device="cpu")

    experts_kept = plan_of(["lm_head", "re:.*\\.experts\\..*"])
    assert experts_kept.engines["vllm-cpu"].supported
    assert experts_kept.moe["expert_schemes"] == {"kept in model dtype": LAYERS * MIXTRAL_EXPERTS * 3}
    experts_int8 = plan_of(["lm_head"])
    assert not experts_int8.engines["vllm-cpu"].supported and "no Int8 MoE backend" in experts_int8.engines["vllm-cpu"].reason
    assert experts_int8.engines["vllm-cuda"].supported and experts_int8.engines["transformers"].supported


@pytest.mark.parametrize("scheme, expert_dtype", [("fp8", "F8_E4M3"), ("int8_per_channel", "I8")])
def test_fp8_and_int8_experts_are_served_by_the_labelled_fallback_and_gated(mixtral_run, models, tmp_path, scheme,
                                                                             expert_dtype):
    """Every layer in one scheme, experts included, through every stage. vLLM's CPU build refuses both MoE
    layouts (static FP8 MoE has no CPU method; INT8 experts need AMX: measured by hand, docs/schemes.md), so `engine: auto`
    takes the labelled transformers fallback; the base model's figures come from the int4_fp8 run's cache.
    Found by this test: `run` asked only the recipe's patterns about experts, so INT8 experts given by the global
    scheme went to vLLM and failed at load; it now asks the model's layers, as `plan` does."""
    recipe = _ci_copy("mixtral-int4-fp8.yaml", models["mixtral-tiny"], tmp_path, scheme=scheme, layers={})
    completed = _run("run", str(recipe), "--output-dir", str(tmp_path / "exports"), "--json", cwd=tmp_path)
    run_dir = next((tmp_path / "exports").glob("*/*/manifest.json")).parent
    report = json.loads((run_dir / "gate" / "report.json").read_text())
    assert completed.returncode == {"pass": 0, "fail": 3, "inconclusive": 4}[report["verdict"]], completed.stderr[-2000:]
    assert report["engine"]["name"] == "transformers" and f"FALLBACK: vllm-cpu cannot serve {scheme}" in \
        report["engine"]["label"]
    # int8: the dense layers' kernel exists, the experts' does not; the run must ask about the experts too.
    assert scheme == "fp8" or "no Int8 MoE backend" in report["engine"]["label"]
    assert report["quantize_warnings"] == []  # 8 x 128 tokens reach every expert (top-2 of 8)
    exported = read_folder(run_dir / "model")
    for layer in range(LAYERS):
        for expert in range(MIXTRAL_EXPERTS):
            for projection in ("w1", "w2", "w3"):
                name = f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{projection}"
                assert exported[f"{name}.weight"]["dtype"] == expert_dtype, name
                # Static FP8 keeps one activation scale per expert; int8 per channel quantizes tokens on the fly.
                assert (f"{name}.input_scale" in exported) == (scheme == "fp8"), name
        assert exported[f"model.layers.{layer}.block_sparse_moe.gate.weight"]["dtype"] == "BF16"
    verify = json.loads((run_dir / "verify" / "verify.json").read_text())
    assert verify["passed"] and verify["quantized_layers_checked"] == LAYERS * (MIXTRAL_EXPERTS * 3 + 4)
    # Evaluated, not only loaded: scored questions and perplexity for the quantized model.
    assert report["evaluation"]["tasks"]["arc_easy"] and report["evaluation"]["perplexity"]
