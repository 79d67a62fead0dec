"""Order the stages, time them, measure their memory, write the manifest.

The runner process stays light (no torch): heavy stages run in child processes
via worker.call_isolated. Each stage writes only its own folder of the run
directory, staged and renamed into place when the stage succeeds.
"""

from __future__ import annotations

import dataclasses
import re
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NoReturn

import yaml
from filelock import FileLock
from pydantic import ValidationError

from quantize_pipeline import formats
from quantize_pipeline.engines.choice import EngineChoice, choose_engine, for_export_format
from quantize_pipeline.engines.names import EngineName
from quantize_pipeline.errors import EngineRefused, GateFailed, GateInconclusive, InputError, PipelineError, RecipeError
from quantize_pipeline.evaluate import evaluate
from quantize_pipeline.evaluate.baselines import from_cli
from quantize_pipeline.evaluate.record import Evaluation
from quantize_pipeline.formats.safetensors_header import folder_size
from quantize_pipeline.publish import publish
from quantize_pipeline.quantize import calibrate
from quantize_pipeline.quantize.quantize import layer_overrides, quantize_warnings
from quantize_pipeline.recipe import checks, devices, layers, models, schemes
from quantize_pipeline.recipe.schema import Recipe, apply_settings, field_path, load_recipe
from quantize_pipeline.run.events import Emit, no_events, safe
from quantize_pipeline.run.manifest import MANIFEST_FILE, Manifest
from quantize_pipeline.run.resume import (
    ENGINE_STAGES,
    QUARK_STAGES,
    STAGE_FOLDERS,
    STAGES,
    reusable_stages,
    stage_config_sha256,
    unmatched_outputs,
)
from quantize_pipeline.run.rundir import (
    RunLocked,
    atomic_write_text,
    locked,
    read_json,
    remove_stale_temps,
    staged_folder,
    tree_digest,
)
from quantize_pipeline.run.stage_record import StageRecord
from quantize_pipeline.run.unfinished import describe, unfinished_run
from quantize_pipeline.run.worker import call_isolated
from quantize_pipeline.verdict import gate
from quantize_pipeline.verdict.record import Report, Verdict
from quantize_pipeline.verdict.run_facts import EngineLabel, ExportSize, RunFacts
from quantize_pipeline.verify import verify

ROOT_REPORT_FILES = ("report.json", "report.md", "accuracy.png")
# A streaming quantize keeps its finished layers here until the export is complete (layer-level resume).
STREAM_STATE_FOLDER = "quantize-layers"
# Export <= base size (quantization only shrinks weights), plus staging and headroom.
DISK_SAFETY_FACTOR = 1.5


@dataclass
class RunResult:
    run_dir: Path
    report: Report | None = None
    published_to: str | None = None
    stage_records: dict = field(default_factory=dict)
    stopped_after: str | None = None  # `run --until STAGE`: the run stopped cleanly after this stage

    @property
    def verdict(self) -> str:
        return self.report.verdict if self.report else "not reached"


Say = Callable[[str], None]


