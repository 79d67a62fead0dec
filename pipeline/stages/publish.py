"""publish: only after a passing gate, copy model/ + a model card to publish.target.

The target appears whole or not at all (staged beside it, then renamed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.recipe import Recipe
from pipeline.report import render_markdown
from pipeline.rundir import hash_tree, staged_folder

# The Hub id that a shipped builtin model was made from, for the card's base_model.
BUILTIN_BASE_MODEL_IDS = {"builtin:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def base_model_id(recipe: Recipe) -> str:
    return BUILTIN_BASE_MODEL_IDS.get(recipe.model.source, Path(recipe.model.source).name)


def model_card(recipe: Recipe, report: dict) -> str:
    from huggingface_hub import ModelCardData

    scheme = recipe.scheme
    metadata = ModelCardData(
        base_model=base_model_id(recipe),
        base_model_relation="quantized",
        library_name="vllm",
        tags=["quark", scheme.weight_dtype.split("_")[0], recipe.quantization.scheme, "vllm"],
    )
    kv_cache = f', kv_cache_dtype="{recipe.quantization.kv_cache}"' if recipe.quantization.kv_cache else ""
    body = [
        f"# {recipe.name}",
        "",
        f"{base_model_id(recipe)} quantized with AMD Quark: **{scheme.name}** — {scheme.description}.",
        f"Excluded from quantization: {', '.join(recipe.quantization.exclude) or 'nothing'}.",
        "",
        "## Serve with vLLM",
        "",
        "```python",
        "from vllm import LLM",
        f'llm = LLM(model="path/to/this/folder", quantization="quark"{kv_cache})',
        "```",
        "",
        render_markdown(report).replace("# ", "## Quality report: ", 1),
    ]
    return f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(body)


def publish(recipe: Recipe, model_dir: Path, report: dict, out_dir: Path) -> dict:
    target = Path(recipe.publish.target)
    with staged_folder(target) as staging:
        shutil.copytree(model_dir, staging, dirs_exist_ok=True)
        (staging / "README.md").write_text(model_card(recipe, report), encoding="utf-8")
        (staging / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        files = hash_tree(staging)
    summary = {"target": str(target.resolve()), "files": files}
    (out_dir / "publish.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
