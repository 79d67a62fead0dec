"""verify and check on real compressed-tensors checkpoints of the tiny model, made by
compressed-tensors itself (tests/ct_checkpoints.py), and on mislabelled copies of them.

The verify tests read safetensors headers (and, for sub-8-bit claims, the int8 values) — no
vLLM; they are `slow` only because the session fixture loads the model once to build the
checkpoints (cached under QP_CACHE_DIR afterwards). The end-to-end test serves one in vLLM."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quantize_pipeline import formats
from quantize_pipeline.errors import VerifyFailed
from quantize_pipeline.recipe import checks
from quantize_pipeline.recipe.schema import Recipe
from quantize_pipeline.recipe.schemes import recipe_value
from quantize_pipeline.verify import verify
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _recipe_from_config(checkpoint: Path) -> Recipe:
    """The recipe `check` infers from a checkpoint's quantization_config (same fields as runner.check)."""
    claimed = formats.claim(json.loads((checkpoint / "config.json").read_text())["quantization_config"])
    return Recipe.model_validate({
        "name": "formats-test", "model": {"source": "builtin:smollm2-135m-instruct"},
        "quantization": {"scheme": recipe_value(claimed.scheme), "kv_cache": claimed.kv_cache, "exclude": list(claimed.exclude)},
    })


def _verify(checkpoint: Path, base: Path, out: Path) -> dict:
    out.mkdir(exist_ok=True)
    return verify.verify(_recipe_from_config(checkpoint), base, checkpoint, checks.weight_layer_names(base), out)


def _relabelled(checkpoint: Path, folder: Path, edit) -> Path:
    """A copy of a checkpoint (tensors hard-linked, config rewritten by `edit`)."""
    folder.mkdir()
    for path in checkpoint.iterdir():
        if path.name != "config.json":
            os.link(path, folder / path.name) if path.suffix == ".safetensors" else shutil.copy2(path, folder / path.name)
    config = json.loads((checkpoint / "config.json").read_text())
    edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(("name", "scheme", "size_below"), [("W8A8", "int8_per_channel", 0.65), ("W4A16", "int4_wo_64", 0.45)])
def test_real_compressed_tensors_checkpoints_verify(ct_checkpoints, tiny_model_dir, tmp_path, name, scheme, size_below):
    summary = _verify(ct_checkpoints[name], tiny_model_dir, tmp_path)
    assert summary["passed"] and summary["format"] == "compressed-tensors"
    assert summary["scheme"] == scheme
    assert summary["quantized_layers_checked"] == 30 * 7  # every decoder linear layer; lm_head is tied and ignored
    assert summary["size_ratio"] < size_below


def test_an_int4_config_over_int8_tensors_fails(ct_checkpoints, tiny_model_dir, tmp_path):
    def int4(config):
        config["config_groups"]["group_0"]["weights"]["num_bits"] = 4

    mislabelled = _relabelled(ct_checkpoints["W8A8"], tmp_path / "int4-label", int4)
    with pytest.raises(VerifyFailed, match=r"stored values span -12[78]\.\.127, outside the claimed -8\.\.7"):
        _verify(mislabelled, tiny_model_dir, tmp_path / "out")
    recorded = json.loads((tmp_path / "out" / "verify.json").read_text())
    assert recorded["passed"] is False and len(recorded["problems"]) == 30 * 7


def test_a_packed_checkpoint_relabelled_fails_on_its_shapes(ct_checkpoints, tiny_model_dir, tmp_path):
    def groups_of_128(config):
        config["config_groups"]["group_0"]["weights"]["group_size"] = 128

    relabelled = _relabelled(ct_checkpoints["W4A16"], tmp_path / "g128", groups_of_128)
    with pytest.raises(VerifyFailed, match=r"scale shape \[\d+, 9\], expected \d+x4 group scales|scale shape \[\d+, 24\], expected \d+x12"):
        _verify(relabelled, tiny_model_dir, tmp_path / "out")


def test_an_ignore_list_naming_a_quantized_layer_fails(ct_checkpoints, tiny_model_dir, tmp_path):
    def ignore_down_proj(config):
        config["ignore"].append("re:.*layers\\.3\\.mlp\\.down_proj$")

    mislabelled = _relabelled(ct_checkpoints["W8A8"], tmp_path / "ignore", ignore_down_proj)
    with pytest.raises(VerifyFailed, match="model.layers.3.mlp.down_proj: excluded by the recipe but quantized$"):
        _verify(mislabelled, tiny_model_dir, tmp_path / "out")