class StoppedAfter(Exception):
    """Control flow, not an error: `--until STAGE` was reached; the run folder is complete up to there."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


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


def check_engine(recipe: Recipe, recipe_path: Path) -> EngineChoice:
    """The engine for this recipe, and the recipe checked against this machine's devices and its
    local model (if any): a device torch cannot see is refused here, before anything loads."""
    choice = choose_engine(recipe, recipe_path)
    choice = dataclasses.replace(choice, device=devices.resolve_device(recipe.resources, str(recipe_path)))
    model_dir = checks.local_model_dir(recipe)
    if model_dir is not None:
        for field_path, problem in checks.model_problems(recipe, model_dir):
            raise RecipeError(str(recipe_path), field_path, problem)
    for index, baseline in enumerate(recipe.baselines):  # before hours of work, not at the end of them
        if baseline.checkpoint is not None and not (Path(baseline.checkpoint) / "config.json").is_file():
            raise RecipeError(str(recipe_path), f"baselines.{index}.checkpoint",
                              f"{baseline.checkpoint}: not a model folder (no config.json)")
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
    if models.is_prepared(model_dir):
        return model_dir
    # Runs that start together on one machine (CI's test workers, a sweep) convert once: the others wait
    # here, then find it prepared, instead of swapping the folder under a reader.
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(model_dir.parent / f".{model_dir.name}.lock")):
        if not models.is_prepared(model_dir):
            gguf_path = models.gguf_file(spec)
            say(f"converting {gguf_path.name} to HF safetensors (once per machine) -> {model_dir}")
            call_isolated(
                "quantize_pipeline.recipe.models:convert_gguf",
                {"gguf_path": str(gguf_path), "output_dir": str(model_dir), "dtype": spec.dtype},
                log_path=log_path, stage="prepare", on_event=on_event,
            )
    return model_dir


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
        self.until: str | None = None  # `--until STAGE`: stop cleanly once this stage is recorded

    def folder(self, stage: str) -> Path:
        return self.export_dir if stage == "export" else self.run_dir / STAGE_FOLDERS[stage]

    def log(self, stage: str) -> Path:
        return self.run_dir / "logs" / f"{stage}.log"

    def _reuse(self, stage: str) -> dict | None:
        """The summary of a stage kept from an earlier run, re-recorded in this run's manifest."""
        record = self.reusable.get(stage)
        if record is None:
            return None
        self.manifest.record_reused(stage, record)
        self.emit({"event": "stage_reused", "stage": stage})
        self.result.stage_records[stage] = record
        self.say(f"↷ {stage:<9} kept from the earlier run (inputs unchanged, outputs verified)")
        self._stop_if_until(stage)
        return record["summary"]

    def _record(self, stage: str, done: StageRecord) -> None:
        record = {
            "status": "done",
            "wall_s": round(done.wall_s, 2),
            "peak_rss_mb": round(done.peak_rss_mb, 1),
            "log": f"logs/{stage}.log",
            "config_sha256": stage_config_sha256(self.recipe, stage, self.engine_choice.name),
            "summary": done.summary,
        }
        log = self.log(stage)
        log.parent.mkdir(exist_ok=True)
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"[{stage}] done in {done.wall_s:.2f} s, peak RSS {done.peak_rss_mb:.0f} MiB\n")
        self.manifest.record_stage(stage, record, STAGE_FOLDERS[stage])
        self.result.stage_records[stage] = record
        self.emit({"event": "stage_end", "stage": stage, "wall_s": record["wall_s"], "peak_rss_mb": record["peak_rss_mb"]})
        self.say(f"✓ {stage:<9} {done.wall_s:7.1f} s  peak RSS {done.peak_rss_mb:7.0f} MiB")
        self._stop_if_until(stage)

    def _stop_if_until(self, stage: str) -> None:
        if stage == self.until:
            raise StoppedAfter(stage)

    def _stage(self, stage: str, work: Callable[[Path], tuple[dict, float | None]]) -> dict:
        """Run one stage into its staged folder, or keep it from the earlier run; record it.
        `work(out_dir)` returns (summary, peak RSS in MiB of its child processes, or None: this process)."""
        if (kept := self._reuse(stage)) is not None:
            return kept
        self.emit({"event": "stage_start", "stage": stage})
        started = time.perf_counter()
        with staged_folder(self.folder(stage)) as out_dir:
            summary, peak_mb = work(out_dir)
        self._record(stage, StageRecord(summary=summary, wall_s=time.perf_counter() - started,
                                        peak_rss_mb=_self_peak_rss_mb() if peak_mb is None else peak_mb))
        return summary

    def _in_process(self, stage: str, work: Callable[[Path], dict]) -> dict:
        return self._stage(stage, lambda out_dir: (work(out_dir), None))

    def execute(self) -> RunResult:
        """Every stage: calibrate .. publish."""
        self._prepare()
        self._in_process("calibrate", lambda out: calibrate.calibrate(self.recipe, self.base_model_dir, out))
        self._quark_stages()
        quantized = read_json(self.folder("quantize") / "quantize.json")
        linear_layers = quantized["linear_layer_names"]
        return self._verify_to_publish(
            linear_layers, layer_overrides(self.recipe, linear_layers, quantized["excluded_layers"]))

    def check(self, export_dir: Path) -> RunResult:
        """verify .. gate on an export made elsewhere (no publish)."""
        return self._verify_to_publish(*self._take_export(export_dir), publish_stage=False)

    def verify_only(self, export_dir: Path) -> dict:
        """The verify stage alone on an export made elsewhere (`check` before it refuses the engine)."""
        return self._verify(*self._take_export(export_dir))

    def _take_export(self, export_dir: Path) -> tuple[list[str], dict[str, schemes.SchemeSpec]]:
        """An export made elsewhere as this run's: recorded, with the base's layers and the recipe's overrides."""
        self.export_dir = export_dir.resolve()
        self._prepare()
        self.manifest.set("checked_export", {"path": str(self.export_dir), "sha256": tree_digest(self.export_dir)})
        linear_layers = checks.weight_layer_names(self.base_model_dir)
        excluded = layers.select(linear_layers, self.recipe.quantization.kept)
        return linear_layers, layer_overrides(self.recipe, linear_layers, excluded)

    def _verify(self, linear_layers: list[str], overrides: dict[str, schemes.SchemeSpec]) -> dict:
        return self._in_process("verify", lambda out: verify.verify(
            self.recipe, self.base_model_dir, self.folder("export"), linear_layers, out, overrides,
        ))

    def _prepare(self) -> None:
        atomic_write_text(self.run_dir / "recipe.yaml", yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False))
        self.base_model_dir = resolve_base_model(self.recipe, self.log("prepare"), self.say, self.emit)
        self.manifest.set("base_model", {
            "source": self.recipe.model.source, "path": str(self.base_model_dir), "sha256": tree_digest(self.base_model_dir),
        })

    def _verify_to_publish(self, linear_layers: list[str], overrides: dict[str, schemes.SchemeSpec], *,
                           publish_stage: bool = True) -> RunResult:
        recipe = self.recipe
        export = self._verify(linear_layers, overrides)
        serve, evaluation = self._serve_and_evaluate()
        facts = RunFacts(
            run_dir=str(self.run_dir), base_model=self.manifest.base_model,
            export=ExportSize(**{key: export[key] for key in ("export_size_bytes", "base_size_bytes", "size_ratio")}),
            serve=serve, engine=EngineLabel(self.engine_choice.name, self.engine_choice.label),
            packages=self.manifest.packages, quantize_warnings=self._quantize_warnings(),
        )
        # The manifest keeps the report as the gate's summary: a resumed run reads it back from there.
        report = Report.model_validate(self._in_process("gate", lambda out: gate.gate(recipe, facts, evaluation, out).to_json()))
        for name in ROOT_REPORT_FILES:
            if (self.folder("gate") / name).is_file():  # no plot when no task accuracy was measured
                shutil.copy2(self.folder("gate") / name, self.run_dir / name)
        self.result.report = report
        if report.verdict == Verdict.INCONCLUSIVE:
            raise GateInconclusive(f"gate inconclusive: {', '.join(report.inconclusive_rules)} (interval straddles "
                                   "the threshold; see report.md for how many more questions); nothing published",
                                   stage="gate")
        if report.verdict != Verdict.PASS:
            raise GateFailed(f"gate failed: {', '.join(report.failed_rules)}; nothing published", stage="gate")
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
            shutil.rmtree(self.run_dir / STREAM_STATE_FOLDER, ignore_errors=True)  # a kill's leftover, if any
            return
        self._check_disk_space()
        # freeze and export run in the same child: their stage_end events follow quantize's.
        self.emit({"event": "stage_start", "stage": "quantize"})
        folders = {stage: self.folder(stage) for stage in ("quantize", "freeze", "export")}
        with staged_folder(folders["quantize"]) as quantize_dir, staged_folder(folders["freeze"]) as freeze_dir, \
                staged_folder(folders["export"]) as model_dir:
            records, _ = call_isolated(
                "quantize_pipeline.quantize.stage:quantize_freeze_export",
                {
                    "recipe": self.recipe.model_dump(mode="json"),
                    "model_dir": str(self.base_model_dir),
                    "calibrate_dir": str(self.folder("calibrate")),
                    "out_dirs": {"quantize": str(quantize_dir), "freeze": str(freeze_dir), "model": str(model_dir)},
                    "state_dir": str(self.run_dir / STREAM_STATE_FOLDER),
                    "device": self.engine_choice.device,
                },
                log_path=self.log("quantize"), stage="quantize", on_event=self.emit,
            )
        try:
            for stage in ("quantize", "freeze", "export"):
                self._record(stage, StageRecord.model_validate(records[stage]))
        finally:  # recording export may stop the run (--until export): the state goes all the same
            # Only now, with the export renamed into place and recorded, is the layer (or shard) state not needed.
            if "export" in self.result.stage_records:
                shutil.rmtree(self.run_dir / STREAM_STATE_FOLDER, ignore_errors=True)

    def _quantize_warnings(self) -> tuple[str, ...]:
        """quantize.json's findings a reader of the report must see (none for `check`: no quantize stage)."""
        summary_path = self.folder("quantize") / "quantize.json"
        return quantize_warnings(read_json(summary_path)) if summary_path.is_file() else ()

    def _serve_and_evaluate(self) -> tuple[dict, Evaluation]:
        """serve and evaluate share the export's engine load (one child): two records, kept or redone together."""
        if all(stage in self.reusable for stage in ENGINE_STAGES):
            return self._reuse("serve"), Evaluation.model_validate(self._reuse("evaluate"))
        for stage in ENGINE_STAGES:
            self.emit({"event": "stage_start", "stage": stage})
        with staged_folder(self.folder("serve")) as serve_dir, staged_folder(self.folder("evaluate")) as evaluate_dir:
            served, evaluated = evaluate.serve_and_evaluate(
                self.recipe, self.base_model_dir, self.folder("export"), serve_dir, evaluate_dir, self.run_dir / "logs",
                engine_name=self.engine_choice.name, device=self.engine_choice.device, refresh_baseline=self.refresh_baseline,
                on_event=self.emit,
            )
        evaluation = Evaluation.model_validate(evaluated.summary)
        for start in evaluation.engine_starts:
            self.say(f"  engine start: {start['role']} model in {start['engine']}: load {start['load_s']:.1f} s "
                     f"(+ import {start['import_s']:.1f} s)")
        self._record("serve", served)
        self._record("evaluate", evaluated)
        return served.summary, evaluation


