"""Command line: a thin layer over the Python API (runner, recipe).

Importing this module must stay cheap: no torch, Quark or vLLM at start-up.
Errors users can act on are one line; set QP_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from quantize_pipeline.commands import sweep as sweeping
from quantize_pipeline.commands.auto_exclude import auto_exclude
from quantize_pipeline.commands.auto_exclude import sensitivity as measure
from quantize_pipeline.engines import compat
from quantize_pipeline.errors import InputError, PipelineError, RecipeError
from quantize_pipeline.publish import publish as publish_stage
from quantize_pipeline.recipe import checks, models
from quantize_pipeline.recipe import plan as planning
from quantize_pipeline.recipe import schema as recipe_schema
from quantize_pipeline.recipe.schema import PublishSpec, load_recipe
from quantize_pipeline.recipe.schemes import SCHEMES, get_scheme
from quantize_pipeline.recipe.shipped import copy_shipped, shipped_recipes, write_starter
from quantize_pipeline.run import runner
from quantize_pipeline.run.events import no_events
from quantize_pipeline.run.progress_bars import ProgressBars
from quantize_pipeline.run.rundir import atomic_write_text
from quantize_pipeline.run.runner import resolve_base_model
from quantize_pipeline.verdict.junit import write_junit
from quantize_pipeline.verdict.mlflow_report import log_run
from quantize_pipeline.verdict.plot import write_accuracy_plot
from quantize_pipeline.verdict.record import Report, load_report
from quantize_pipeline.verdict.report import ACCURACY_PLOT, render_comparison, render_markdown


def _fail(exc: PipelineError) -> None:
    """The one line, the run folder when there is one, and the error's exit code (QP_DEBUG: the traceback)."""
    if os.environ.get("QP_DEBUG"):
        raise exc
    click.echo(f"error: {exc.one_line()}", err=True)
    run_dir = getattr(exc, "run_dir", None)
    if run_dir is not None:
        click.echo(f"run directory: {run_dir}", err=True)
    sys.exit(exc.exit_code)


