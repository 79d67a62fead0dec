"""evaluate: lm-eval (vLLM backend) on the base model and on the export, same inputs.

The base model's figures are cached by (model content hash, task, limit,
engine, engine version), so the next run of any recipe on the same base model
does not redo them; `--refresh-baseline` recomputes them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline import engine, lm_eval_tasks, metrics
from pipeline.events import Emit
from pipeline.models import cache_root
from pipeline.recipe import Recipe
from pipeline.rundir import atomic_write_json, tree_digest
from pipeline.stages import divergence
from pipeline.worker import call_isolated


def evaluate_model(
    model_dir: str, tasks: dict[str, int | None], engine_options: dict, score_texts: list[list[str]] | None = None,
    divergence_reference: dict | None = None, divergence_against: str | None = None,
) -> dict:
    """Child-process job: {"tasks": {task: {"metrics": {...}, "per_doc": [[doc_id, value], ...]}},
    "completion_perplexities": [...], "divergence": {...}} for one model.

    score_texts: [prompt, completion] pairs whose completion this model scores
    (the base model judging the quantized model's generations).
    divergence_reference: {"texts": [...], "path": ...}: save this (base) model's
    top-k next-token log-probs on the texts there.
    divergence_against: such a saved reference: compare this (quantized) model with it.
    """
    engine.prepare_environment(engine_options)
    import lm_eval

    model = _lm_eval_model(model_dir, engine_options)
    results: dict = {"tasks": {}}
    for name, limit in tasks.items():  # one call per task: each has its own limit
        task_name = lm_eval_tasks.lm_eval_name(name)
        started = time.perf_counter()
        outcome = lm_eval.simple_evaluate(
            model=model, tasks=[lm_eval_tasks.task_config(name)], limit=limit, log_samples=True, bootstrap_iters=0,
        )
        metrics = {
            key.split(",")[0]: value for key, value in outcome["results"][task_name].items()
            if "," in key and isinstance(value, (int, float))
        }
        metric = lm_eval_tasks.gated_metric(name)
        per_doc = []
        for sample in outcome["samples"].get(task_name, []):
            value = sample.get(metric)
            per_doc.append([sample["doc_id"], list(value) if isinstance(value, (list, tuple)) else value])
        metrics["samples"] = len(per_doc)
        results["tasks"][name] = {"metrics": metrics, "per_doc": per_doc, "seconds": round(time.perf_counter() - started, 2)}
    if score_texts:
        started = time.perf_counter()
        score = _completion_perplexities_hf if engine_options.get("engine") == "transformers" else _completion_perplexities
        results["completion_perplexities"] = score(model, score_texts)
        results["completion_perplexities_seconds"] = round(time.perf_counter() - started, 2)
    engine_name = engine_options.get("engine", "vllm")
    if divergence_reference:
        results["divergence_reference"] = divergence.write_reference(
            model, model.tokenizer, divergence_reference["texts"], engine_options["max_model_len"], engine_name,
            divergence_reference["path"],
        )
    if divergence_against:
        results["divergence"] = divergence.compare_with_reference(model, divergence_against, engine_name)
    return results


def _lm_eval_model(model_dir: str, options: dict):
    """lm-eval's model for the engine: its vLLM backend, or its transformers (HFLM) backend."""
    if options.get("engine") == "transformers":
        from lm_eval.models.huggingface import HFLM

        model, tokenizer = engine.load_transformers_model(model_dir, options)
        return HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=8, max_length=options["max_model_len"])
    from pipeline.lm_eval_vllm import vllm_lm_class

    llm_kwargs = engine.llm_kwargs(model_dir, options)
    return vllm_lm_class()(pretrained=llm_kwargs.pop("model"), batch_size="auto", **llm_kwargs)