def _execute(current: Run, work: Callable[[], RunResult]) -> RunResult:
    try:
        with locked(current.run_dir):
            result = work()
    except RunLocked as exc:
        raise InputError(str(exc)) from None
    except StoppedAfter as stop:
        current.manifest.finish("stopped")
        current.emit({"event": "run_stopped", "after": stop.stage, "run_dir": str(current.run_dir)})
        current.result.stopped_after = stop.stage
        return current.result
    except PipelineError as exc:
        current.manifest.record_error(exc.stage, exc.one_line(), exc.exit_code)
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
           emit: Emit = no_events, export_format: str | None = None, choice: EngineChoice | None = None) -> Run:
    """A new run folder and its Run; the engine checked here unless `choice` is given."""
    choice = choice or for_export_format(check_engine(recipe, recipe_path), export_format)
    run_dir, run_id = new_run_dir(output_root, recipe)
    say(f"run directory: {run_dir}")
    say(f"engine: {choice.label}; device: {choice.device}")
    current = Run(recipe, recipe_path, run_dir, run_id, say, choice, refresh_baseline=refresh_baseline, emit=emit)
    current.manifest.set("engine", {"name": choice.name, "label": choice.label, "device": choice.device})
    current.emit({"event": "run_start", "run_dir": str(run_dir), "resumed": False})
    return current


