"""One variant of a recipe (a sweep's scheme x algorithm, an auto-exclude trial): its recipe derived from the
user's, run start to verdict (or reused when finished), and the row of figures a sweep compares."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Callable

from quantize_pipeline.errors import PipelineError
from quantize_pipeline.evaluate.record import Divergence, Perplexity, ServeFigures
from quantize_pipeline.recipe.schema import RTN, Recipe, load_recipe
from quantize_pipeline.run import runner, unfinished
from quantize_pipeline.verdict.record import ExportFigures, load_report

RUNS_FOLDER = "runs"
# What a row's status is when no verdict was reached.
REFUSED, CRASHED = "refused", "crashed"

Say = Callable[[str], None]


def derived_recipe_data(recipe: Recipe, label: str) -> dict:
    """A copy of the recipe run for comparison (a sweep variant, an auto-exclude trial): its own name,
    nothing published or reported elsewhere, no sweep section."""
    data = copy.deepcopy(recipe.model_dump(mode="json", exclude={"sweep"}))
    data["name"] = f"{recipe.name}--{label}"[:100]
    data["publish"] = None
    data["report_to"] = []
    return data


def _finished_run(runs_root: Path, recipe: Recipe) -> Path | None:
    newest = unfinished.newest_run(runs_root / recipe.name, recipe.content_hash())
    if newest is None:
        return None
    run_dir, manifest = newest
    return run_dir if unfinished.is_finished(manifest) and (run_dir / "report.json").is_file() else None


def run_variant(name: str, recipe_path: str, say: Say | None = None) -> dict:
    """One variant, start to verdict (or resumed, or reused when finished): its row. Never raises for the
    variant's own failure: a crash or a refusal is the row's status with its reason."""
    path = Path(recipe_path)
    runs_root = path.parent / RUNS_FOLDER
    recipe = load_recipe(path)
    scheme, algorithm = recipe.quantization.scheme, recipe.quantization.algorithm_name or RTN
    base = {"variant": name, "scheme": scheme, "algorithm": algorithm}
    if (finished := _finished_run(runs_root, recipe)) is not None:
        return {**row_from_report(base, finished), "reused": True}
    try:
        result = runner.run(path, output_root=runs_root, say=say or (lambda line: None))
        run_dir = result.run_dir
    except PipelineError as exc:
        run_dir = getattr(exc, "run_dir", None)
        if run_dir is None or not (Path(run_dir) / "report.json").is_file():
            status = REFUSED if exc.exit_code == 2 else CRASHED
            return {**base, "status": status, "reason": exc.one_line(), "run_dir": str(run_dir) if run_dir else None,
                    "reused": False}
    except Exception as exc:  # a bug or a library crash in this variant: the sweep goes on
        return {**base, "status": CRASHED, "reason": f"{type(exc).__name__}: {exc}", "run_dir": None, "reused": False}
    return {**row_from_report(base, Path(run_dir)), "reused": False}


def row_from_report(base: dict, run_dir: Path) -> dict:
    """The figures a sweep compares, read from a run's report.json (see the definitions in sweep_report)."""
    report = load_report(run_dir / "report.json")
    evaluation = report.evaluation
    serve, export = report.serve or ServeFigures(), report.export or ExportFigures()
    recoveries = []
    for figures in evaluation.tasks.values():
        base_acc, quantized_acc = figures.base.acc, figures.quantized.acc
        if base_acc and quantized_acc is not None:
            recoveries.append(quantized_acc / base_acc)
    perplexity = evaluation.perplexity or Perplexity()
    divergence = evaluation.divergence or Divergence()
    tokens = run_dir / "calibrate" / "tokens.jsonl"
    return {
        **base,
        "status": str(report.verdict),
        "reason": ", ".join(report.failed_rules + report.inconclusive_rules) or None,
        "run_dir": str(run_dir),
        "export_size_bytes": export.export_size_bytes,
        "size_ratio": export.size_ratio,
        "recovery": min(recoveries) if recoveries else None,
        "mean_kl": divergence.mean_kl,
        "top1_agreement": divergence.top1_agreement,
        "perplexity_ratio": (perplexity.quantized / perplexity.base
                             if perplexity.base and perplexity.quantized is not None else None),
        "tokens_per_s": serve.tokens_per_s,
        "serving_peak_rss_mb": serve.peak_rss_mb,
        "serving_device_peak_mb": serve.device_peak_mb,
        "engine": report.engine.label if report.engine else None,
        "calibration_tokens_sha256": _sha256(tokens) if tokens.is_file() else None,
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
