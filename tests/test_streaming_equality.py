"""Streaming equals in-memory on the real tiny model, tensor by tensor, and a streaming run passes verify.

Slow: each case quantizes the model twice with Quark (whole, then one decoder layer at a time).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantize_pipeline.quantize.calibrate import TOKENS_FILE, calibrate
from quantize_pipeline.recipe.schema import Recipe
from quantize_pipeline.verify.export_equality import differences, read_tensors

pytestmark = pytest.mark.slow

def _recipe(scheme: str, mode: str, kv_cache: str | None = None) -> Recipe:
    return Recipe.model_validate({
        "name": "equality", "model": {"source": "builtin:smollm2-135m-instruct"},
        "calibration": {"samples": 8, "max_seq_len": 128},
        "quantization": {"scheme": scheme, "mode": mode, "kv_cache": kv_cache},
    })


def _out_dirs(root: Path) -> dict[str, Path]:
    dirs = {stage: root / stage for stage in ("quantize", "freeze", "model")}
    for folder in dirs.values():
        folder.mkdir(parents=True)
    return dirs


# fp8 with the fp8 KV cache: the flagship's scheme (static activation and k/v output scales).
@pytest.mark.parametrize(("scheme", "kv_cache"), [("int8_per_channel", None), ("fp8", "fp8"), ("int4_wo_64", None)])
def test_streaming_export_equals_in_memory(tmp_path, scheme, kv_cache):
    from quantize_pipeline.quantize.stage import quantize_freeze_export
    from quantize_pipeline.quantize.streaming import stream_quantize
    from quantize_pipeline.recipe.models import converted_model_dir

    model_dir = converted_model_dir(_recipe(scheme, "in_memory", kv_cache).model)
    calibrate_dir = tmp_path / "calibrate"
    calibrate_dir.mkdir()
    calibrate(_recipe(scheme, "in_memory", kv_cache), model_dir, calibrate_dir)
    in_memory = _out_dirs(tmp_path / "in_memory")
    records = quantize_freeze_export(_recipe(scheme, "in_memory", kv_cache).model_dump(mode="json"), str(model_dir),
                                     str(calibrate_dir), {stage: str(path) for stage, path in in_memory.items()})
    assert records["quantize"]["summary"]["mode"] == "in_memory"
    batches = [json.loads(line) for line in (calibrate_dir / TOKENS_FILE).read_text().splitlines()]
    streamed = _out_dirs(tmp_path / "streaming")
    records = stream_quantize(_recipe(scheme, "streaming", kv_cache), model_dir, batches, streamed)
    assert records["quantize"]["summary"]["mode"] == "streaming"
    assert records["quantize"]["summary"]["calibrated_activations"] == (scheme == "fp8")

    actual = read_tensors(streamed["model"])
    if scheme == "fp8":
        assert any(name.endswith(".input_scale") for name in actual)  # static activation scales were calibrated
    if kv_cache:
        assert any(name.endswith("k_proj.output_scale") for name in actual)  # the KV-cache scales too
    # Names, dtypes, shapes, values within quantize_pipeline/verify/export_equality.py's tolerances, quantization_config, files.
    assert differences(in_memory["model"], streamed["model"]) == []


def test_kill_9_mid_layers_resumes_after_the_last_finished_layer_byte_identical(tmp_path):
    """A streaming quantize killed (SIGKILL to the whole tree) after some layers: `run` again keeps the
    finished layers whose hashes verify, restarts after them, and writes the uninterrupted export byte for byte.
    The resumed run goes on to the end: CI's one streaming `run` through verify, vLLM CPU serving and the gate."""
    import re

    from quantize_pipeline.run.rundir import hash_tree
    from quantize_pipeline.run.runner import STREAM_STATE_FOLDER
    from tests.process_tree import CliRun
    from tests.test_failure_drills import _drill_recipe, _stage_done, _uninterrupted_export, kill_first_run_in_quantize

    recipe = _drill_recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace("quantization:\n", "quantization:\n  mode: streaming\n", 1))
    exports = tmp_path / "exports"
    run_args = ("run", str(recipe), "--output-dir", str(exports))

    run_dir = kill_first_run_in_quantize(run_args, exports, tmp_path, "layer 8/30 quantized", "eight layers", 900)
    assert not _stage_done(run_dir, "quantize")
    assert (run_dir / STREAM_STATE_FOLDER / "layer-00007.json").is_file()  # kept across the kill

    second = CliRun(*run_args, cwd=tmp_path, logs=tmp_path / "cli-2")
    assert second.wait(1800) in (0, 3, 4), second.stdout[-3000:] + second.stderr[-3000:]
    assert _stage_done(run_dir, "gate")
    resumed = re.search(r"resuming after layer (\d+)/30", (run_dir / "logs" / "quantize.log").read_text())
    assert resumed and int(resumed.group(1)) >= 8, "the second run did not resume from the finished layers"
    summary = json.loads((run_dir / "quantize" / "quantize.json").read_text())
    assert summary["resumed_after_layer"] == int(resumed.group(1))
    assert summary["mode"] == "streaming" and summary["mode_reason"] == "as the recipe asks"
    assert "quantization mode: streaming" in (run_dir / "logs" / "quantize.log").read_text()
    verify = json.loads((run_dir / "verify" / "verify.json").read_text())
    assert verify["passed"] and verify["quantized_layers_checked"] == 30 * 7
    assert json.loads((run_dir / "serve" / "generations.json").read_text())["generated_tokens"] > 0
    assert not (run_dir / STREAM_STATE_FOLDER).exists()  # removed once the export is complete
    assert hash_tree(run_dir / "model") == _uninterrupted_export(recipe, run_dir, tmp_path / "reference")


