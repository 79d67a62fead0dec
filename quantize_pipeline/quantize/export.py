"""export: Quark's `export_safetensors` + tokenizer + the resolved recipe -> model/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from quantize_pipeline.quantize import fp8_row_blocks, moe
from quantize_pipeline.recipe.schema import Recipe

# Tokenizer and generation files copied from the base model when the exporter leaves them out.
AUXILIARY_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json",
)


def export(recipe: Recipe, model, base_model_dir: Path, out_dir: Path) -> dict:
    from quark.torch import export_safetensors

    with fp8_row_blocks.row_blocks():  # Quark's real quantization of the weights: the same bytes, faster
        export_safetensors(model, str(out_dir), custom_mode="quark")
    renamed = moe.rename_export(out_dir, model.config.model_type)  # the checkpoint's names (quantize_pipeline/quantize/moe.py)
    return finish_export(recipe, base_model_dir, out_dir) | ({"renamed_to_checkpoint_names": renamed} if renamed else {})


def finish_export(recipe: Recipe, base_model_dir: Path, out_dir: Path) -> dict:
    """Tokenizer/generation files and the resolved recipe beside the weights; the export summary."""
    for name in AUXILIARY_FILES:
        if (base_model_dir / name).is_file() and not (out_dir / name).exists():
            shutil.copy2(base_model_dir / name, out_dir / name)
    # Provenance beside the weights, as llm-compressor does with recipe.yaml.
    (out_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    config = json.loads((out_dir / "config.json").read_text())
    files = sorted(path.name for path in out_dir.iterdir())
    return {
        "files": files,
        "quant_method": config.get("quantization_config", {}).get("quant_method"),
        "size_bytes": sum(path.stat().st_size for path in out_dir.glob("*.safetensors")),
    }
