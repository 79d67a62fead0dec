"""evaluate: lm-eval (vLLM backend) on the base model and on the export, same inputs.

The base model's figures are cached by (model content hash, task, limit,
engine, engine version), so the next run of any recipe on the same base model
does not redo them; `--refresh-baseline` recomputes them.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import engine, lm_eval_tasks
from pipeline.models import cache_root
from pipeline.recipe import Recipe
from pipeline.rundir import atomic_write_json, tree_digest
from pipeline.worker import call_isolated

ENGINE = "vllm"


def evaluate_model(model_dir: str, tasks: dict[str, int | None], engine_options: dict, samples_path: str) -> dict:
    """Child-process job: {task: {metric: value}} for one model; per-document results to samples_path."""
    engine.prepare_environment()
    import lm_eval

    from pipeline.lm_eval_vllm import vllm_lm_class

    llm_kwargs = engine.llm_kwargs(model_dir, engine_options)
    model = vllm_lm_class()(pretrained=llm_kwargs.pop("model"), batch_size="auto", **llm_kwargs)
    figures = {}
    with open(samples_path, "w", encoding="utf-8") as samples_file:
        for name, limit in tasks.items():  # one call per task: each has its own limit
            task_name = lm_eval_tasks.lm_eval_name(name)
            results = lm_eval.simple_evaluate(
                model=model, tasks=[lm_eval_tasks.task_config(name)], limit=limit, log_samples=True,
                bootstrap_iters=0,
            )
            metrics = results["results"][task_name]
            figures[name] = {
                key.split(",")[0]: value for key, value in metrics.items()
                if "," in key and isinstance(value, (int, float))
            }
            figures[name]["samples"] = len(results["samples"][task_name])
            metric = lm_eval_tasks.gated_metric(name)
            for sample in results["samples"][task_name]:
                value = sample.get(metric)
                if isinstance(value, (list, tuple)):  # rolling loglikelihood: (loglikelihood, words)
                    value = list(value)
                samples_file.write(json.dumps({"task": name, "doc_id": sample["doc_id"], metric: value}) + "\n")
    return figures


def _baseline_path(base_digest: str, task: str, limit: int | None, engine_version: str, options: dict) -> Path:
    mode = "eager" if options["enforce_eager"] else "compiled"
    key = f"{task}-limit{limit if limit is not None else 'all'}-{options['dtype']}-{ENGINE}-{engine_version}-{mode}"
    return cache_root() / "baselines" / base_digest[:32] / f"{key}.json"


def _limits(recipe: Recipe) -> dict[str, int | None]:
    spec = recipe.evaluation
    limits: dict[str, int | None] = {task: spec.limit for task in spec.tasks}
    if spec.perplexity_text is not None:
        limits[spec.perplexity_text] = spec.perplexity_limit
    return limits


def evaluate(
    recipe: Recipe, base_model_dir: Path, model_dir: Path, out_dir: Path, log_path: Path, *,
    refresh_baseline: bool = False,
) -> tuple[dict, float]:
    """Returns (figures for the report, peak RSS in MiB of the evaluation children)."""
    from pipeline.lm_eval_vllm import vllm_version

    engine_version = vllm_version()
    limits = _limits(recipe)
    base_digest = tree_digest(base_model_dir)
    base_options = engine.engine_options(recipe, quantized=False)
    peak_mb = 0.0

    base: dict[str, dict] = {}
    if not refresh_baseline:
        for task, limit in limits.items():
            cached = _baseline_path(base_digest, task, limit, engine_version, base_options)
            if cached.is_file():
                base[task] = json.loads(cached.read_text())
    missing = {task: limit for task, limit in limits.items() if task not in base}
    if missing:
        computed, child_peak = call_isolated(
            "pipeline.stages.evaluate:evaluate_model",
            {"model_dir": str(base_model_dir), "tasks": missing,
             "engine_options": base_options,
             "samples_path": str(out_dir / "base-samples.jsonl")},
            log_path=log_path, stage="evaluate",
        )
        peak_mb = max(peak_mb, child_peak)
        for task, figures in computed.items():
            atomic_write_json(_baseline_path(base_digest, task, limits[task], engine_version, base_options), figures)
            base[task] = figures

    quantized, child_peak = call_isolated(
        "pipeline.stages.evaluate:evaluate_model",
        {"model_dir": str(model_dir), "tasks": limits,
         "engine_options": engine.engine_options(recipe, quantized=True),
         "samples_path": str(out_dir / "quantized-samples.jsonl")},
        log_path=log_path, stage="evaluate",
    )
    peak_mb = max(peak_mb, child_peak)

    evaluation: dict = {
        "engine": ENGINE,
        "engine_version": engine_version,
        "baseline": {
            "model_sha256": base_digest,
            "cached_tasks": sorted(set(limits) - set(missing)),
            "computed_tasks": sorted(missing),
        },
        "limits": limits,
        "tasks": {
            task: {"base": base[task], "quantized": quantized[task]} for task in recipe.evaluation.tasks
        },
    }
    text = recipe.evaluation.perplexity_text
    if text is not None:
        evaluation["perplexity"] = {
            "text": text,
            "base": base[text].get("word_perplexity"),
            "quantized": quantized[text].get("word_perplexity"),
        }
    (out_dir / "evaluate.json").write_text(json.dumps(evaluation, indent=2, sort_keys=True) + "\n")
    return evaluation, peak_mb
