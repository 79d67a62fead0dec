"""What a child that holds an engine does with it: load a model once per session, run lm-eval tasks on it,
pair two models' answers question by question. The evaluate stage and the baselines share it."""

from __future__ import annotations

import json
import time

from quantize_pipeline import engines
from quantize_pipeline.engines import settings as engine
from quantize_pipeline.engines.settings import EngineOptions
from quantize_pipeline.evaluate import lm_eval_tasks
from quantize_pipeline.run.events import report_event
from quantize_pipeline.verdict import metrics

# What a task is asked: its first N questions (None: all), or these doc ids (the gate's later rounds).
Questions = int | None | list[int]


def evaluate_tasks(loaded: engines.Engine, tasks: dict[str, Questions]) -> dict[str, dict]:
    """lm-eval on an already-loaded engine: {task: {"metrics": {...}, "per_doc": [[doc_id, value], ...], "seconds"}}.

    Asking for more questions later is another call on the same engine, e.g.
    `evaluate_tasks(loaded, {"arc_easy": [200, 201, 202]})`."""
    import lm_eval

    model = loaded.lm_eval_model()
    results = {}
    for name, questions in tasks.items():  # one call per task: each has its own limit
        task_name = lm_eval_tasks.lm_eval_name(name)
        by_id = isinstance(questions, list)
        started = time.perf_counter()
        outcome = lm_eval.simple_evaluate(
            model=model, tasks=[lm_eval_tasks.task_config(name)], limit=None if by_id else questions,
            samples={task_name: questions} if by_id else None, log_samples=True, bootstrap_iters=0,
        )
        figures = {
            key.split(",")[0]: value for key, value in outcome["results"][task_name].items()
            if "," in key and isinstance(value, (int, float))
        }
        metric = lm_eval_tasks.gated_metric(name)
        per_doc = []
        for sample in outcome["samples"].get(task_name, []):
            value = sample.get(metric)
            per_doc.append([sample["doc_id"], list(value) if isinstance(value, (list, tuple)) else value])
        figures["samples"] = len(per_doc)
        results[name] = {"metrics": figures, "per_doc": per_doc, "seconds": round(time.perf_counter() - started, 2)}
    return results


# The engine this child process has loaded, kept for the next call of the same session (worker.Session):
# ((model_dir, options), engine). One slot: a child serves one model.
_loaded: tuple[tuple[str, str], engines.Engine] | None = None


def load_engine(model_dir: str, options: EngineOptions, role: str,
                may_sleep: bool = False) -> tuple[engines.Engine, dict | None]:
    """(the engine, its start record), or (the engine an earlier call of this child loaded, woken if asleep, None).
    may_sleep: built with the engine's sleep mode where it has one (sleep_job; evaluate.EngineChildren)."""
    global _loaded
    key = (model_dir, json.dumps(options.to_json(), sort_keys=True))
    if _loaded is not None and _loaded[0] == key:
        loaded = _loaded[1]
        if getattr(loaded, "asleep", False):
            started = time.perf_counter()
            loaded.wake_up()
            report_event({"event": "engine_wake", "role": role, "wake_s": round(time.perf_counter() - started, 2)})
        return loaded, None
    _loaded = None  # another model: let go of the first (a session keeps one model per child)
    engine.prepare_environment(options)
    loaded = engines.load(model_dir, options, sleep_mode=may_sleep)
    start = _engine_start(loaded, role)
    report_event({"event": "engine_start", **start})
    _loaded = (key, loaded)
    return loaded, start


def sleep_job() -> dict:
    """Child-process job: this child's engine to sleep, where it was built with a sleep mode (vLLM's level 1: its
    weights to host memory, its KV cache dropped), so that another model's engine can use the accelerator while
    this child lives; the next load_engine of the same model wakes it. {"asleep": whether it sleeps, "seconds"}."""
    started = time.perf_counter()
    loaded = _loaded[1] if _loaded is not None else None
    if loaded is None or not getattr(loaded, "sleep_mode", False):
        return {"asleep": False, "seconds": 0.0}
    if not loaded.asleep:
        loaded.sleep()
    return {"asleep": True, "seconds": round(time.perf_counter() - started, 2)}


def _engine_start(loaded: engines.Engine, role: str) -> dict:
    return {"role": role, "engine": loaded.name, "import_s": round(loaded.import_s, 2), "load_s": round(loaded.load_s, 2),
            "sleep_mode": bool(getattr(loaded, "sleep_mode", False))}


def paired_comparison(task: str, base: dict, quantized: dict) -> dict | None:
    """Paired comparison on the questions both models answered (matched by doc_id)."""
    if lm_eval_tasks.gated_metric(task) != "acc":
        return None
    base_by_doc = {doc_id: value for doc_id, value in base["per_doc"]}
    pairs = [(base_by_doc[doc_id], value) for doc_id, value in quantized["per_doc"] if doc_id in base_by_doc]
    if not pairs:
        return None
    return metrics.paired_accuracy_comparison([b for b, _ in pairs], [q for _, q in pairs])
