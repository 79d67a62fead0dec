"""evaluate (with serve): one engine load per model, lm-eval and the other figures on it.

The export's child loads its engine once and does serve's work (generations, serving
figures) and evaluate's (lm-eval tasks, its top-k log-probs on held-out text). The base
model's child runs after it, only when a base figure is not cached: lm-eval baselines, the
divergence reference, or its perplexity of the export's completions (which is why the export
generates first). Base figures are cached by (model content hash, task, limit, engine, engine
version), so the next run of any recipe on the same base model does not redo them;
`--refresh-baseline` recomputes them.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from quantize_pipeline import engines
from quantize_pipeline.engines import serve
from quantize_pipeline.engines import settings as engine
from quantize_pipeline.engines.memory import room_for_another, room_to_sleep
from quantize_pipeline.engines.names import EngineName
from quantize_pipeline.engines.settings import EngineOptions
from quantize_pipeline.errors import PipelineError
from quantize_pipeline.evaluate import baselines, divergence, lm_eval_tasks
from quantize_pipeline.evaluate.engine_session import (  # noqa: F401  (sleep_job: a job of this module)
    Questions,
    evaluate_tasks,
    load_engine,
    paired_comparison,
    sleep_job,
)
from quantize_pipeline.evaluate.question_store import QuestionStore
from quantize_pipeline.evaluate.record import (
    BaselineColumn,
    BaselineSource,
    Divergence,
    Evaluation,
    PairedComparison,
    Perplexity,
    Round,
    Rounds,
    TaskComparison,
)
from quantize_pipeline.recipe.models import cache_root
from quantize_pipeline.recipe.schema import Recipe
from quantize_pipeline.run.events import Emit
from quantize_pipeline.run.rundir import atomic_write_json, read_json, tree_digest
from quantize_pipeline.run.stage_record import StageRecord
from quantize_pipeline.run.worker import Session
from quantize_pipeline.verdict import gate, sequential
from quantize_pipeline.verdict.run_facts import completion_texts


def export_job(model_dir: str, engine_options: dict, prompts: list[str], max_new_tokens: int,
               tasks: dict[str, Questions], divergence_texts: list[str] | None, serve_dir: str,
               top_logprobs_path: str, may_sleep: bool = False) -> dict:
    """Child-process job for the export: one load; serve's work, then evaluate's."""
    from dataclasses import asdict

    options = EngineOptions.from_json(engine_options)
    started = time.perf_counter()
    loaded, start = load_engine(model_dir, options, "quantized", may_sleep)
    figures = serve.serve(loaded, engines.version(options.engine), prompts, max_new_tokens, Path(serve_dir))
    serve_s = time.perf_counter() - started
    results: dict = {"engine_start": start, "serve": asdict(figures),
                     "serve_s": round(serve_s, 2), "tasks": evaluate_tasks(loaded, tasks)}
    if divergence_texts is not None:
        token_ids = divergence.heldout_token_ids(loaded.tokenizer, divergence_texts, options.max_model_len)
        results["top_logprobs"] = divergence.write_top_logprobs(loaded, token_ids, top_logprobs_path)
    results["evaluate_s"] = round(time.perf_counter() - started - serve_s, 2)
    return results


def base_job(model_dir: str, engine_options: dict, tasks: dict[str, Questions], score_texts: list[list[str]],
             divergence_texts: list[str] | None, reference_path: str | None, may_sleep: bool = False) -> dict:
    """Child-process job for the base model: only the figures that were not cached.

    score_texts: [prompt, completion] pairs whose completion this model scores (the base
    judging the export's generations: how word salad is caught)."""
    options = EngineOptions.from_json(engine_options)
    loaded, start = load_engine(model_dir, options, "base", may_sleep)
    results: dict = {"engine_start": start, "tasks": evaluate_tasks(loaded, tasks)}
    if score_texts:
        started = time.perf_counter()
        results["completion_perplexities"] = loaded.completion_perplexities(score_texts)
        results["completion_perplexities_seconds"] = round(time.perf_counter() - started, 2)
    if divergence_texts is not None:
        token_ids = divergence.heldout_token_ids(loaded.tokenizer, divergence_texts, options.max_model_len)
        results["divergence_reference"] = divergence.write_top_logprobs(loaded, token_ids, reference_path)
    return results


def round_job(model_dir: str, engine_options: dict, tasks: dict[str, Questions], role: str,
              may_sleep: bool = False) -> dict:
    """Child-process job for a later round of the gate's sequential evaluation: more questions of
    the tasks (role: "quantized" or "base"), on the engine the session's child has loaded, if it has."""
    options = EngineOptions.from_json(engine_options)
    loaded, start = load_engine(model_dir, options, role, may_sleep)
    return {"engine_start": start, "tasks": evaluate_tasks(loaded, tasks)}


class EngineChildren:
    """serve's and evaluate's engine children, one per model ("quantized", "base"): a model's later work (the gate's
    next round) runs in its child while that child lives, so its engine is not started again. When the other
    model's child starts, the first stays alive if it may be called again (`keep_both`: the gate plans more than
    one round) and either there is room for both (`engines.memory.room_for_another`: host memory on a CPU) or it
    can sleep (on an accelerator: its engine built with vLLM's sleep mode, `sleep_job`, and host memory for its
    weights, `engines.memory.room_to_sleep`); else it is closed first, so two models never share memory that holds
    one (a 70B export and its base do not fit one GPU together) and a model needed again starts again. A sleeping
    child is woken by its next call, after the other one has gone to sleep in turn; a wake, or a start beside a
    sleeping child, that fails is retried in a fresh child with no other alive."""

    def __init__(self, logs: Path, on_event: Emit | None, *, keep_both: bool, jobs_module: str = __name__) -> None:
        self.logs, self.on_event, self.jobs_module = logs, on_event, jobs_module
        self.keep_both = keep_both  # whether a model's child may be called again after the other's
        self.role: str | None = None  # the model of the last call
        self._sessions: dict[str, Session] = {}
        self._model_dirs: dict[str, Path] = {}
        self._can_sleep: dict[str, bool] = {}  # from each child's engine start record
        self._asleep: set[str] = set()
        self._side_by_side = False  # both children awake together (there was room for both)
        self.starts: list[dict] = []  # every engine start, in order
        self.sleeps: list[dict] = []  # every time a child's engine was put to sleep: {"role", "seconds"}

    def __enter__(self) -> EngineChildren:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def call(self, role: str, job: str, kwargs: dict, *, log_name: str, stage: str) -> tuple[dict, float]:
        """Run `<jobs_module>:<job>` (this module's jobs) for the model of `role` ("quantized" or "base")."""
        session = self._sessions.get(role)
        if session is not None and not session.alive:
            self._close(role)
            session = None
        model_dir, options = Path(kwargs["model_dir"]), EngineOptions.from_json(kwargs["engine_options"])
        for other in [name for name in self._sessions if name != role and name not in self._asleep]:
            if self._side_by_side:
                continue
            if session is None and self.keep_both and room_for_another(model_dir, options):
                self._side_by_side = True
                continue
            self._give_way(other, options)
        if session is None:
            session = self._sessions[role] = Session(log_path=self.logs / log_name, on_event=self.on_event)
            self._model_dirs[role] = model_dir
        self.role = role
        # On an accelerator, a child that may be called again after the other's is built to sleep.
        kwargs = kwargs | {"may_sleep": self.keep_both and options.device != "cpu"}
        try:
            result, peak_mb = session.call(f"{self.jobs_module}:{job}", kwargs, stage=stage, label=role)
        except PipelineError as error:
            sleeping = [name for name in self._asleep if name != role]
            if role not in self._asleep and not sleeping:
                raise
            # A child that slept and failed (its wake, most likely), or a start beside a sleeping engine that did not
            # fit (what a sleeping vLLM keeps on the device: its CUDA context, graphs): the call again in a fresh
            # child with no other alive, as without sleeping.
            print(f"the {role} model's engine failed beside a sleeping one ({error}): started again alone", flush=True)
            for name in [role, *sleeping]:
                if name in self._sessions:
                    self._close(name)
            session = self._sessions[role] = Session(log_path=self.logs / log_name, on_event=self.on_event)
            result, peak_mb = session.call(f"{self.jobs_module}:{job}", kwargs, stage=stage, label=role)
        self._asleep.discard(role)  # the job woke it
        if result.get("engine_start") is not None:
            self.starts.append(result["engine_start"])
            self._can_sleep[role] = bool(result["engine_start"].get("sleep_mode"))
        return result, peak_mb

    def _give_way(self, role: str, options: EngineOptions) -> None:
        """The child of `role` frees the accelerator for the other model's: asleep if it can and may be called
        again, else closed (also when its sleep fails: the other model starts either way)."""
        if self.keep_both and self._can_sleep.get(role) and room_to_sleep(self._model_dirs[role], options):
            try:
                result, _ = self._sessions[role].call(f"{self.jobs_module}:sleep_job", {}, stage="evaluate",
                                                      label=role)
            except PipelineError as error:
                print(f"the {role} model's engine could not sleep ({error}): closed instead", flush=True)
            else:
                if result["asleep"]:
                    self._asleep.add(role)
                    self.sleeps.append({"role": role, "seconds": result["seconds"]})
                    return
        self._close(role)

    def _close(self, role: str) -> None:
        self._sessions.pop(role).close()
        self._asleep.discard(role)
        if self.role == role:
            self.role = None

    def close(self) -> None:
        for role in list(self._sessions):
            self._close(role)


def _cache_file(base_digest: str, what: str, engine_version: str, options: EngineOptions, suffix: str) -> Path:
    """A cached base-model figure: keyed by what it is and everything of the engine that changes it."""
    mode = "eager" if options.enforce_eager else "compiled"
    key = f"{what}-{options.dtype}-{options.engine}-{engine_version}-{mode}"
    return cache_root() / "baselines" / base_digest[:32] / f"{key}{suffix}"


def _baseline_path(base_digest: str, task: str, limit: int | None, engine_version: str, options: EngineOptions) -> Path:
    limit_key = limit if limit is not None else "all"
    return _cache_file(base_digest, f"v2-{task}-limit{limit_key}", engine_version, options, ".json")


def _divergence_reference_path(base_digest: str, text: str, limit: int | None, engine_version: str,
                               options: EngineOptions) -> Path:
    what = (f"v1-divergence-{text}-limit{limit if limit is not None else 'all'}-tokens{divergence.MAX_TOKENS_PER_TEXT}"
            f"-top{divergence.TOP_K}")
    return _cache_file(base_digest, what, engine_version, options, ".safetensors")


def _completion_perplexities_path(base_digest: str, engine_version: str, options: EngineOptions) -> Path:
    return _cache_file(base_digest, "v1-completion-perplexities", engine_version, options, ".json")


def _completion_key(prompt: str, completion: str) -> str:
    # Greedy generations of the same export repeat exactly, so a rerun finds its scores here.
    return hashlib.sha256(json.dumps([prompt, completion]).encode()).hexdigest()


def _limits(recipe: Recipe) -> dict[str, int | None]:
    spec = recipe.evaluation
    limits: dict[str, int | None] = {task: spec.limit for task in spec.tasks}
    if spec.perplexity_text is not None:
        limits[spec.perplexity_text] = spec.perplexity_limit
    return limits


def _write_samples(out_dir: Path, role: str, figures: dict[str, dict]) -> None:
    with open(out_dir / f"{role}-samples.jsonl", "w", encoding="utf-8") as handle:
        for task, entry in figures.items():
            for doc_id, value in entry["per_doc"]:
                handle.write(json.dumps({"task": task, "doc_id": doc_id, "value": value}) + "\n")


def serve_and_evaluate(
    recipe: Recipe, base_model_dir: Path, model_dir: Path, serve_dir: Path, out_dir: Path, logs: Path, *,
    engine_name: str = EngineName.VLLM, device: str = "cpu", refresh_baseline: bool = False, on_event: Emit | None = None,
) -> tuple[StageRecord, StageRecord]:
    """serve's and evaluate's records (evaluate's summary: the Evaluation's JSON, its engine starts included).

    One child for the export (serve + evaluate work on one load), then one for the base model
    only when one of its figures is not cached; the gate's later rounds reuse whichever child is alive
    (see EngineChildren)."""
    # Both models' children are kept only when a later round may need them again: one round, and each runs once.
    rounds_may_follow = bool(_accuracy_tasks(recipe)) and len(_round_schedule(recipe)) > 1
    with EngineChildren(logs, on_event, keep_both=rounds_may_follow) as children:
        return _serve_and_evaluate(recipe, base_model_dir, model_dir, serve_dir, out_dir, logs, children,
                                   engine_name=engine_name, device=device, refresh_baseline=refresh_baseline,
                                   on_event=on_event)


def _serve_and_evaluate(recipe: Recipe, base_model_dir: Path, model_dir: Path, serve_dir: Path, out_dir: Path,
                        logs: Path, children: EngineChildren, *, engine_name: str, device: str, refresh_baseline: bool,
                        on_event: Emit | None) -> tuple[StageRecord, StageRecord]:
    started = time.perf_counter()
    engine_version = engines.version(engine_name)
    limits = _limits(recipe)
    spec = recipe.evaluation
    base_digest = tree_digest(base_model_dir)
    base_options = engine.engine_options(recipe, quantized=False, engine_name=engine_name, device=device)
    texts = divergence.heldout_texts(spec.divergence_text, spec.divergence_limit) if spec.divergence_text else None
    quantized_top = out_dir / "quantized-top-logprobs.safetensors"

    exported, export_peak = children.call(
        "quantized", "export_job",
        {"model_dir": str(model_dir),
         "engine_options": engine.engine_options(recipe, quantized=True, engine_name=engine_name, device=device).to_json(),
         "prompts": list(spec.prompts), "max_new_tokens": spec.max_new_tokens, "tasks": limits,
         "divergence_texts": texts, "serve_dir": str(serve_dir), "top_logprobs_path": str(quantized_top)},
        log_name="serve.log", stage="serve",
    )
    serve_figures = exported["serve"]

    # What of the base is cached; the base's child does the rest.
    base: dict[str, dict] = {}
    if not refresh_baseline:
        for task, limit in limits.items():
            cached = _baseline_path(base_digest, task, limit, engine_version, base_options)
            if cached.is_file():
                base[task] = read_json(cached)
            elif (stored := _base_from_store(task, limit, base_digest, engine_version, base_options)) is not None:
                base[task] = stored
    missing = {task: limit for task, limit in limits.items() if task not in base}
    reference = None
    if texts is not None:
        reference = _divergence_reference_path(base_digest, spec.divergence_text, spec.divergence_limit, engine_version,
                                               base_options)
    build_reference = reference is not None and (refresh_baseline or not reference.is_file())
    scores_path = _completion_perplexities_path(base_digest, engine_version, base_options)
    scores = {} if refresh_baseline or not scores_path.is_file() else read_json(scores_path)
    pairs = [[item["prompt"], item["completion"]] for item in serve_figures["completions"]]
    # The base scores the export's completions only for the rule that reads the scores: no base start for them
    # otherwise (a sweep's variants each generate new completions).
    scored = recipe.gates.no_garbage and recipe.gates.garbage_max_completion_perplexity is not None
    unscored = [pair for pair in pairs if _completion_key(*pair) not in scores] if scored else []
    timings: dict = {}
    base_peak = 0.0
    if missing or unscored or build_reference:
        computed, base_peak = children.call(
            "base", "base_job",
            {"model_dir": str(base_model_dir), "engine_options": base_options.to_json(), "tasks": missing,
             "score_texts": unscored, "divergence_texts": texts if build_reference else None,
             "reference_path": str(reference) if build_reference else None},
            log_name="evaluate.log", stage="evaluate",
        )
        if build_reference:
            timings["token divergence: base reference"] = computed["divergence_reference"]["seconds"]
        if unscored:
            timings["base perplexity of completions"] = computed["completion_perplexities_seconds"]
            scores |= {_completion_key(*pair): value
                       for pair, value in zip(unscored, computed["completion_perplexities"])}
            atomic_write_json(scores_path, scores)
        for task, figures in computed["tasks"].items():
            atomic_write_json(_baseline_path(base_digest, task, limits[task], engine_version, base_options), figures)
            base[task] = figures

    quantized = exported["tasks"]
    timings |= {f"lm-eval {task}: base": base[task]["seconds"] for task in missing}
    timings |= {f"lm-eval {task}: quantized": figures["seconds"] for task, figures in quantized.items()}
    _write_samples(out_dir, "base", base)
    _write_samples(out_dir, "quantized", quantized)
    perplexities = [scores[_completion_key(*pair)] for pair in pairs] if scored else None
    evaluation = Evaluation(
        engine=engine_name,
        engine_version=engine_version,
        engine_starts=children.starts,
        baseline=BaselineSource(
            model_sha256=base_digest,
            cached_tasks=sorted(set(limits) - set(missing)),
            computed_tasks=sorted(missing),
            completion_perplexities_cached=not unscored,
        ),
        limits=limits,
        tasks={task: _comparison(task, base[task], quantized[task]) for task in spec.tasks},
        completion_perplexities_under_base=perplexities,
    )
    if reference is not None:
        figures = divergence.compare(str(reference), str(quantized_top))
        quantized_top.unlink()  # compared: its figures are in divergence-per-token.json
        atomic_write_json(out_dir / "divergence-per-token.json", figures.pop("per_token"))
        evaluation.divergence = Divergence(
            **figures, text=spec.divergence_text, limit=spec.divergence_limit, base_reference_cached=not build_reference,
            method=f"{engine_name} top-{divergence.TOP_K} next-token log-probs of both models; KL is the larger "
                   "of two lower bounds of the full-vocabulary KL (see metrics.topk_token_kl)",
        )
        timings["token divergence: quantized"] = round(exported["top_logprobs"]["seconds"] + figures["seconds"], 2)
    evaluation.timings_s = timings
    text = spec.perplexity_text
    if text is not None:
        evaluation.perplexity = Perplexity(text=text, base=base[text]["metrics"].get("word_perplexity"),
                                           quantized=quantized[text]["metrics"].get("word_perplexity"))
    more_rounds(recipe, evaluation, base, quantized, serve_figures, out_dir, children, started, model_dir=model_dir,
                base_model_dir=base_model_dir, options=engine.engine_options(
                    recipe, quantized=True, engine_name=engine_name, device=device), base_options=base_options,
                base_digest=base_digest, engine_version=engine_version)
    children.close()  # the baselines below load models of their own
    evaluation.engine_starts = list(children.starts)  # the gate's later rounds' starts too
    if recipe.baselines:  # evaluation-only columns (not gated), after the gate's own evidence is in
        evaluation.baselines = {
            name: BaselineColumn.model_validate(column)
            for name, column in baselines.evaluate_baselines(recipe, base, base_model_dir, logs, engine_name=engine_name,
                                                             device=device, on_event=on_event).items()
        }
        evaluation.timings_s |= {f"baseline {name}": column.seconds for name, column in evaluation.baselines.items()}
    (out_dir / "evaluate.json").write_text(json.dumps(evaluation.to_json(), indent=2, sort_keys=True) + "\n")
    wall_s = time.perf_counter() - started
    # The export's child did serve's work first: its seconds are serve's; the rest is evaluate's.
    return (StageRecord(summary=serve_figures, wall_s=exported["serve_s"], peak_rss_mb=export_peak),
            StageRecord(summary=evaluation.to_json(), wall_s=wall_s - exported["serve_s"],
                        peak_rss_mb=max(export_peak, base_peak)))


def _comparison(task: str, base: dict, quantized: dict) -> TaskComparison:
    """Both models' figures on a task and, for an accuracy task, their paired comparison."""
    paired = paired_comparison(task, base, quantized)
    return TaskComparison(base=base["metrics"], quantized=quantized["metrics"],
                          paired=None if paired is None else PairedComparison.model_validate(paired))


def _base_from_store(task: str, limit: int | None, base_digest: str, engine_version: str,
                     options: EngineOptions) -> dict | None:
    """The base's figures for the first `limit` questions of an accuracy task from the per-question store
    (filled by earlier rounds and runs with other limits), when it holds every one of them; else None."""

    if lm_eval_tasks.gated_metric(task) != "acc" or task.startswith(lm_eval_tasks.REGISTRY_PREFIX):
        return None
    size = lm_eval_tasks.split_size(task)
    doc_ids = range(size if limit is None else min(limit, size))
    store = QuestionStore.for_base(base_digest, task, engine_version, options.to_json())
    if store.missing(doc_ids):
        return None
    per_doc = store.lookup(doc_ids)
    return {"metrics": _accuracy_figures(per_doc), "per_doc": per_doc, "seconds": 0.0, "from_question_store": True}


def _accuracy_figures(per_doc: list) -> dict:
    values = [value for _, value in per_doc]
    return {"acc": sum(values) / len(values) if values else None, "samples": len(values)}


def _accuracy_tasks(recipe: Recipe) -> list[str]:
    return [task for task in recipe.evaluation.tasks if lm_eval_tasks.gated_metric(task) == "acc"]


def _round_schedule(recipe: Recipe) -> tuple:
    """The gate's planned rounds (verdict/sequential.py) for the recipe's accuracy tasks."""
    spec = recipe.evaluation
    known_sizes = [size for size in map(lm_eval_tasks.split_size, _accuracy_tasks(recipe)) if size is not None]
    return sequential.round_schedule(spec.limit, spec.max_limit, max(known_sizes) if known_sizes else None)


def more_rounds(recipe: Recipe, evaluation: Evaluation, base: dict, quantized: dict, serve_figures: dict, out_dir: Path,
                children: EngineChildren, started: float, *, model_dir: Path, base_model_dir: Path,
                options: EngineOptions, base_options: EngineOptions, base_digest: str, engine_version: str) -> None:
    """The gate's sequential evaluation: while an accuracy rule is inconclusive, evaluate the next round's
    questions (the schedule of quantize_pipeline/verdict/sequential.py, up to evaluation.max_limit and time_budget_s) on
    the export, and on the base only for questions its per-question store lacks; update `evaluation`,
    `base`, `quantized` and the per-question files in place. Records the rounds in evaluation.sequential."""

    spec = recipe.evaluation
    accuracy_tasks = _accuracy_tasks(recipe)
    sizes = {task: lm_eval_tasks.split_size(task) for task in accuracy_tasks}
    schedule = _round_schedule(recipe)
    stores = {task: QuestionStore.for_base(base_digest, task, engine_version, base_options.to_json())
              for task in accuracy_tasks}
    for task, store in stores.items():  # every base answer is kept per question, for later rounds and runs
        store.add(base[task]["per_doc"])
    evaluation.sequential = Rounds(looks_planned=len(schedule), rounds=[Round(
        limit={task: spec.limit for task in accuracy_tasks},
        questions={task: len(quantized[task]["per_doc"]) for task in accuracy_tasks})])
    rounds = evaluation.sequential.rounds
    done = 0
    completions = completion_texts(serve_figures)
    while True:
        rules = gate.evaluation_rules(recipe, evaluation, completions, evidence_dir=out_dir)
        states = {rule.rule: rule.state for rule in rules}
        asked = sum(len(quantized[task]["per_doc"]) for task in accuracy_tasks)
        seconds = sum(quantized[task]["seconds"] for task in accuracy_tasks)
        decision = sequential.next_round(
            schedule, done, states, elapsed_s=time.perf_counter() - started,
            seconds_per_question=seconds / asked if asked else None, time_budget_s=spec.time_budget_s,
            questions_done=max((len(quantized[task]["per_doc"]) for task in accuracy_tasks), default=0),
        )
        rounds[-1].decision = decision.reason
        if decision.stop:
            return
        done += 1
        wanted = {}
        for task in accuracy_tasks:
            asked_before = {doc_id for doc_id, _ in quantized[task]["per_doc"]}
            upto = min(decision.next_limit or sizes[task] or 0, sizes[task] or 10**9)
            if ids := [doc_id for doc_id in range(upto) if doc_id not in asked_before]:
                wanted[task] = ids
        if not wanted:  # every split is exhausted
            rounds[-1].decision = "every question of the split evaluated"
            return
        base_missing = {task: stores[task].missing(ids) for task, ids in wanted.items()}
        base_missing = {task: ids for task, ids in base_missing.items() if ids}

        def export_round() -> dict:
            return children.call("quantized", "round_job", {"model_dir": str(model_dir), "engine_options": options.to_json(),
                                                            "tasks": wanted, "role": "quantized"},
                                 log_name="serve.log", stage="evaluate")[0]

        def base_round() -> None:
            computed, _ = children.call("base", "round_job", {"model_dir": str(base_model_dir),
                                                              "engine_options": base_options.to_json(),
                                                              "tasks": base_missing, "role": "base"},
                                        log_name="evaluate.log", stage="evaluate")
            for task, figures in computed["tasks"].items():
                stores[task].add(figures["per_doc"])

        # Whichever model's child is alive goes first (the last one used, when both are): its engine is loaded.
        if base_missing and children.role == "base":
            base_round()
            extra = export_round()
        else:
            extra = export_round()
            if base_missing:
                base_round()
        for task, figures in extra["tasks"].items():
            quantized[task]["per_doc"] += figures["per_doc"]
            quantized[task]["seconds"] += figures["seconds"]
            base[task]["per_doc"] += stores[task].lookup(doc for doc, _ in figures["per_doc"])
            quantized[task]["metrics"] = _accuracy_figures(quantized[task]["per_doc"])
            base[task]["metrics"] = _accuracy_figures(base[task]["per_doc"])
            evaluation.tasks[task] = _comparison(task, base[task], quantized[task])
            evaluation.limits[task] = decision.next_limit
            evaluation.timings_s[f"lm-eval {task}: quantized"] = round(quantized[task]["seconds"], 2)
        rounds.append(Round(limit={task: decision.next_limit for task in accuracy_tasks},
                            questions={task: len(quantized[task]["per_doc"]) for task in accuracy_tasks},
                            base_questions_evaluated={task: len(ids) for task, ids in base_missing.items()}))
        _write_samples(out_dir, "base", base)
        _write_samples(out_dir, "quantized", quantized)
