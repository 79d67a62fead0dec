"""`quantize-pipeline sensitivity` and `auto-exclude`: which layers hurt most under a scheme, and the
fewest of them to keep in the model's dtype so that the gate passes, within a size budget.

sensitivity: calibrate, then one child ranks each linear layer by its relative output error under the
scheme and measures the keep curve (quantize_pipeline/commands/sensitivity.py): how close to the base the
fake-quantized model comes with the top K layers kept, and the fewest K that meets the gate's KL
and top-1 thresholds there (`keep_estimate`).

auto-exclude: the recipe with the K most sensitive layers (with the shards vLLM fuses with them) added
to `quantization.exclude`, each K a whole run (the same runner, resumable, a folder per K): K = 0
(the scheme as is), then the keep curve's estimate (or 1), doubling until one passes the gate, then
halving the gap to the last K that did not, while trials remain. The size budget is the gate's own
`max_export_size_ratio` (the option sets it in every trial), so "passes" includes it. The chosen
recipe, with its exclude list spelled out, is written next to the report so the user can run it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from quantize_pipeline.commands.sensitivity import METHOD, SENSITIVITY_FILE, next_keep_count, read
from quantize_pipeline.commands.variant import Say, derived_recipe_data, run_variant
from quantize_pipeline.errors import InputError
from quantize_pipeline.quantize import calibrate
from quantize_pipeline.recipe import layers
from quantize_pipeline.recipe.schema import Recipe, load_recipe
from quantize_pipeline.run import runner
from quantize_pipeline.run.rundir import atomic_write_json, atomic_write_text, read_json, staged_folder
from quantize_pipeline.run.worker import call_isolated

DEFAULT_MAX_TRIALS = 6

AUTO_EXCLUDE_JSON = "auto-exclude.json"


def sensitivity(recipe_path: Path, output_root: Path, say: Say) -> tuple[Path, dict]:
    """(folder, ranking) of RECIPE's scheme on its calibration tokens; reused while the recipe's
    model, calibration and quantization sections are unchanged."""

    recipe = load_recipe(recipe_path)
    folder = output_root.resolve() / f"{recipe.name}-sensitivity"
    key = sensitivity_key(recipe)
    if (folder / SENSITIVITY_FILE).is_file() and (folder / "key.json").is_file() and read_json(folder / "key.json") == key:
        say(f"sensitivity: reused {folder / SENSITIVITY_FILE}")
        return folder, read(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base_model_dir = runner.resolve_base_model(recipe, folder / "logs" / "prepare.log", say)
    with staged_folder(folder / "calibrate") as calibrate_dir:
        calibrate.calibrate(recipe, base_model_dir, calibrate_dir)
    say(f"sensitivity: quantizing {recipe.model.source} with {recipe.scheme.name} and measuring each layer")
    with staged_folder(folder / "measure") as measure_dir:
        result, _ = call_isolated("quantize_pipeline.commands.sensitivity:measure",
                                  {"recipe": recipe.model_dump(mode="json"), "model_dir": str(base_model_dir),
                                   "calibrate_dir": str(folder / "calibrate"), "out_dir": str(measure_dir)},
                                  log_path=folder / "logs" / "sensitivity.log", stage="sensitivity")
    atomic_write_json(folder / SENSITIVITY_FILE, result)
    atomic_write_json(folder / "key.json", key)
    return folder, result


def sensitivity_key(recipe: Recipe) -> dict:
    """What a sensitivity measurement depends on: reused while this is unchanged."""
    key = {section: recipe.model_dump(mode="json")[section] for section in ("model", "calibration", "quantization")}
    return key | {"method": METHOD, "thresholds": [recipe.gates.max_mean_kl, recipe.gates.min_top1_agreement]}


def trial_recipe_data(recipe: Recipe, kept: list[str], max_size_ratio: float | None, label: str) -> dict:
    data = derived_recipe_data(recipe, label)
    data["quantization"]["exclude"] = list(data["quantization"]["exclude"]) + kept
    if max_size_ratio is not None:
        data["gates"]["max_export_size_ratio"] = max_size_ratio
    return data


def auto_exclude(recipe_path: Path, output_root: Path, say: Say, *, max_size_ratio: float | None = None,
                 max_trials: int = DEFAULT_MAX_TRIALS, as_is: dict | None = None) -> dict:
    """as_is: the row of a finished run of RECIPE itself (a sweep's variant): trial K = 0 when its gate is
    the trials' (no size budget of the option's own), not run again."""
    recipe = load_recipe(recipe_path)
    if max_trials < 1:
        raise InputError(f"--max-trials: {max_trials}: at least one trial")
    budget = max_size_ratio if max_size_ratio is not None else recipe.gates.max_export_size_ratio
    _, measured = sensitivity(recipe_path, output_root, say)
    units = layers.keep_units([row["layer"] for row in measured["ranking"]])

    def kept(k: int) -> list[str]:
        return [name for unit in units[:k] for name in unit]

    folder = output_root.resolve() / f"{recipe.name}-auto-exclude"
    trials: dict[int, dict] = {}
    if as_is is not None and budget == recipe.gates.max_export_size_ratio:
        trials[0] = {**as_is, "kept_layers": []}
        say(f"trial 1: keep no layer: {as_is['status']} (the run of {as_is['variant']}, reused)")
    while len(trials) < max_trials:
        k = next_keep_count({k: row["status"] == "pass" for k, row in trials.items()}, len(units),
                            measured.get("keep_estimate"))
        if k is None:
            break
        label = f"keep{k}"
        path = folder / "trials" / label / "recipe.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(trial_recipe_data(recipe, kept(k), budget, label), sort_keys=False)
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)
        say(f"trial {len(trials) + 1}: keep the {k} most sensitive layer{'s' if k != 1 else ''} in {recipe.model.dtype}"
            + (f" ({len(kept(k))} with the shards vLLM fuses with them)" if len(kept(k)) != k else ""))
        row = run_variant(label, str(path), lambda line: say(f"  {line}"))
        row["kept_layers"] = kept(k)
        trials[k] = row
        say(f"  {row['status']}" + (f": {row['reason']}" if row.get("reason") else "")
            + (f" (size ratio {row['size_ratio']})" if row.get("size_ratio") is not None else ""))
        if row["status"] not in ("pass", "fail", "inconclusive"):
            break  # a crash or refusal: more layers kept would not change it
    passing = sorted(k for k, row in trials.items() if row["status"] == "pass")
    chosen = passing[0] if passing else None
    result = {
        "recipe": recipe.name, "scheme": recipe.scheme.name, "max_size_ratio": budget,
        "ranking": measured["ranking"], "keep_estimate": measured.get("keep_estimate"),
        "keep_curve": measured.get("keep_curve"), "trials": [trials[k] for k in sorted(trials)],
        "fewest_layers_kept": chosen,
        "kept_layers": kept(chosen) if chosen is not None else None,
        "proved_fewest": chosen is not None and (chosen == 0 or (chosen - 1) in trials),
    }
    if chosen is not None:
        base_size = trials[chosen].get("export_size_bytes")
        unkept = trials.get(0, {}).get("export_size_bytes")
        result["size_cost_bytes"] = base_size - unkept if base_size is not None and unkept is not None else None
        data = trial_recipe_data(recipe, kept(chosen), budget, "auto-exclude")
        data["name"] = f"{recipe.name}-auto-exclude"[:100]
        data["publish"] = recipe.model_dump(mode="json")["publish"]
        data["report_to"] = list(recipe.report_to)
        recipe_out = folder / f"{recipe.name}-auto-exclude.yaml"
        atomic_write_text(recipe_out, f"# auto-exclude of {recipe_path}: the {chosen} most sensitive layers kept in "
                                      f"{recipe.model.dtype} (see {AUTO_EXCLUDE_JSON})\n"
                                      + yaml.safe_dump(data, sort_keys=False))
        result["recipe_file"] = str(recipe_out)
    atomic_write_json(folder / AUTO_EXCLUDE_JSON, result)
    result["folder"] = str(folder)
    return result
