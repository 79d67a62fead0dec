"""The quantize stage's child process: quantize -> freeze -> export, in the mode the recipe and the machine allow
(data-free shard by shard, streaming layer by layer, or the whole model in memory)."""

from __future__ import annotations

import time
from pathlib import Path

from quantize_pipeline.quantize import export, freeze, moe
from quantize_pipeline.quantize.calibrate import load_token_batches
from quantize_pipeline.quantize.data_free import data_free_quantize
from quantize_pipeline.quantize.quantize import peak_rss_mb, quantize
from quantize_pipeline.quantize.streaming import stream_quantize
from quantize_pipeline.recipe.devices import max_memory
from quantize_pipeline.recipe.plan import quantize_mode
from quantize_pipeline.recipe.schema import Recipe
from quantize_pipeline.run.stage_record import StageRecord, records_to_json


def device_placement(recipe: Recipe, device: str) -> dict:
    """from_pretrained arguments that place the in-memory model: nothing on the CPU; on GPUs an accelerate
    device map over every GPU torch sees, within the recipe's per-device limits and offload folder."""
    if device == "cpu":
        return {}
    import torch

    resources = recipe.resources
    placement: dict = {"device_map": "auto"}
    if (limits := max_memory(resources, torch.cuda.device_count())) is not None:
        placement["max_memory"] = limits
    if resources.offload_folder is not None:
        placement["offload_folder"] = resources.offload_folder
    return placement


def quantize_freeze_export(recipe: dict, model_dir: str, calibrate_dir: str, out_dirs: dict[str, str],
                           state_dir: str | None = None, device: str = "cpu") -> dict:
    """Child-process job: quantize -> freeze -> export. Returns one record per stage.

    state_dir: where a streaming run keeps finished layers for a layer-level resume.
    device: torch device type ("cpu", "cuda"): streaming onloads each layer there; in memory, the model
    is spread over the GPUs with an accelerate device map, as Quark's own `quantize_quark.py --multi_gpu` does."""
    import torch
    from transformers import AutoModelForCausalLM

    parsed = Recipe.model_validate(recipe)
    mode, reason = quantize_mode(parsed, Path(model_dir) / "config.json", device)
    print(f"quantization mode: {mode} on {device} ({reason})", flush=True)
    folders = {key: Path(value) for key, value in out_dirs.items()}
    state = Path(state_dir) if state_dir else None
    if mode == "data_free":
        return data_free_quantize(parsed, Path(model_dir), folders, device=device, mode_reason=reason, state_dir=state)
    token_batches = load_token_batches(Path(calibrate_dir))
    if mode == "streaming":
        return stream_quantize(parsed, Path(model_dir), token_batches, folders, device=device, mode_reason=reason,
                               state_dir=state)
    records: dict[str, StageRecord] = {}
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, parsed.model.dtype), trust_remote_code=parsed.model.trust_remote_code,
        **device_placement(parsed, device),
    )
    model.eval()
    unfused = moe.unfuse_experts(model)  # fused MoE experts -> one linear each, so that Quark quantizes them
    model, quantizer, summary = quantize(parsed, model, token_batches, Path(out_dirs["quantize"]),
                                         extra={"mode": mode, "mode_reason": reason, "unfused_expert_modules": unfused})
    records["quantize"] = StageRecord(summary=summary, wall_s=time.perf_counter() - started, peak_rss_mb=peak_rss_mb())

    started = time.perf_counter()
    model, summary = freeze.freeze(quantizer, model, Path(out_dirs["freeze"]))
    records["freeze"] = StageRecord(summary=summary, wall_s=time.perf_counter() - started, peak_rss_mb=peak_rss_mb())

    started = time.perf_counter()
    summary = export.export(parsed, model, Path(model_dir), Path(out_dirs["model"]))
    records["export"] = StageRecord(summary=summary, wall_s=time.perf_counter() - started, peak_rss_mb=peak_rss_mb())
    return records_to_json(records)