def run(recipe_path: Path, *, output_root: Path, say: Say, refresh_baseline: bool = False,
        new_run: bool = False, emit: Emit = no_events, settings: tuple[str, ...] = (),
        until: str | None = None) -> RunResult:
    """Run every stage of a recipe. Raises PipelineError (with an exit code) on failure.

    An unfinished run of the same recipe under OUTPUT_DIR/<name>/ (killed, crashed) is
    resumed rather than started over, unless `new_run`. `settings`: `--set FIELD=VALUE` over the recipe
    (part of its content: the run's recipe.yaml and hash carry them)."""
    recipe = load_recipe(recipe_path, settings)
    if not new_run and (earlier := unfinished_run(output_root / recipe.name, recipe.content_hash())) is not None:
        say(f"resuming unfinished run {earlier} ({describe(earlier)}); --new-run starts over")
        return resume(earlier, recipe_path, say=say, refresh_baseline=refresh_baseline, emit=emit, settings=settings,
                      until=until)
    current = _start(recipe, recipe_path, output_root, say, refresh_baseline, emit)
    current.until = until
    return _execute(current, current.execute)


def resume(run_dir: Path, recipe_path: Path | None, *, say: Say, from_stage: str | None = None,
           refresh_baseline: bool = False, emit: Emit = no_events, settings: tuple[str, ...] = (),
           until: str | None = None) -> RunResult:
    """Finish an earlier run of RECIPE in RUN_DIR: keep the stages whose inputs did not change and
    whose outputs verify against its manifest; rerun the rest (from `from_stage` at the latest).
    No RECIPE: the run folder's own recipe.yaml (a run stopped by `--until`, copied to another machine).
    A stopped run is finished only if every finished stage's outputs match the manifest."""
    manifest_path = run_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise InputError(f"{run_dir}: no {MANIFEST_FILE}: not a run directory")
    recipe_path = recipe_path if recipe_path is not None else run_dir / "recipe.yaml"
    recipe = load_recipe(recipe_path, settings)
    previous = read_json(manifest_path)
    if previous.get("status") == "stopped" and (unmatched := unmatched_outputs(previous, run_dir)):
        raise InputError(f"{manifest_path}: {unmatched[0]} does not match its sha256 in the manifest "
                         f"({len(unmatched)} file(s) missing or changed since the run stopped): not resumed")
    if previous.get("recipe") != recipe.name:
        raise InputError(f"{run_dir}: a run of recipe '{previous.get('recipe')}', not '{recipe.name}'")
    choice = check_engine(recipe, recipe_path)
    say(f"resuming run directory: {run_dir}")
    say(f"engine: {choice.label}")
    current = Run(recipe, recipe_path, run_dir, previous.get("run_id", run_dir.name), say, choice,
                  refresh_baseline=refresh_baseline, emit=emit)
    current.until = until

    def work() -> RunResult:
        # Under the lock: a run still being written keeps its manifest.
        current.manifest.set("engine", {"name": choice.name, "label": choice.label, "device": choice.device})
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