def test_an_ignore_list_missing_a_dense_layer_fails(ct_checkpoints, tiny_model_dir, tmp_path):
    dense = ct_checkpoints["W8A8_dense_down0"]
    assert _verify(dense, tiny_model_dir, tmp_path / "honest")["quantized_layers_checked"] == 30 * 7 - 1

    def forget(config):
        config["ignore"] = ["lm_head"]

    mislabelled = _relabelled(dense, tmp_path / "forgot", forget)
    with pytest.raises(VerifyFailed, match="model.layers.0.mlp.down_proj: weight stored as BF16, expected I8 for int8_per_channel$"):
        _verify(mislabelled, tiny_model_dir, tmp_path / "out")


def _check(export: Path, *extra: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quantize_pipeline.cli", "check", str(export), "--base", "builtin:smollm2-135m-instruct", *extra],
        capture_output=True, text=True, cwd=REPO, timeout=timeout,
    )


def test_check_infers_the_scheme_and_fails_a_mislabelled_checkpoint(ct_checkpoints, tmp_path):
    """No --recipe: the scheme and ignore list come from the compressed-tensors config; verify
    fails a checkpoint whose ignore list names a quantized layer before anything is served (exit 3)."""
    def ignore_down_proj(config):
        config["ignore"].append("re:.*layers\\.3\\.mlp\\.down_proj$")

    mislabelled = _relabelled(ct_checkpoints["W8A8"], tmp_path / "ignore", ignore_down_proj)
    done = _check(mislabelled, "--output-dir", str(tmp_path / "out"), timeout=600)
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    assert "export does not match scheme int8_per_channel: model.layers.3.mlp.down_proj: excluded by the recipe but quantized" in done.stderr
    assert not list((tmp_path / "out").glob("*/*/serve/generations.json"))


def test_check_verifies_before_it_refuses_the_claimed_scheme_s_engine(ct_checkpoints, tmp_path):
    """An INT8 export relabelled FP8 (per channel, dynamic per token: ptpc_fp8, which vLLM's CPU build does
    not serve on every CPU): verify runs first and names the tensor that gives it away (exit 3), instead of
    the engine's refusal of a scheme the checkpoint does not hold (exit 2)."""
    def fp8(config):
        group = config["config_groups"]["group_0"]
        group["weights"]["type"] = group["input_activations"]["type"] = "float"

    mislabelled = _relabelled(ct_checkpoints["W8A8"], tmp_path / "fp8-label", fp8)
    done = _check(mislabelled, "--output-dir", str(tmp_path / "out"), timeout=600)
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    assert "export does not match scheme ptpc_fp8" in done.stderr
    assert re.search(r"model\.layers\.\d+\.\w+\.\w+_proj: weight stored as I8, expected F8_E4M3", done.stderr), done.stderr[-2000:]
    manifest = json.loads(next((tmp_path / "out").glob("*/*/manifest.json")).read_text())
    assert manifest["status"] == "failed" and manifest["error"]["stage"] == "verify" and manifest["error"]["exit_code"] == 3
    assert "serve" not in manifest["stages"]


CHEAP_CHECK_RECIPE = """\
name: ct-w8a8-check
model: {source: builtin:smollm2-135m-instruct}
quantization: {scheme: int8_per_channel, exclude: [lm_head]}
evaluation:
  engine: vllm
  tasks: [arc_easy]
  limit: 20
  max_limit: 20
  perplexity_text: wikipedia-heldout
  perplexity_limit: 20
  divergence_text: wikipedia-heldout
  divergence_limit: 16
  enforce_eager: true
  prompts: ["The capital of France is"]
  max_new_tokens: 8
gates:  # lenient: 20 questions give a noisy figure; the test is about serving the format, not the thresholds
  garbage_max_completion_perplexity: null  # no base engine start to score new completions
  min_recovery: 0.5
  max_perplexity_ratio: 1.5
  max_mean_kl: 0.2
  min_top1_agreement: 0.5
"""


def test_check_passes_a_real_compressed_tensors_w8a8_in_vllm(ct_checkpoints, tmp_path):
    """vLLM's CPU build serves the compressed-tensors W8A8 (CompressedTensorsW8A8Int8) and lenient gates
    pass it; evaluation kept small (--recipe with small limits) for CI time."""
    recipe = tmp_path / "check.yaml"
    recipe.write_text(CHEAP_CHECK_RECIPE)
    done = _check(ct_checkpoints["W8A8"], "--recipe", str(recipe), "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = next((tmp_path / "out").glob("*/*"))
    verified = json.loads((run_dir / "verify" / "verify.json").read_text())
    assert verified["format"] == "compressed-tensors" and verified["passed"]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["verdict"] == "pass"