def test_static_fp8_resume_from_saved_boundary_hidden_states_is_byte_identical(tmp_path, monkeypatch):
    """fp8 (static activation scales): a run that dies after layer 6 resumes from the saved boundary hidden
    states, and its export equals an uninterrupted streaming run's byte for byte."""
    from quantize_pipeline.quantize.stream_state import LayerState
    from quantize_pipeline.quantize.streaming import stream_quantize
    from quantize_pipeline.recipe.models import converted_model_dir
    from quantize_pipeline.run.rundir import hash_tree

    recipe = _recipe("fp8", "streaming")
    model_dir = converted_model_dir(recipe.model)
    calibrate_dir = tmp_path / "calibrate"
    calibrate_dir.mkdir()
    calibrate(recipe, model_dir, calibrate_dir)
    batches = [json.loads(line) for line in (calibrate_dir / TOKENS_FILE).read_text().splitlines()]
    state_dir = tmp_path / "quantize-layers"

    class Crash(Exception):
        pass

    save = LayerState.save

    def save_then_die(self, index, *args, **kwargs):
        save(self, index, *args, **kwargs)
        if index == 5:
            raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(LayerState, "save", save_then_die)
        with pytest.raises(Crash):
            stream_quantize(recipe, model_dir, batches, _out_dirs(tmp_path / "first"), state_dir=state_dir)
    assert (state_dir / "layer-00005.hidden.safetensors").is_file()
    records = stream_quantize(recipe, model_dir, batches, _out_dirs(tmp_path / "resumed"), state_dir=state_dir)
    assert records["quantize"]["summary"]["resumed_after_layer"] == 6
    # Kept after the last layer: the runner removes it once the export is committed (tests/test_streaming_equality
    # kill test checks that), so a kill before that commit resumes here rather than at layer 0.
    assert (state_dir / "layer-00029.json").is_file() and (state_dir / "layer-00029.safetensors").is_file()
    stream_quantize(recipe, model_dir, batches, _out_dirs(tmp_path / "reference"))
    assert hash_tree(tmp_path / "resumed" / "model") == hash_tree(tmp_path / "reference" / "model")
