"""`quantize-pipeline sweep`: one recipe, every scheme with every algorithm, each variant a whole run.

Each variant is the recipe with its scheme and algorithm replaced (and no publish target), run by the
same runner as `run` in a folder of its own (SWEEP_DIR/variants/<variant>/), so it resumes as any run
does. Variants share what runs of one base model share already: the converted base model, the base's
cached figures (accuracy, perplexity, divergence reference, the per-question store) and the
calibration tokens (same calibration section: byte-identical tokens, 0.2 s to make; each row records
their sha256). Only the first variant evaluates the base.

A finished variant (a verdict on record) is reused on a re-run. A variant that crashes or that no
engine here can serve is a row with its reason, and the sweep goes on. Unknown names are refused
before anything runs (exit 2).

Executors: `local` (one variant after another) and `ray` (each variant a Ray task asking for the
accelerators its recipe needs: Ray schedules them over a cluster). sweep_report renders the table,
the Pareto front and the plot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from quantize_pipeline.commands import auto_exclude as excluding
from quantize_pipeline.commands import sweep_report
from quantize_pipeline.commands.variant import CRASHED, Say, derived_recipe_data, run_variant
from quantize_pipeline.errors import InputError, RecipeError
from quantize_pipeline.recipe.schema import (
    RTN,
    Recipe,
    check_sweep_algorithm,
    check_sweep_scheme,
    field_path,
    load_recipe,
)
from quantize_pipeline.run.rundir import atomic_write_text

EXECUTORS = ("local", "ray")
VARIANTS_FOLDER = "variants"
# Most sensitive layers per scheme shown in a sweep's report (sensitivity.json has them all).
SENSITIVITY_SHOWN = 5

@dataclass(frozen=True)
class Variant:
    scheme: str
    algorithm: str  # RTN: no algorithm

    @property
    def name(self) -> str:
        return f"{self.scheme}-{self.algorithm}"


@dataclass(frozen=True)
class SweepPlan:
    recipe: Recipe
    recipe_path: Path
    variants: tuple[Variant, ...]
    executor: str
    sweep_dir: Path


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [name.strip() for name in text.split(",") if name.strip()]


def plan_sweep(recipe_path: Path, output_root: Path, *, schemes: str | None = None, algorithms: str | None = None,
               executor: str | None = None, settings: tuple[str, ...] = ()) -> SweepPlan:
    """The variants to run: --schemes/--algorithms/--executor over the recipe's `sweep:` section (with the
    `--set` settings applied: every variant's recipe carries them). Every name and every variant recipe is
    checked here, before anything runs (one-line errors, exit 2)."""
    recipe = load_recipe(recipe_path, settings)
    section = recipe.sweep
    chosen: dict[str, list[str]] = {}
    for option, given, from_recipe in (("--schemes", _names(schemes), section and list(section.schemes)),
                                       ("--algorithms", _names(algorithms), section and list(section.algorithms))):
        names = given if given is not None else from_recipe
        if option == "--algorithms" and names is None:
            names = [RTN]
        if not names:
            raise InputError(f"{recipe_path}: sweep.schemes: no schemes to sweep (give --schemes a,b or a `sweep:` "
                             "section)")
        check = check_sweep_scheme if option == "--schemes" else check_sweep_algorithm
        for name in names:
            try:
                check(name)
            except ValueError as exc:
                where = option if given is not None else f"sweep.{option[2:]}"
                raise RecipeError(str(recipe_path), where, str(exc)) from None
        chosen[option] = list(dict.fromkeys(names))
    executor = executor or (section.executor if section else "local")
    if executor not in EXECUTORS:
        raise InputError(f"--executor: unknown executor '{executor}' (known: {', '.join(EXECUTORS)})")
    variants = tuple(Variant(scheme, algorithm) for scheme in chosen["--schemes"] for algorithm in chosen["--algorithms"])
    # Absolute: Ray's workers do not start in this directory.
    plan = SweepPlan(recipe, recipe_path, variants, executor, output_root.resolve() / f"{recipe.name}-sweep")
    for variant in variants:  # an impossible combination is bad input too: refused before the first run
        try:
            Recipe.model_validate(variant_recipe_data(recipe, variant))
        except ValidationError as exc:
            error = exc.errors()[0]
            raise RecipeError(str(recipe_path), f"sweep variant {variant.name}",
                              f"{field_path(error['loc'])}: {error['msg'].removeprefix('Value error, ')}") from None
    return plan


def variant_recipe_data(recipe: Recipe, variant: Variant) -> dict:
    """The recipe of one variant: scheme and algorithm replaced, nothing published (a sweep compares;
    the user publishes the variant they choose with `publish RUN_DIR`), no sweep section."""
    data = derived_recipe_data(recipe, variant.name)
    data["quantization"]["scheme"] = variant.scheme
    data["quantization"]["algorithm"] = None if variant.algorithm == RTN else variant.algorithm
    return data


def write_variant_recipes(plan: SweepPlan) -> dict[str, Path]:
    paths = {}
    for variant in plan.variants:
        folder = plan.sweep_dir / VARIANTS_FOLDER / variant.name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "recipe.yaml"
        text = yaml.safe_dump(variant_recipe_data(plan.recipe, variant), sort_keys=False)
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)
        paths[variant.name] = path
    return paths


# ---- executors ---------------------------------------------------------------------------------

def run_local(jobs: list[tuple[str, str]], say: Say) -> list[dict]:
    rows = []
    for index, (name, path) in enumerate(jobs, 1):
        say(f"[{index}/{len(jobs)}] {name}")
        rows.append(run_variant(name, path, lambda line: say(f"  {line}")))
        say(f"  {_status_line(rows[-1])}")
    return rows


def ray_resources(recipe: Recipe, cluster: dict[str, float], node_cpus: float) -> dict[str, float]:
    """What one variant asks Ray for: the accelerators its engine settings use (tensor x pipeline x data
    parallel) and one CPU; on a cluster without accelerators, every CPU of a node (vLLM's CPU build and
    Quark compute on all the cores they see: two variants on one node would time each other)."""
    evaluation = recipe.evaluation
    gpus = evaluation.tensor_parallel_size * evaluation.pipeline_parallel_size * evaluation.data_parallel_size
    wants_gpu = recipe.resources.device in ("cuda", "rocm") or (recipe.resources.device == "auto"
                                                                and cluster.get("GPU", 0) > 0)
    return {"num_gpus": gpus, "num_cpus": 1} if wants_gpu else {"num_gpus": 0, "num_cpus": node_cpus}


def run_ray(jobs: list[tuple[str, str]], say: Say) -> list[dict]:
    """Each variant a Ray task (Ray is the scheduler: nothing home-made). RAY_ADDRESS names a cluster;
    without it ray.init() starts a local instance on this machine."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    try:
        cluster = ray.cluster_resources()
        node_cpus = max((node["Resources"].get("CPU", 1.0) for node in ray.nodes() if node.get("Alive")), default=1.0)
        task = ray.remote(run_variant)
        futures = []
        for name, path in jobs:
            resources = ray_resources(load_recipe(path), cluster, node_cpus)
            say(f"submitted {name} to Ray ({resources['num_gpus']} GPU, {resources['num_cpus']:g} CPU)")
            futures.append(task.options(**resources, max_retries=0).remote(name, path))
        rows = []
        for (name, _), future in zip(jobs, futures):
            try:
                rows.append(ray.get(future))
            except Exception as exc:  # the task's process died (OOM kill, node lost): a row, not the end
                rows.append({"variant": name, "status": CRASHED, "reason": f"Ray task failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}", "run_dir": None, "reused": False})
            say(f"  {name}: {_status_line(rows[-1])}")
        return rows
    finally:
        if started_here:
            ray.shutdown()