def publish_finished_run(run_dir: Path, recipe: Recipe, report: Report) -> dict:
    """`publish RUN_DIR`: publish a passed run later and record the stage in its manifest as `run`
    would, so that a later resume keeps it instead of publishing again."""
    try:
        with locked(run_dir):
            started = time.perf_counter()
            with staged_folder(run_dir / STAGE_FOLDERS["publish"]) as out_dir:
                summary = publish.publish(recipe, run_dir, report, out_dir)
            wall_s = time.perf_counter() - started
            manifest = Manifest.load(run_dir)
            engine_name = manifest.engine_name(default=recipe.evaluation.engine)
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


def check_run_name(export_dir: Path) -> str:
    """check-<export folder name>, in the characters a recipe name allows."""
    return "check-" + re.sub(r"[^A-Za-z0-9._-]", "-", export_dir.resolve().name)[:94]


def check(export_dir: Path, base_source: str, recipe_path: Path | None, *, output_root: Path, say: Say,
          refresh_baseline: bool = False, emit: Emit = no_events, baselines: tuple[str, ...] = (),
          settings: tuple[str, ...] = ()) -> RunResult:
    """verify -> serve -> evaluate -> gate on an existing export, with the recipe's (or default) rules."""

    config_path = export_dir / "config.json"
    if not config_path.is_file():
        raise InputError(f"{export_dir}: not a model folder (no config.json)")
    quantization_config = read_json(config_path).get("quantization_config")
    if not isinstance(quantization_config, dict):
        raise InputError(f"{config_path}: quantization_config: missing: not a quantized export")
    try:  # any format quantize_pipeline.formats reads; the scheme, KV cache and ignore list come from its config
        claimed = formats.claim(quantization_config) if recipe_path is None else formats.adapter_for(quantization_config)
    except formats.FormatError as exc:
        raise InputError(f"{config_path}: {exc}") from None
    if recipe_path is not None:
        base_recipe = load_recipe(recipe_path, settings)
        data = base_recipe.model_dump(mode="json")
    else:
        data = {"quantization": {
            "scheme": schemes.recipe_value(claimed.scheme), "kv_cache": claimed.kv_cache, "exclude": list(claimed.exclude),
        }}
        recipe_path = config_path
        data = apply_settings(data, settings, str(recipe_path))
    # A check run lives in a folder of its own, whatever recipe supplies the rules: never among the real
    # runs of that recipe, where "the newest run of this recipe" (automatic resume, scripts) would pick it.
    data["name"] = check_run_name(export_dir)
    data["model"] = {**data.get("model", {}), "source": base_source}
    data["publish"] = None
    if baselines:
        data["baselines"] = [*data.get("baselines", []), *from_cli(baselines)]
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise RecipeError(str(recipe_path), field_path(error["loc"]), error["msg"]) from None
    try:
        current = _start(recipe, recipe_path, output_root, say, refresh_baseline, emit,
                         export_format=quantization_config.get("quant_method"))
    except EngineRefused as refusal:
        # Verify first: it costs seconds and is the answer to a mislabelled checkpoint (exit 3 naming the tensor
        # that gives it away), whatever engine could serve the scheme its config claims on this machine.
        _verify_before_refusing(recipe, recipe_path, export_dir, output_root, say, emit, refusal)
    return _execute(current, lambda: current.check(export_dir))


def _verify_before_refusing(recipe: Recipe, recipe_path: Path, export_dir: Path, output_root: Path, say: Say,
                            emit: Emit, refusal: EngineRefused) -> NoReturn:
    """`check` of an export no engine here can serve: verify it in a run folder of its own, then refuse."""
    current = _start(recipe, recipe_path, output_root, say, False, emit,
                     choice=EngineChoice(EngineName.NONE, f"refused, verifying the export first: {refusal.reason}", "none"))

    def verify_then_refuse() -> RunResult:
        current.verify_only(export_dir)
        raise refusal

    _execute(current, verify_then_refuse)
    raise AssertionError("unreachable: verify_then_refuse always raises")