def _completion_perplexities_hf(lm, pairs: list[list[str]]) -> list[float]:
    """Perplexity of each completion given its prompt, under this model (one transformers forward each)."""
    import math

    import torch

    perplexities = []
    for prompt, completion in pairs:
        start = len(lm.tokenizer(prompt)["input_ids"])
        ids = lm.tokenizer(prompt + completion, return_tensors="pt")["input_ids"]
        if ids.shape[1] <= start:
            perplexities.append(float("inf"))
            continue
        with torch.no_grad():
            logprobs = torch.log_softmax(lm.model(ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        token_logprobs = logprobs[torch.arange(len(targets)), targets][start - 1:]
        perplexities.append(math.exp(-token_logprobs.mean().item()))
    return perplexities


def _completion_perplexities(lm, pairs: list[list[str]]) -> list[float]:
    """Perplexity of each completion given its prompt, under this model (vLLM prompt logprobs)."""
    import math

    from vllm import SamplingParams

    llm = lm.model
    tokenizer = llm.get_tokenizer()
    outputs = llm.generate(
        [prompt + completion for prompt, completion in pairs],
        SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False,
    )
    perplexities = []
    for (prompt, _), output in zip(pairs, outputs):
        start = len(tokenizer(prompt)["input_ids"])
        token_ids = output.prompt_token_ids
        logprobs = [
            entry[token_ids[position]].logprob
            for position, entry in enumerate(output.prompt_logprobs) if position >= start and entry
        ]
        perplexities.append(math.exp(-sum(logprobs) / len(logprobs)) if logprobs else float("inf"))
    return perplexities


def _baseline_path(base_digest: str, task: str, limit: int | None, engine_version: str, options: dict) -> Path:
    mode = "eager" if options["enforce_eager"] else "compiled"
    limit_key = limit if limit is not None else "all"
    key = f"v2-{task}-limit{limit_key}-{options['dtype']}-{options['engine']}-{engine_version}-{mode}"
    return cache_root() / "baselines" / base_digest[:32] / f"{key}.json"


def _divergence_reference_path(base_digest: str, text: str, limit: int | None, engine_version: str, options: dict) -> Path:
    mode = "eager" if options["enforce_eager"] else "compiled"
    key = (f"v1-divergence-{text}-limit{limit if limit is not None else 'all'}-tokens{divergence.MAX_TOKENS_PER_TEXT}"
           f"-top{divergence.TOP_K}-{options['dtype']}-{options['engine']}-{engine_version}-{mode}")
    return cache_root() / "baselines" / base_digest[:32] / f"{key}.safetensors"


def _limits(recipe: Recipe) -> dict[str, int | None]:
    spec = recipe.evaluation
    limits: dict[str, int | None] = {task: spec.limit for task in spec.tasks}
    if spec.perplexity_text is not None:
        limits[spec.perplexity_text] = spec.perplexity_limit
    return limits


def _paired(task: str, base: dict, quantized: dict) -> dict | None:
    """Paired comparison on the questions both models answered (matched by doc_id)."""
    if lm_eval_tasks.gated_metric(task) != "acc":
        return None
    base_by_doc = {doc_id: value for doc_id, value in base["per_doc"]}
    pairs = [(base_by_doc[doc_id], value) for doc_id, value in quantized["per_doc"] if doc_id in base_by_doc]
    if not pairs:
        return None
    return metrics.paired_accuracy_comparison([b for b, _ in pairs], [q for _, q in pairs])


def evaluate(
    recipe: Recipe, base_model_dir: Path, model_dir: Path, out_dir: Path, log_path: Path, *,
    completions: list[dict] | None = None, engine_name: str = "vllm", refresh_baseline: bool = False,
    on_event: Emit | None = None,
) -> tuple[dict, float]:
    """Returns (figures for the report, peak RSS in MiB of the evaluation children).

    completions: the quantized model's generations from `serve`; the base model
    scores them (its perplexity of each), which is how word salad is caught.
    """
    engine_version = engine.engine_version(engine_name)
    limits = _limits(recipe)
    base_digest = tree_digest(base_model_dir)
    base_options = engine.engine_options(recipe, quantized=False, engine_name=engine_name)
    peak_mb = 0.0

    base: dict[str, dict] = {}
    if not refresh_baseline:
        for task, limit in limits.items():
            cached = _baseline_path(base_digest, task, limit, engine_version, base_options)
            if cached.is_file():
                base[task] = json.loads(cached.read_text())
    missing = {task: limit for task, limit in limits.items() if task not in base}
    score_texts = [[item["prompt"], item["completion"]] for item in completions or []]
    spec = recipe.evaluation
    reference = None
    if spec.divergence_text is not None:
        reference = _divergence_reference_path(base_digest, spec.divergence_text, spec.divergence_limit, engine_version,
                                               base_options)
    build_reference = reference is not None and (refresh_baseline or not reference.is_file())
    completion_perplexities, timings = None, {}
    if missing or score_texts or build_reference:
        computed, child_peak = call_isolated(
            "pipeline.stages.evaluate:evaluate_model",
            {"model_dir": str(base_model_dir), "tasks": missing, "engine_options": base_options,
             "score_texts": score_texts,
             "divergence_reference": {
                 "texts": divergence.heldout_texts(spec.divergence_text, spec.divergence_limit), "path": str(reference),
             } if build_reference else None},
            log_path=log_path, stage="evaluate", on_event=on_event, label="base",
        )
        if build_reference:
            timings["token divergence: base reference"] = computed["divergence_reference"]["seconds"]
        if score_texts:
            timings["base perplexity of completions"] = computed.get("completion_perplexities_seconds")
        peak_mb = max(peak_mb, child_peak)
        completion_perplexities = computed.get("completion_perplexities")
        for task, figures in computed["tasks"].items():
            atomic_write_json(_baseline_path(base_digest, task, limits[task], engine_version, base_options), figures)
            base[task] = figures

    quantized, child_peak = call_isolated(
        "pipeline.stages.evaluate:evaluate_model",
        {"model_dir": str(model_dir), "tasks": limits,
         "engine_options": engine.engine_options(recipe, quantized=True, engine_name=engine_name),
         "divergence_against": str(reference) if reference is not None else None},
        log_path=log_path, stage="evaluate", on_event=on_event, label="quantized",
    )
    peak_mb = max(peak_mb, child_peak)
    timings |= {f"lm-eval {task}: base": base[task].get("seconds") for task in missing}
    timings |= {f"lm-eval {task}: quantized": figures["seconds"] for task, figures in quantized["tasks"].items()}
    divergence_figures = quantized.get("divergence")
    quantized = quantized["tasks"]
    for role, figures in (("base", base), ("quantized", quantized)):
        with open(out_dir / f"{role}-samples.jsonl", "w", encoding="utf-8") as handle:
            for task, entry in figures.items():
                for doc_id, value in entry["per_doc"]:
                    handle.write(json.dumps({"task": task, "doc_id": doc_id, "value": value}) + "\n")

    evaluation: dict = {
        "engine": engine_name,
        "engine_version": engine_version,
        "baseline": {
            "model_sha256": base_digest,
            "cached_tasks": sorted(set(limits) - set(missing)),
            "computed_tasks": sorted(missing),
        },
        "limits": limits,
        "tasks": {
            task: {
                "base": base[task]["metrics"],
                "quantized": quantized[task]["metrics"],
                "paired": _paired(task, base[task], quantized[task]),
            }
            for task in recipe.evaluation.tasks
        },
        "completion_perplexities_under_base": completion_perplexities,
    }
    if divergence_figures is not None:
        atomic_write_json(out_dir / "divergence-per-token.json", divergence_figures.pop("per_token"))
        evaluation["divergence"] = {
            **divergence_figures, "text": spec.divergence_text, "limit": spec.divergence_limit,
            "base_reference_cached": not build_reference,
            "method": f"{engine_name} top-{divergence.TOP_K} next-token log-probs of both models; KL is the larger "
                      "of two lower bounds of the full-vocabulary KL (see metrics.topk_token_kl)",
        }
        timings["token divergence: quantized"] = divergence_figures["seconds"]
    evaluation["timings_s"] = timings
    text = recipe.evaluation.perplexity_text
    if text is not None:
        evaluation["perplexity"] = {
            "text": text,
            "base": base[text]["metrics"].get("word_perplexity"),
            "quantized": quantized[text]["metrics"].get("word_perplexity"),
        }
    (out_dir / "evaluate.json").write_text(json.dumps(evaluation, indent=2, sort_keys=True) + "\n")
    return evaluation, peak_mb
