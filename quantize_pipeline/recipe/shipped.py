"""What ships inside the package (quantize_pipeline/shipped/, package data): the example recipes, and starter recipes
written from a model id and a scheme (`quantize-pipeline recipes`, `quantize-pipeline init`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from quantize_pipeline.errors import InputError, RecipeError
from quantize_pipeline.recipe.schema import Recipe, field_path, load_recipe
from quantize_pipeline.run.rundir import atomic_write_text

SHIPPED_RECIPES_DIR = Path(__file__).resolve().parents[1] / "shipped" / "recipes"


@dataclass(frozen=True)
class ShippedRecipe:
    name: str  # the file's stem: what `init --from` and the listing call it
    path: Path
    recipe: Recipe


def shipped_recipes() -> list[ShippedRecipe]:
    return [ShippedRecipe(path.stem, path, load_recipe(path)) for path in sorted(SHIPPED_RECIPES_DIR.glob("*.yaml"))]


def shipped_recipe_path(name: str) -> Path:
    path = SHIPPED_RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(recipe.name for recipe in shipped_recipes())
        raise InputError(f"{name}: no such shipped recipe (shipped: {known})")
    return path


def starter_name(model_source: str, scheme: str) -> str:
    """A recipe name from the model id's last part and the scheme: meta-llama/Llama-3.1-8B -> llama-3.1-8b-fp8."""
    stem = re.sub(r"[^a-z0-9._-]+", "-", model_source.rstrip("/").split("/")[-1].split(":")[-1].lower()).strip("-._")
    return f"{stem or 'model'}-{scheme}"[:100]


def starter_text(model_source: str, scheme: str) -> str:
    """Every field of a recipe for MODEL_SOURCE and SCHEME, at the defaults, validated: a file to edit."""
    try:
        recipe = Recipe.model_validate({
            "name": starter_name(model_source, scheme), "model": {"source": model_source},
            "quantization": {"scheme": scheme, "exclude": ["lm_head"]},
        })
    except ValidationError as exc:  # an unknown scheme, a malformed model id: one line naming the field
        error = exc.errors()[0]
        raise RecipeError("init", field_path(error["loc"]), error["msg"]) from None
    header = (f"# Starter recipe for {model_source} ({scheme}), every field at its default: edit and check it with\n"
              f"# `quantize-pipeline validate FILE` and `quantize-pipeline plan FILE`.\n")
    return header + yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def write_starter(model_source: str, scheme: str, destination: Path, *, force: bool = False) -> Recipe:
    """Write the starter recipe to DESTINATION (whole or not at all) and return it as read back."""
    return _write_recipe(starter_text(model_source, scheme), destination, force)


def copy_shipped(name: str, destination: Path, *, force: bool = False) -> Recipe:
    """Copy the shipped recipe NAME to DESTINATION and return it as read back."""
    return _write_recipe(shipped_recipe_path(name).read_text(), destination, force)


def _write_recipe(text: str, destination: Path, force: bool) -> Recipe:
    if destination.exists() and not force:
        raise InputError(f"{destination}: exists (--force overwrites it)")
    atomic_write_text(destination, text)
    try:
        return load_recipe(destination)
    except RecipeError:  # a recipe that does not read back is not left behind
        destination.unlink()
        raise
