"""The data-free path (`quantization.mode: data_free`, what `auto` picks when no calibration is needed): its
exports are byte-identical to in-memory Quark exports, on the real tiny model for every family of data-free
schemes in one mixed recipe, and tensor for tensor on multi-shard synthetic checkpoints (Llama, Mixtral's
per-expert layout); `kill -9` mid-run resumes after the last finished input shard.

Slow: the tiny model and two synthetic ones quantized in memory and data-free (~2 min here).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from quantize_pipeline.recipe.schema import Recipe
from quantize_pipeline.run.rundir import hash_tree
from quantize_pipeline.run.worker import call_isolated
from tests.conftest import write_synthetic_models

pytestmark = pytest.mark.slow

UINT4_ASYMMETRIC = {"weight": {"dtype": "uint4", "granularity": "per_group", "group_size": 64, "symmetric": False},
                    "activation": None}
# Every data-free family on the tiny model's 30 layers: int8 and fp8 with per-token activations, int4/uint4 per
# group (symmetric and with zero points), OCP MX FP4 weight-only and with dynamic block activations, MX FP6.
MIXED_LAYERS = {
    r"re:model\.layers\.[0-3]\..*": "ptpc_fp8",
    r"re:model\.layers\.[4-7]\..*": "int4_wo_64",
    r"re:model\.layers\.(8|9|10|11)\..*": "mxfp4_weight_only",
    r"re:model\.layers\.1[2-5]\..*": "mxfp4",
    r"re:model\.layers\.1[6-9]\..*": UINT4_ASYMMETRIC,
    r"re:model\.layers\.2[0-3]\..*": "mxfp6_e2m3",
}  # layers 24-29: the scheme, int8_per_channel


def _recipe(source: str, mode: str, dtype: str = "auto", **quantization) -> Recipe:
    return Recipe.model_validate({
        "name": "data-free", "model": {"source": source, "dtype": dtype},
        "calibration": {"samples": 4, "max_seq_len": 64},
        "quantization": {"scheme": "int8_per_channel", "exclude": ["lm_head"], "mode": mode, **quantization},
    })


def _quantize(recipe: Recipe, model_dir: Path, root: Path, state_dir: Path | None = None) -> tuple[dict, dict[str, Path]]:
    """quantize -> freeze -> export in a child, as `run` does: (the stage records, the stage folders)."""
    from quantize_pipeline.quantize.calibrate import calibrate

    folders = {name: root / name for name in ("calibrate", "quantize", "freeze", "model")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    calibrate(recipe, model_dir, folders["calibrate"])
    records, _ = call_isolated(
        "quantize_pipeline.quantize.stage:quantize_freeze_export",
        {"recipe": recipe.model_dump(mode="json"), "model_dir": str(model_dir), "calibrate_dir": str(folders["calibrate"]),
         "out_dirs": {name: str(folders[name]) for name in ("quantize", "freeze", "model")},
         "state_dir": str(state_dir) if state_dir else None},
        log_path=root / "quantize.log", stage="quantize")
    return records, folders


def _tensor_bytes(folder: Path) -> dict[str, tuple[str, list[int], str]]:
    """name -> (dtype, shape, sha256 of its bytes) over every shard of an export, whatever the file layout."""
    import hashlib

    from safetensors import safe_open

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name).contiguous()
                raw = tensor.view(-1).view(__import__("torch").uint8) if tensor.numel() else tensor
                tensors[name] = (str(tensor.dtype), list(tensor.shape), hashlib.sha256(raw.numpy().tobytes()).hexdigest())
    return tensors


def test_every_data_free_scheme_family_exports_byte_identical_to_in_memory(tiny_model_dir, tmp_path):
    """One mixed recipe, quantized by Quark in memory and by the data-free path: the same files, byte for byte
    (safetensors, config.json with Quark's quantization_config, tokenizer), and the data-free export verifies."""
    from quantize_pipeline.quantize.quantize import layer_overrides
    from quantize_pipeline.verify import verify

    source = str(tiny_model_dir)
    in_memory, _ = _quantize(_recipe(source, "in_memory", layers=MIXED_LAYERS), tiny_model_dir, tmp_path / "in-memory")
    recipe = _recipe(source, "auto", layers=MIXED_LAYERS)
    records, folders = _quantize(recipe, tiny_model_dir, tmp_path / "data-free")
    summary = records["quantize"]["summary"]
    assert summary["mode"] == "data_free" and "no calibration needed" in summary["mode_reason"]
    assert summary["calibration_batches"] == 0 and summary["input_shards"] == 1
    # One frozen weight quantizer per quantized layer; in memory, the dynamic activation quantizers too.
    assert records["freeze"]["summary"]["frozen_quantizers"] == 30 * 7 <= in_memory["freeze"]["summary"]["frozen_quantizers"]
    in_memory_files = hash_tree(tmp_path / "in-memory" / "model", skip=("recipe.yaml",))
    assert hash_tree(folders["model"], skip=("recipe.yaml",)) == in_memory_files and "model.safetensors" in in_memory_files
    out = tmp_path / "verify"
    out.mkdir()
    linear = summary["linear_layer_names"]
    result = verify.verify(recipe, tiny_model_dir, folders["model"], linear, out,
                           layer_overrides(recipe, linear, summary["excluded_layers"]))
    assert result["passed"] and result["quantized_layers_checked"] == 30 * 7


@pytest.fixture(scope="module")
def sharded_models(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """The 135M Llama shape in ~40 MiB shards (7), the tiny Mixtral (experts one tensor each) in ~8 MiB ones."""
    root = tmp_path_factory.mktemp("sharded")
    models = write_synthetic_models(root, ("135m",), tiny_model_dir, shard_bytes_max=40 * 2**20)
    models |= write_synthetic_models(root, ("mixtral-tiny",), tiny_model_dir, shard_bytes_max=8 * 2**20)
    return models


@pytest.mark.parametrize("shape", ["135m", "mixtral-tiny"])
def test_a_sharded_checkpoint_quantizes_shard_by_shard_to_the_in_memory_tensors(sharded_models, tmp_path, shape):
    """Input shards in, output files out (one per input shard here), each tensor's bytes those of the in-memory
    export (one file), and the index naming every tensor's file. (Memory at this size is the libraries' own:
    bench/scale_vs_peers.py measures it where the weights dominate.)"""
    model_dir = sharded_models[shape]
    shards = len(set(json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert shards >= 4
    source = str(model_dir)
    # The 135M shape has the tiny model's 30 layers: every family again, here in bf16 (scales in the model dtype).
    layers = MIXED_LAYERS if shape == "135m" else {}
    _, expected = _quantize(_recipe(source, "in_memory", "bfloat16", layers=layers), model_dir, tmp_path / "in-memory")
    records, folders = _quantize(_recipe(source, "data_free", "bfloat16", layers=layers), model_dir, tmp_path / "data-free")
    assert records["quantize"]["summary"]["input_shards"] == shards
    assert len(records["export"]["summary"]["shards"]) == shards
    assert _tensor_bytes(folders["model"]) == _tensor_bytes(expected["model"])
    index = json.loads((folders["model"] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_tensor_bytes(folders["model"]))
    config = json.loads((folders["model"] / "config.json").read_text())
    assert config["quantization_config"] == json.loads((expected["model"] / "config.json").read_text())["quantization_config"]
    if shape == "mixtral-tiny":  # the checkpoint's per-expert names, as in memory
        assert index["weight_map"]["model.layers.0.block_sparse_moe.experts.7.w2.weight_scale"]


def test_kill_9_mid_shards_resumes_after_the_last_finished_shard(sharded_models, tmp_path):
    """`run` killed like a crash after two of the 135M shape's seven input shards: run again, the finished
    shards are kept (their sha256 verify), the rest quantized, and the export equals an uninterrupted one."""
    from quantize_pipeline.run.runner import STREAM_STATE_FOLDER
    from tests.process_tree import CliRun

    model_dir = sharded_models["135m"]
    recipe = _recipe(str(model_dir), "auto", "bfloat16")
    path = tmp_path / "data-free.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    exports = tmp_path / "exports"
    run_args = ("run", str(path), "--until", "verify", "--output-dir", str(exports))
    first = CliRun(*run_args, cwd=tmp_path, logs=tmp_path / "cli-1")
    first.wait_for(lambda: any(exports.glob("*/*/logs/quantize.log")), "the quantize stage", 600)
    run_dir = next(exports.glob("*/*/manifest.json")).parent
    log = run_dir / "logs" / "quantize.log"
    first.wait_for(lambda: "shard model-00002.safetensors quantized and written" in log.read_text(), "two shards", 600)
    first.kill_like_a_crash()
    state = json.loads((run_dir / STREAM_STATE_FOLDER / "data-free.json").read_text())
    assert 2 <= len(state["shards"]) < 7, "the first run was not killed mid-shards"

    second = CliRun(*run_args, cwd=tmp_path, logs=tmp_path / "cli-2")
    assert second.wait(900) == 0, second.stdout[-3000:] + second.stderr[-3000:]
    resumed = re.search(r"resuming: (\d+)/7 input shards finished and verified", log.read_text())
    assert resumed and int(resumed.group(1)) >= 2
    summary = json.loads((run_dir / "quantize" / "quantize.json").read_text())
    assert summary["mode"] == "data_free" and summary["resumed_input_shards"] == int(resumed.group(1))
    assert json.loads((run_dir / "verify" / "verify.json").read_text())["passed"]
    assert not (run_dir / STREAM_STATE_FOLDER).exists()  # removed once the export is committed
    _, reference = _quantize(recipe, model_dir, tmp_path / "reference")
    assert hash_tree(run_dir / "model", skip=("recipe.yaml",)) == hash_tree(reference["model"], skip=("recipe.yaml",))
