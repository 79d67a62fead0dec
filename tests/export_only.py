"""calibrate -> quantize -> freeze -> export -> verify on the real tiny model, in a child as `run` does,
without serving or evaluating: for slow tests whose question is the export, not the gate."""

from __future__ import annotations

from pathlib import Path

from quantize_pipeline.quantize import calibrate
from quantize_pipeline.recipe.schema import Recipe
from quantize_pipeline.run.runner import resolve_base_model
from quantize_pipeline.run.worker import call_isolated
from quantize_pipeline.verify import verify


def quantize_and_verify(recipe: Recipe, tmp_path: Path) -> tuple[dict, dict, dict[str, Path]]:
    """(the quantize child's stage records, verify's result, the stage folders)."""
    model_dir = resolve_base_model(recipe, tmp_path / "logs" / "prepare.log", print)
    folders = {name: tmp_path / name for name in ("calibrate", "quantize", "freeze", "model", "verify")}
    for folder in folders.values():
        folder.mkdir()
    calibrate.calibrate(recipe, model_dir, folders["calibrate"])
    records, _ = call_isolated(
        "quantize_pipeline.quantize.stage:quantize_freeze_export",
        {"recipe": recipe.model_dump(mode="json"), "model_dir": str(model_dir), "calibrate_dir": str(folders["calibrate"]),
         "out_dirs": {name: str(folders[name]) for name in ("quantize", "freeze", "model")}},
        log_path=tmp_path / "logs" / "quantize.log", stage="quantize",
    )
    summary = records["quantize"]["summary"]
    result = verify.verify(recipe, model_dir, folders["model"], summary["linear_layer_names"], folders["verify"])
    return records, result, folders
