"""Baseline columns (recipe `baselines:`, `check --baseline`): what users ran before, measured
beside the export on the same questions — evaluation only, never gated.

Each baseline is one child process: load (bitsandbytes int8/NF4 of the base model through
transformers, or an existing checkpoint in the run's engine), a warm-up call, one timed generate
call of the recipe's prompts with memory sampled while it runs (peak RSS **during generation**:
what a load-fine-then-OOM model shows), then lm-eval on the accuracy tasks' first-round
questions, paired with the base model's answers to the same questions. A baseline that cannot
load or run here is a column with the error it raised, never a missing one.
"""

from __future__ import annotations

import time
from pathlib import Path

from quantize_pipeline import engines
from quantize_pipeline.engines import settings as engine
from quantize_pipeline.engines.memory import PeakSampler
from quantize_pipeline.engines.names import EngineName
from quantize_pipeline.engines.serve import timed_generate
from quantize_pipeline.engines.settings import EngineOptions
from quantize_pipeline.errors import PipelineError
from quantize_pipeline.evaluate import lm_eval_tasks
from quantize_pipeline.evaluate.engine_session import evaluate_tasks, load_engine, paired_comparison
from quantize_pipeline.recipe.schema import BaselineSpec, Recipe
from quantize_pipeline.run.events import Emit
from quantize_pipeline.run.worker import call_isolated

GENERATION_FIGURES = {
    "load_s": "building the model (bitsandbytes quantizes while loading); no imports",
    "tokens_per_s": "generated tokens / seconds of one generate call of the recipe's prompts after a 1-token "
                    "warm-up call; prefill included",
    "peak_rss_mb": "peak host RSS of the process tree, sampled every 50 ms while that generate call ran",
    "device_peak_mb": "peak accelerator memory in use while generating; null on CPU",
}


def baseline_options(recipe: Recipe, baseline: BaselineSpec, engine_name: str, device: str) -> EngineOptions:
    """bitsandbytes: its engine on the base model; a checkpoint: the run's engine, as for an export
    (no KV-cache override: the checkpoint's own config decides)."""
    name = EngineName(f"bitsandbytes-{baseline.bitsandbytes}") if baseline.bitsandbytes else engine_name
    return engine.engine_options(recipe, quantized=False, engine_name=name, device=device)


def accuracy_tasks(recipe: Recipe) -> dict[str, int | None]:
    """The gated accuracy tasks at the first round's limit: the questions the export answered first."""
    return {task: recipe.evaluation.limit for task in recipe.evaluation.tasks if lm_eval_tasks.gated_metric(task) == "acc"}


def baseline_job(model_dir: str, engine_options: dict, prompts: list[str], max_new_tokens: int,
                 tasks: dict[str, int | None]) -> dict:
    """Child-process job: one load; generation figures, then lm-eval per question."""

    options = EngineOptions.from_json(engine_options)
    loaded, start = load_engine(model_dir, options, "baseline")
    loaded.generate(prompts, 1)  # warm-up: lazy initialisation is not generation
    with PeakSampler(loaded.device_memory_used_mb) as peak:
        generations, generate_s = timed_generate(loaded, prompts, max_new_tokens)
    tokens = sum(item.tokens for item in generations)
    figures = {
        "engine": loaded.name, "engine_version": engines.version(options.engine), "load_s": round(loaded.load_s, 2),
        "generate_s": round(generate_s, 3), "generated_tokens": tokens, "tokens_per_s": round(tokens / generate_s, 2),
        "peak_rss_mb": round(peak.rss_mb, 1),
        "device_peak_mb": round(peak.device_mb, 1) if peak.device_mb is not None else None,
        "completions": [{"prompt": prompt, "completion": item.text, "tokens": item.tokens}
                        for prompt, item in zip(prompts, generations)],
        "definitions": GENERATION_FIGURES,
    }
    model = getattr(loaded, "model", None)  # transformers engines: what bitsandbytes put in place of nn.Linear
    if model is not None:
        figures["bitsandbytes_linear_layers"] = sum(type(module).__module__.startswith("bitsandbytes")
                                                    for module in model.modules())
    return {"engine_start": start, "serve": figures, "tasks": evaluate_tasks(loaded, tasks)}


def evaluate_baselines(recipe: Recipe, base: dict[str, dict], base_model_dir: Path, logs: Path, *,
                       engine_name: str, device: str, on_event: Emit | None = None) -> dict[str, dict]:
    """{name: column}: each baseline's figures and its accuracy paired with the base's answers
    (`base`: the base model's per-question figures of this run), or the error that stopped it."""

    tasks = accuracy_tasks(recipe)
    columns: dict[str, dict] = {}
    for baseline in recipe.baselines:
        options = baseline_options(recipe, baseline, engine_name, device)
        model_dir = Path(baseline.checkpoint) if baseline.checkpoint else base_model_dir
        column: dict = {"kind": baseline.kind, "engine": options.engine}
        started = time.perf_counter()
        try:
            result, peak_mb = call_isolated(
                "quantize_pipeline.evaluate.baselines:baseline_job",
                {"model_dir": str(model_dir), "engine_options": options.to_json(), "prompts": list(recipe.evaluation.prompts),
                 "max_new_tokens": recipe.evaluation.max_new_tokens, "tasks": tasks},
                log_path=logs / f"baseline-{baseline.name}.log", stage="evaluate", on_event=on_event,
                label=f"baseline {baseline.name}",
            )
        except PipelineError as exc:  # measured, not assumed: the column says what happened
            column |= {"error": exc.one_line(), "log": f"logs/baseline-{baseline.name}.log"}
        else:
            column |= {
                "engine_start": result["engine_start"], "serve": result["serve"], "process_peak_rss_mb": round(peak_mb, 1),
                "tasks": {
                    task: {"acc": figures["metrics"].get("acc"), "samples": len(figures["per_doc"]),
                           "paired": paired_comparison(task, base[task], figures) if task in base else None}
                    for task, figures in result["tasks"].items()
                },
            }
        column["seconds"] = round(time.perf_counter() - started, 2)
        columns[baseline.name] = column
    return columns


def from_cli(values: tuple[str, ...]) -> list[dict]:
    """`check --baseline`: bnb-int8 | bnb-nf4 | a model folder (its name is the folder's)."""
    specs = []
    for value in values:
        if value in ("bnb-int8", "bnb-nf4"):
            specs.append({"name": value, "bitsandbytes": value.removeprefix("bnb-")})
        else:
            specs.append({"name": Path(value).name or "checkpoint", "checkpoint": value})
    return specs