MLFLOW_OPTION = click.option(
    "--mlflow", "to_mlflow", is_flag=True,
    help="Also log the gated run to MLflow (as `report_to: [mlflow]` in the recipe does).",
)
SET_OPTION = click.option(
    "--set", "settings", multiple=True, metavar="FIELD=VALUE",
    help="Set a recipe field without editing the file (repeatable): a dotted path, the value read as YAML, "
         "e.g. --set evaluation.limit=20 --set publish.target=hf://org/name. Validated like the file; a run's "
         "recipe.yaml and hash carry it.",
)
JUNIT_OPTION = click.option(
    "--junit-xml", "junit_path", type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the gate as JUnit XML: one test case per rule (failure: figure vs threshold; "
         "inconclusive: skipped, with the reason).",
)


class _Commands(click.Group):
    """The CLI's one error boundary: any command's PipelineError becomes `_fail`'s one line and exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            _fail(exc)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="quantize-pipeline")
def main() -> None:
    """Quantize a Hugging Face causal LM with AMD Quark from a YAML recipe, verify the
    export, serve it in vLLM, evaluate it with lm-eval against the base model, gate it,
    and publish it only if every gate passes.

    \b
    Exit codes: 0 pass, 1 crash, 2 bad input, 3 failed verify or gate (nothing published).
    """


@main.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(path_type=Path))
@SET_OPTION
def validate(recipes: tuple[Path, ...], settings: tuple[str, ...]) -> None:
    """Check RECIPES (schema and files) without loading any model; exit 2 on the first bad one."""
    for path in recipes:
        recipe = load_recipe(path, settings)
        model_dir = checks.local_model_dir(recipe)
        for field_path, problem in checks.model_problems(recipe, model_dir) if model_dir else ():
            raise RecipeError(str(path), field_path, problem)
        checked = "checked against the local model" if model_dir else "model not local: model checks at run time"
        click.echo(f"{path}: ok ({recipe.name}: {recipe.scheme.name}; {checked})")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path), required=False)
@click.option(
    "--output-dir", type=click.Path(path_type=Path), default=Path("exports"), show_default=True,
    help="Root of run directories: OUTPUT_DIR/<recipe name>/<run id>/.",
)
@click.option("--refresh-baseline", is_flag=True, help="Re-evaluate the base model instead of using its cached figures.")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Finish this earlier run of RECIPE (without RECIPE: the run folder's own recipe.yaml): keep "
                   "stages whose recipe inputs are unchanged and whose outputs match the manifest; rerun the rest.")
@click.option("--until", type=click.Choice(["calibrate", "export", "verify", "evaluate"]),  # resume.UNTIL_STAGES
              help="Stop cleanly after this stage (exit 0): the run folder is complete up to there and "
                   "`run --resume RUN_DIR` finishes it, here or on another machine (copy the folder).")
@click.option("--from-stage", type=click.Choice(["calibrate", "quantize", "freeze", "export", "verify", "serve",
                                                 "evaluate", "gate", "publish"]),
              help="With --resume: rerun from this stage on, whatever is kept before it.")
@click.option("--new-run", is_flag=True,
              help="Start a fresh run even when an unfinished run of the same recipe is there to resume.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the final verdict lines.")
@click.option("--json", "as_json", is_flag=True,
              help="Print events as JSON, one object per line (stage start/end/reuse, progress, a final result); "
                   "human text goes to stderr.")
@SET_OPTION
@JUNIT_OPTION
@MLFLOW_OPTION
def run(recipe: Path | None, output_dir: Path, refresh_baseline: bool, resume_dir: Path | None, until: str | None,
        from_stage: str | None, new_run: bool, quiet: bool, as_json: bool, settings: tuple[str, ...],
        junit_path: Path | None, to_mlflow: bool) -> None:
    """Run every stage of RECIPE: calibrate, quantize, freeze, export, verify, serve,
    evaluate, gate and (on a passing gate) publish.

    An unfinished run of the same recipe under OUTPUT_DIR/<name>/ (killed or crashed) is
    resumed instead of started over; --new-run starts over. Prints the gate verdict, the
    run directory and the published location.
    """

    def say(line: str) -> None:
        if not quiet:
            click.echo(line, err=as_json)

    bars = None
    if as_json:
        emit = _print_event
    elif quiet:
        emit = no_events
    else:
        bars = ProgressBars()
        emit = bars.handle
    try:
        if from_stage and not resume_dir:
            raise InputError("--from-stage needs --resume RUN_DIR")
        if new_run and resume_dir:
            raise InputError("--new-run and --resume exclude each other")
        if recipe is None and resume_dir is None:
            raise InputError("run: give RECIPE, or --resume RUN_DIR")
        if resume_dir is not None:
            result = runner.resume(resume_dir, recipe, say=say, from_stage=from_stage, refresh_baseline=refresh_baseline,
                                   emit=emit, settings=settings, until=until)
        else:
            result = runner.run(recipe, output_root=output_dir, say=say, refresh_baseline=refresh_baseline,
                                new_run=new_run, emit=emit, settings=settings, until=until)
    except PipelineError as exc:  # the report and event of a stopped run, then the boundary's one line
        if bars is not None:
            bars.close()
        _report_stopped(exc, junit_path, to_mlflow, as_json)
        raise
    if bars is not None:
        bars.close()
    if result.stopped_after is not None:
        if as_json:
            _print_event(_result_event(result.run_dir, 0, published=None, verdict=result.verdict,
                                       stopped_after=result.stopped_after))
            return
        click.echo(f"stopped after {result.stopped_after} (--until)")
        click.echo(f"run directory: {result.run_dir}")
        click.echo(f"finish it (here, or with the folder copied elsewhere): quantize-pipeline run --resume {result.run_dir}")
        return
    _report_elsewhere(result.run_dir, junit_path, to_mlflow)
    if as_json:
        _print_event(_result_event(result.run_dir, 0, published=result.published_to, verdict=result.verdict))
        return
    click.echo(f"gate: {result.verdict}")
    click.echo(f"run directory: {result.run_dir}")
    click.echo(f"published: {result.published_to or 'no publish target in the recipe'}")


def _report_elsewhere(run_dir: Path | None, junit_path: Path | None, to_mlflow: bool) -> None:
    """JUnit XML and MLflow, when the run reached its gate (nothing to report otherwise)."""
    if run_dir is None or not (run_dir / "report.json").is_file():
        return
    import yaml

    report = load_report(run_dir / "report.json")
    if junit_path is not None:
        write_junit(report, junit_path)
    recipe_data = yaml.safe_load((run_dir / "recipe.yaml").read_text()) if (run_dir / "recipe.yaml").is_file() else {}
    if to_mlflow or "mlflow" in (recipe_data or {}).get("report_to", ()):
        try:
            logged = log_run(run_dir, report, recipe_data or {})
        except PipelineError as exc:  # the gate's verdict and exit code stand; the missing report is said
            click.echo(f"error: mlflow: {exc.one_line()}", err=True)
            return
        click.echo(f"mlflow: run {logged['run_id']} in {logged['tracking_uri']}", err=True)


def _report_stopped(exc: PipelineError, junit_path: Path | None, to_mlflow: bool, as_json: bool) -> None:
    """What `run` and `check` still write when they stop on an error: JUnit/MLflow (when the gate was reached)
    and, with --json, the result event; the error's one line is the boundary's."""
    _report_elsewhere(exc.run_dir, junit_path, to_mlflow)
    if as_json:
        _print_event(_result_event(exc.run_dir, exc.exit_code, published=None, error=exc.one_line()))


def _print_event(event: dict) -> None:
    import json

    click.echo(json.dumps(event))


def _result_event(run_dir: Path | None, exit_code: int, *, published: str | None, verdict: str | None = None,
                  error: str | None = None, stopped_after: str | None = None) -> dict:
    """The last event of `run --json`: the verdict and, per rule, figure, interval, threshold, state and
    samples used (from report.json when the run reached its gate)."""
    report_path = run_dir / "report.json" if run_dir is not None else None
    report = load_report(report_path) if report_path is not None and report_path.is_file() else None
    if verdict is None:
        verdict = report.verdict if report else "not reached"
    rule_keys = ("rule", "state", "figure", "interval", "threshold", "samples", "unit", "more_samples_to_decide")
    rules = [{key: getattr(rule, key) for key in rule_keys} for rule in (report.rules if report else [])]
    return {"event": "result", "verdict": verdict, "run_dir": str(run_dir) if run_dir else None, "exit_code": exit_code,
            "published": published, "error": error, "rules": rules,
            "quantize_warnings": report.quantize_warnings if report else [],
            **({"stopped_after": stopped_after} if stopped_after else {})}


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--model-config", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="config.json to plan from (default: the recipe's local or cached model).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@SET_OPTION
def plan(recipe: Path, model_config: Path | None, as_json: bool, settings: tuple[str, ...]) -> None:
    """Show what RECIPE would do, from the model's config alone: stages, which layers get
    which scheme, export size and peak memory estimates, and the engine that can serve it."""

    parsed = load_recipe(recipe, settings)
    config_path = planning.find_model_config(parsed, model_config)
    if config_path is None:
        raise InputError(f"{recipe}: model.source: no local config.json for {parsed.model.source}; pass --model-config")
    result = planning.make_plan(parsed, config_path)
    if as_json:
        click.echo(planning.to_json(result))
        return
    gib = 2**30
    click.echo(f"recipe {parsed.name}: {parsed.scheme.name} on {parsed.model.source} ({config_path})")
    click.echo("stages: " + " -> ".join(result.stages))
    for scheme, count in sorted(result.counts.items()):
        click.echo(f"  {count:5d} layers: {scheme}")
    if result.moe is not None:
        moe = result.moe
        schemes_of_experts = ", ".join(f"{count} {scheme}" for scheme, count in sorted(moe["expert_schemes"].items()))
        click.echo(f"MoE: {moe['experts_per_layer']} experts a layer; expert layers: {schemes_of_experts}; "
                   f"routers: {moe['routers_kept']} of {moe['routers']} kept in the model dtype "
                   f"(quantization.keep_routers: {str(moe['keep_routers']).lower()})")
    click.echo(f"export size: {result.export_size_bytes / gib:.1f} GiB "
               f"({result.export_size_bytes / result.base_size_bytes:.2f} of {result.base_size_bytes / gib:.1f} GiB base)")
    click.echo(f"quantize on {result.device}, mode {result.mode} ({result.mode_reason})")
    for mode, peaks in result.quantize_peaks.items():
        on_device = f", accelerator {peaks['device'] / gib:.1f} GiB" if peaks["device"] else ""
        chosen = "  <- chosen" if mode == result.mode else ""
        click.echo(f"  {mode:9s} peak memory (estimate): host {peaks['host'] / gib:.1f} GiB{on_device}{chosen}")
    click.echo(f"quantize peak memory (estimate): {result.quantize_peak_bytes / gib:.1f} GiB host "
               f"(budget {result.host_budget_bytes / gib:.1f} GiB)")
    if result.quantize_peak_bytes > result.host_budget_bytes:
        click.echo(f"WARNING: even the {result.mode} estimate exceeds the host budget: fewer calibration samples "
                   "or shorter ones (calibration.samples, max_seq_len) shrink the hidden states kept between layers")
    for engine_name, entry in result.engines.items():
        mark = "yes" if entry.supported else "NO "
        here = "  <- installed" if engine_name == result.installed_engine else ""
        click.echo(f"  {engine_name:10s} {mark} ({entry.source}) {entry.reason}{here}")
    served = [name for name, entry in result.engines.items() if entry.supported]
    click.echo(f"served by: {', '.join(served) if served else 'no engine: this recipe cannot be served'}")


@main.command("publish")
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--dry-run", is_flag=True, help="List exactly what would be uploaded; upload nothing.")
@click.option("--target", help="Publish here instead of the recipe's publish.target (hf://ORG/NAME or a folder).")
def publish_command(run_dir: Path, dry_run: bool, target: str | None) -> None:
    """Publish a finished run whose gate passed (e.g. after a human review).

    Refuses (exit 3) a run whose gate did not pass or whose files no longer match
    its manifest; publishing the same content twice changes nothing. The publish
    stage is recorded in manifest.json, so a later resume of the run does not publish again.
    """
    import tempfile

    report = publish_stage.check_publishable(run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml")
    if target is not None:
        spec = (recipe.publish or PublishSpec(target=target)).model_copy(update={"target": target})
        recipe = recipe.model_copy(update={"publish": spec})
    if recipe.publish is None:
        raise RecipeError(str(run_dir / "recipe.yaml"), "publish", "no publish target: pass --target")
    if dry_run:
        with tempfile.TemporaryDirectory() as scratch:
            summary = publish_stage.publish(recipe, run_dir, report, Path(scratch), dry_run=True)
        for item in summary["listing"]:
            click.echo(f"{item['size']:>12}  {item['sha256'][:16]}  {item['path']}")
        click.echo(f"dry run: {len(summary['listing'])} files would go to {recipe.publish.target}")
        return
    summary = runner.publish_finished_run(run_dir, recipe, report)
    state = "already published, unchanged" if summary.get("already_published") else "published"
    click.echo(f"{state}: {summary['url']}" + (f" (commit {summary['commit']})" if summary.get("commit") else ""))


def _read_report(run_dir: Path) -> Report:
    path = run_dir / "report.json"
    if not path.is_file():
        raise InputError(f"{path}: not found: the run never reached its gate")
    return load_report(path)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
def report(run_dir: Path) -> None:
    """Re-render RUN_DIR/report.md and accuracy.png from report.json; print the Markdown."""
    report_data = _read_report(run_dir)
    text = render_markdown(report_data)
    atomic_write_text(run_dir / "report.md", text)
    write_accuracy_plot(report_data, run_dir / ACCURACY_PLOT)
    click.echo(text, nl=False)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
def compare(run_dirs: tuple[Path, ...]) -> None:
    """Put several runs side by side (Markdown table): verdict, every rule, size, speed."""
    click.echo(render_comparison([(f"{path.parent.name}/{path.name}", _read_report(path)) for path in run_dirs]), nl=False)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--schemes", "scheme_names", help="Comma-separated named schemes (default: the recipe's sweep.schemes).")
@click.option("--algorithms", "algorithm_names",
              help="Comma-separated: rtn (no algorithm) and Quark algorithms, e.g. rtn,gptq (default: the recipe's "
                   "sweep.algorithms, else rtn).")
@click.option("--executor", type=click.Choice(["local", "ray"]),
              help="local: one variant after another (default); ray: each variant a Ray task (RAY_ADDRESS, else a "
                   "local Ray instance).")
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("exports"), show_default=True,
              help="The sweep goes to OUTPUT_DIR/<recipe name>-sweep/ (variants/<variant>/ hold the runs).")
@click.option("--sensitivity", "with_sensitivity", is_flag=True,
              help="Also rank each scheme's layers by their output error under it (see `sensitivity`).")
@click.option("--auto-exclude", "with_auto_exclude", is_flag=True,
              help="For each scheme whose rtn variant fails the gate, find the fewest layers to keep (see `auto-exclude`).")
@click.option("--max-size-ratio", type=float, help="With --auto-exclude: the size budget (export / base size).")
@click.option("--json", "as_json", is_flag=True, help="Print sweep.json's content instead of the summary lines.")
@SET_OPTION
def sweep(recipe: Path, scheme_names: str | None, algorithm_names: str | None, executor: str | None,
          output_dir: Path, with_sensitivity: bool, with_auto_exclude: bool, max_size_ratio: float | None,
          as_json: bool, settings: tuple[str, ...]) -> None:
    """Run RECIPE once per scheme x algorithm (each variant its own resumable run, nothing published);
    write sweep.json, sweep.md and sweep.png (size vs recovery and KL, the Pareto front), and name the
    smallest variant that passes every gate. Exit 0 when one passes, 3 when none does."""

    plan = sweeping.plan_sweep(recipe, output_dir, schemes=scheme_names, algorithms=algorithm_names,
                               executor=executor, settings=settings)
    say = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    say(f"sweep: {len(plan.variants)} variants ({plan.executor} executor) -> {plan.sweep_dir}")
    result = sweeping.sweep(plan, say, sensitivity=with_sensitivity, auto_exclude=with_auto_exclude,
                            max_size_ratio=max_size_ratio)
    if as_json:
        import json

        click.echo(json.dumps(result, indent=2))
    else:
        for line in sweeping.summary_lines(result):
            click.echo(line)
    sys.exit(0 if result["smallest_passing"] else 3)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("exports"), show_default=True,
              help="Written to OUTPUT_DIR/<recipe name>-sensitivity/.")
@click.option("--top", default=10, show_default=True, help="How many of the ranked layers to print.")
def sensitivity(recipe: Path, output_dir: Path, top: int) -> None:
    """Rank RECIPE's linear layers by their relative output error under its scheme (one Quark quantization,
    one forward pass of the calibration tokens); write sensitivity.json."""

    folder, result = measure(recipe, output_dir, click.echo)
    for row in result["ranking"][:top]:
        click.echo(f"{row['relative_output_error']:.3e}  {row['layer']}")
    estimate = result.get("keep_estimate")
    if estimate is not None:
        point = next(point for point in result["keep_curve"] if point["keep"] == estimate)
        click.echo(f"keep estimate: the top {estimate} (with fused shards: {point['layers']} layers) for mean KL "
                   f"{point['mean_kl']:.3g}, top-1 {point['top1_agreement']:.3g} on the fake-quantized model")
    elif result.get("keep_curve"):
        click.echo("keep estimate: none (even with every layer kept the curve misses the gate's KL or top-1 threshold)")
    click.echo(f"sensitivity: {folder / 'sensitivity.json'}")


@main.command("auto-exclude")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("exports"), show_default=True,
              help="Written to OUTPUT_DIR/<recipe name>-auto-exclude/ (one run per trial under trials/).")
@click.option("--max-size-ratio", type=float,
              help="Size budget: export / base size, gated in every trial (default: the recipe's "
                   "gates.max_export_size_ratio).")
@click.option("--max-trials", default=6, show_default=True, help="Whole runs at most.")
def auto_exclude_command(recipe: Path, output_dir: Path, max_size_ratio: float | None, max_trials: int) -> None:
    """Find the fewest of RECIPE's most sensitive layers to keep in the model dtype so that its gate passes;
    write the resulting recipe (exclude list spelled out). Exit 0 when found, 3 when not."""

    result = auto_exclude(recipe, output_dir, click.echo, max_size_ratio=max_size_ratio, max_trials=max_trials)
    if result["fewest_layers_kept"] is None:
        click.echo(f"no trial passed the gate ({len(result['trials'])} trials); see {result['folder']}")
        sys.exit(3)
    click.echo(f"fewest layers kept: {result['fewest_layers_kept']}"
               + ("" if result["proved_fewest"] else " (one fewer was not tried: --max-trials)"))
    for name in result["kept_layers"]:
        click.echo(f"  {name}")
    cost = result.get("size_cost_bytes")
    if cost is not None:
        click.echo(f"size cost: {cost / 2**20:.1f} MiB over the scheme with no layer kept")
    click.echo(f"recipe: {result['recipe_file']}")


@main.command("recipes")
def recipes_command() -> None:
    """List the recipes shipped in the package (a copy of one is a starting point: `init --from NAME`)."""
    for shipped in shipped_recipes():
        recipe = shipped.recipe
        click.echo(f"{shipped.name}: {recipe.scheme.name} on {recipe.model.source} ({shipped.path})")


@main.command()
@click.argument("model", required=False)
@click.option("--scheme", help="The scheme (see `quantize-pipeline schemes`); with MODEL.")
@click.option("--from", "shipped_name", metavar="NAME", help="Copy the shipped recipe NAME (see `recipes`) instead.")
@click.option("--output", "-o", "destination", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Where to write the recipe.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def init(model: str | None, scheme: str | None, shipped_name: str | None, destination: Path, force: bool) -> None:
    """Write a starter recipe: MODEL (Hub id, folder, .gguf or builtin:NAME) with --scheme, every other
    field at its default; or a copy of a shipped recipe (--from). Validated as it is written."""

    if (shipped_name is None) == (model is None) or (model is not None and scheme is None):
        raise InputError("init: give MODEL with --scheme, or --from NAME")
    if shipped_name is not None:
        recipe = copy_shipped(shipped_name, destination, force=force)
    else:
        recipe = write_starter(model, scheme, destination, force=force)
    click.echo(f"{destination}: {recipe.name} ({recipe.scheme.name} on {recipe.model.source}); "
               f"next: quantize-pipeline validate {destination}")


@main.command()
def schemes() -> None:
    """The scheme x engine table: which engine serves which scheme, and why."""
    from rich.console import Console
    from rich.table import Table

    installed = compat.installed_vllm_engine()
    table = Table(title=f"schemes (installed engine: {installed or 'none'})", show_lines=True)
    table.add_column("scheme", style="bold")
    table.add_column("what it is")
    for engine in compat.ENGINES:
        table.add_column(engine)

    def cells(entry_for) -> list[str]:
        out = []
        for engine in compat.ENGINES:
            entry = entry_for(engine)
            mark = "[green]yes[/green]" if entry.supported else "[red]no[/red]"
            out.append(f"{mark} ({entry.source})\n{entry.reason}")
        return out

    for name, spec in SCHEMES.items():
        table.add_row(name, spec.description, *cells(lambda engine, name=name: compat.support(name, engine)))
    for name in compat.declared("listed_explicit"):
        table.add_row(name, get_scheme(name).description,
                      *cells(lambda engine, name=name: compat.support(name, engine)))
    for quant_method, name in compat.declared("checkpoint_formats"):
        table.add_row(f"{quant_method} {compat.FORMAT_NAMES[quant_method][name]}", get_scheme(name).description,
                      *cells(lambda engine, quant_method=quant_method, name=name:
                             compat.checkpoint_format_support(quant_method, name, engine)))
    for name in compat.declared("expert_schemes"):
        table.add_row(f"{name} (MoE experts)", get_scheme(name).description + "; on an MoE model's experts",
                      *cells(lambda engine, name=name: compat.support(name, engine, moe_experts_only=True)))
    for kv_cache in compat.declared("kv_caches"):
        table.add_row(f"kv_cache: {kv_cache}", "Quark kv_cache_group: fp8 scales on k_proj/v_proj outputs; "
                      "combines with any scheme above",
                      *cells(lambda engine, kv_cache=kv_cache: compat.kv_cache_support(kv_cache, engine)))
    Console(width=200).print(table)
    click.echo(
        "Explicit form (quantization.scheme: {weight: {dtype, granularity, group_size, symmetric}, "
        "activation: {dtype, granularity, dynamic, symmetric}}): an explicit form that spells out a named scheme is "
        "that scheme; any other is decided by vLLM's Quark loader rules (`plan` and `run` say which engine serves it "
        "and why)."
    )


@main.command()
@click.argument("export_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--base", "base_source", required=True,
              help="The base model the export was made from: a local folder, builtin:NAME, a .gguf file or a Hub id.")
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path),
              help="Recipe whose scheme, evaluation and gates apply (default: scheme read from the export, default gates).")
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("exports"), show_default=True)
@click.option("--refresh-baseline", is_flag=True, help="Re-evaluate the base model instead of using its cached figures.")
@click.option("--json", "as_json", is_flag=True, help="Print events as JSON, one object per line (as `run --json`).")
@click.option("--baseline", "baselines", multiple=True, metavar="bnb-int8|bnb-nf4|FOLDER",
              help="An evaluation-only column beside the export (repeatable; added to the recipe's `baselines`): "
                   "bitsandbytes int8 / NF4 of the base model, or an existing checkpoint folder.")
@SET_OPTION
@JUNIT_OPTION
@MLFLOW_OPTION
def check(export_dir: Path, base_source: str, recipe_path: Path | None, output_dir: Path, refresh_baseline: bool,
          as_json: bool, baselines: tuple[str, ...], settings: tuple[str, ...], junit_path: Path | None,
          to_mlflow: bool) -> None:
    """Gate an export made elsewhere: verify -> serve -> evaluate -> gate, same rules and exit codes as `run`."""

    def say(line: str) -> None:
        click.echo(line, err=as_json)

    try:
        result = runner.check(export_dir, base_source, recipe_path, output_root=output_dir, say=say,
                              refresh_baseline=refresh_baseline, emit=_print_event if as_json else no_events,
                              baselines=baselines, settings=settings)
    except PipelineError as exc:  # the report and event of a stopped run, then the boundary's one line
        _report_stopped(exc, junit_path, to_mlflow, as_json)
        raise
    _report_elsewhere(result.run_dir, junit_path, to_mlflow)
    if as_json:
        _print_event(_result_event(result.run_dir, 0, published=None, verdict=result.verdict))
        return
    click.echo(f"gate: {result.verdict}")
    click.echo(f"run directory: {result.run_dir}")


@main.command("prepare-model")
@click.argument("name", default="smollm2-135m-instruct")
def prepare_model(name: str) -> None:
    """Convert a shipped builtin model (GGUF from PyPI) to HF safetensors in the cache, once."""
    if name not in recipe_schema.BUILTIN_MODELS:
        raise PipelineError(f"unknown builtin model '{name}' (known: {', '.join(recipe_schema.BUILTIN_MODELS)})")
    log = models.cache_root() / "logs" / f"prepare-{name}.log"
    spec = recipe_schema.Recipe.model_validate(
        {"name": "prepare", "model": {"source": f"builtin:{name}"}, "quantization": {"scheme": "int8_per_channel"}}
    )
    path = resolve_base_model(spec, log, click.echo)
    click.echo(f"{name}: {path}")


if __name__ == "__main__":
    main()