def _status_line(row: dict) -> str:
    text = row["status"] + (" (reused)" if row.get("reused") else "")
    return text + (f": {row['reason']}" if row.get("reason") else "")


def sweep(plan: SweepPlan, say: Say, *, sensitivity: bool = False, auto_exclude: bool = False,
          max_size_ratio: float | None = None) -> dict:
    """Run (or reuse) every variant with the plan's executor; write sweep.json, sweep.md and sweep.png.
    sensitivity: rank each scheme's layers too (its most sensitive layers in the report);
    auto_exclude: for each scheme whose round-to-nearest variant failed the gate, the fewest layers to keep
    (quantize_pipeline/commands/auto_exclude.py; its trials run locally, one after another)."""

    paths = write_variant_recipes(plan)
    jobs = [(variant.name, str(paths[variant.name])) for variant in plan.variants]
    rows = run_ray(jobs, say) if plan.executor == "ray" else run_local(jobs, say)
    for variant, row in zip(plan.variants, rows):
        row.setdefault("scheme", variant.scheme)
        row.setdefault("algorithm", variant.algorithm)
    extras: dict[str, Any] = {}
    schemes = list(dict.fromkeys(variant.scheme for variant in plan.variants))
    rtn_paths = {scheme: plan.sweep_dir / VARIANTS_FOLDER / Variant(scheme, RTN).name / "recipe.yaml" for scheme in schemes}
    if sensitivity or auto_exclude:
        for scheme in schemes:
            path = rtn_paths[scheme]
            if not path.is_file():
                write_variant_recipes(SweepPlan(plan.recipe, plan.recipe_path, (Variant(scheme, RTN),), plan.executor,
                                                plan.sweep_dir))
    if sensitivity:
        extras["sensitivity"] = {}
        for scheme in schemes:
            _, measured = excluding.sensitivity(rtn_paths[scheme], plan.sweep_dir / "sensitivity", say)
            extras["sensitivity"][scheme] = measured["ranking"][:SENSITIVITY_SHOWN]
    if auto_exclude:
        extras["auto_exclude"] = {}
        for row in rows:
            if row.get("algorithm") != RTN or row.get("status") != "fail":
                continue
            say(f"auto-exclude for {row['variant']} (failed the gate)")
            found = excluding.auto_exclude(rtn_paths[row["scheme"]], plan.sweep_dir / "auto-exclude", say,
                                           max_size_ratio=max_size_ratio, as_is=row)
            extras["auto_exclude"][row["scheme"]] = {key: found.get(key) for key in (
                "fewest_layers_kept", "kept_layers", "proved_fewest", "size_cost_bytes", "recipe_file", "folder",
                "keep_estimate")} | {
                "trials": [{key: trial.get(key) for key in ("variant", "status", "reason", "size_ratio", "mean_kl",
                                                           "top1_agreement", "perplexity_ratio")}
                           for trial in found["trials"]]}
    return sweep_report.write(plan.sweep_dir, plan.recipe, str(plan.recipe_path), plan.executor, rows, extras)


def summary_lines(result: dict[str, Any]) -> list[str]:
    best = result["smallest_passing"]
    return [f"sweep: {len(result['rows'])} variants, Pareto front: {', '.join(result['pareto_front']) or 'none'}",
            f"smallest variant that passes every gate: {best or 'none'}",
            f"sweep directory: {result['sweep_dir']}"]
