"""Resume: which stages of an earlier run can be kept, and what each stage's outputs depend on.

A stage is kept when it finished, the recipe sections its outputs depend on are unchanged
(`stage_config_sha256`), and its outputs still match the sha256 its manifest recorded.
Stages that one child makes together are kept or redone together.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from quantize_pipeline.recipe.schema import Recipe
from quantize_pipeline.run.rundir import HashCache

STAGES = ("calibrate", "quantize", "freeze", "export", "verify", "serve", "evaluate", "gate", "publish")
# Folder each stage writes in the run directory (the export is the model itself).
STAGE_FOLDERS = {stage: stage for stage in STAGES} | {"export": "model"}
# Recipe sections each stage's outputs depend on (cumulative): a change there reruns the
# stage on --resume; a change elsewhere (a gate threshold) leaves it as it is.
STAGE_INPUTS = {
    "calibrate": ("model", "calibration"),
    **{stage: ("model", "calibration", "quantization") for stage in ("quantize", "freeze", "export", "verify")},
    "serve": ("model", "calibration", "quantization", "evaluation"),
    "evaluate": ("model", "calibration", "quantization", "evaluation", "baselines"),
    "gate": ("model", "calibration", "quantization", "evaluation", "baselines", "gates"),
    "publish": ("model", "calibration", "quantization", "evaluation", "baselines", "gates", "publish"),
}
QUARK_STAGES = ("quantize", "freeze", "export")
# The export's engine is loaded once for both: one child makes both stages' outputs.
ENGINE_STAGES = ("serve", "evaluate")
# `run --until STAGE`: where a run may stop cleanly; a stage a child makes with others stops after the last of them.
UNTIL_STAGES = ("calibrate", "export", "verify", "evaluate")  # not gate: its verdict is the exit code


def stage_config_sha256(recipe: Recipe, stage: str, engine_name: str) -> str:
    data = recipe.model_dump(mode="json")
    inputs = {section: data[section] for section in STAGE_INPUTS[stage]}
    if "evaluation" in STAGE_INPUTS[stage]:
        inputs["engine"] = engine_name
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def reusable_stages(previous: dict, recipe: Recipe, engine_name: str, run_dir: Path, from_stage: str | None) -> dict:
    """Stage -> record of the leading stages of an earlier run that can be kept: done, same
    recipe inputs, outputs still matching their sha256. Everything after the first miss reruns."""
    hashes = HashCache(run_dir)
    keep: dict[str, dict] = {}
    for stage in STAGES:
        record = previous.get("stages", {}).get(stage)
        if stage == from_stage or record is None or record.get("status") != "done":
            break
        if record.get("config_sha256") != stage_config_sha256(recipe, stage, engine_name):
            break
        if not all(hashes.matches(name, digest) for name, digest in record.get("outputs", {}).items()):
            break
        keep[stage] = record
    for group in (QUARK_STAGES, ENGINE_STAGES):  # one child makes each group's stages: all or none
        if not all(stage in keep for stage in group):
            keep = {stage: record for stage, record in keep.items() if STAGES.index(stage) < STAGES.index(group[0])}
    hashes.save()
    return keep


def unmatched_outputs(previous: dict, run_dir: Path) -> list[str]:
    """The files of the earlier run's finished stages that are missing or differ from their manifest sha256
    (a stopped run copied to another machine must arrive whole)."""
    hashes = HashCache(run_dir)
    unmatched = [name for record in previous.get("stages", {}).values() if record.get("status") == "done"
                 for name, digest in record.get("outputs", {}).items() if not hashes.matches(name, digest)]
    hashes.save()
    return unmatched
