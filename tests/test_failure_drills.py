"""Failure drills on real resources: a full disk fails cleanly, before a half-written checkpoint;
kill -9 of the whole process tree at three points, then resume, gives the uninterrupted export."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from quantize_pipeline.run.rundir import hash_tree, sha256_file
from quantize_pipeline.run.runner import STAGES
from tests.ci_recipes import DIVERGENCE_PARAGRAPHS, PERPLEXITY_PARAGRAPHS, QUESTIONS, ci_sized
from tests.conftest import DEFAULT_RECIPE
from tests.test_end_to_end import run_dir_of, run_recipe

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MiB tmpfs (root, as in CI); the base model alone is ~260 MiB."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20M", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_full_disk_fails_with_a_clear_message_and_keeps_earlier_stages(small_disk, tmp_path):
    recipe = tmp_path / "smollm2-135m-int8.yaml"  # CI-sized: the export is what fails, not the calibration's size
    recipe.write_text(ci_sized(DEFAULT_RECIPE.read_text()))
    completed = run_recipe(recipe, small_disk)
    assert completed.returncode == 2, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert "not enough disk space for the export" in completed.stderr
    assert completed.stderr.count("error:") == 1 and "Traceback" not in completed.stderr
    run_dir = run_dir_of(completed)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"]["stage"] == "export"
    assert manifest["stages"]["calibrate"]["status"] == "done"
    assert (run_dir / "calibrate" / "tokens.jsonl").is_file()
    assert not (run_dir / "model").exists() and not list(run_dir.glob(".model.*"))


DRILL_NAME = "smollm2-135m-int8-drill"


def _drill_recipe(tmp_path: Path) -> Path:
    """The default recipe's model and quantization with 16 calibration samples (a calibration to kill, not 64
    samples' worth) and a cheap evaluation at the CI sizes of tests/ci_recipes.py (the base figures are
    cached), one prompt for the default run's 16 tokens (the same completions: their base perplexity is
    cached); lenient gates (20 questions give a noisy figure; the drill is about resume)."""
    text = DEFAULT_RECIPE.read_text()
    for old, new in (
        ("name: smollm2-135m-int8\n", f"name: {DRILL_NAME}\n"),
        ("  samples: 64", "  samples: 16"),
        ("limit: 200", f"limit: {QUESTIONS}"),
        ("max_limit: 1000", f"max_limit: {QUESTIONS}"),  # one look: the drill is about resume, not the rounds
        ("perplexity_limit: 100", f"perplexity_limit: {PERPLEXITY_PARAGRAPHS}"),
        ("enforce_eager: true", 'enforce_eager: true\n  prompts: ["The capital of France is"]\n  max_new_tokens: 16'),
        ("divergence_limit: 32", f"divergence_limit: {DIVERGENCE_PARAGRAPHS}"),
        ("min_recovery: 0.90", "min_recovery: 0.5"),
        ("max_perplexity_ratio: 1.10", "max_perplexity_ratio: 1.5"),
        ("max_mean_kl: 0.05", "max_mean_kl: 0.2"),
        ("min_top1_agreement: 0.85", "min_top1_agreement: 0.5"),
        ("exports/published/smollm2-135m-int8", f"exports/published/{DRILL_NAME}"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    recipe = tmp_path / f"{DRILL_NAME}.yaml"
    recipe.write_text(text)
    return recipe


def _stage_done(run_dir: Path, stage: str) -> bool:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return manifest["stages"].get(stage, {}).get("status") == "done"


def _staged(run_dir: Path, folder: str) -> list[Path]:
    """The hidden temp folders a stage writes into before they are renamed into place."""
    return list(run_dir.glob(f".{folder}.*.tmp"))


def _staged_has_files(run_dir: Path, folder: str) -> bool:
    try:
        return any(path.is_file() for staged in _staged(run_dir, folder) for path in staged.iterdir())
    except OSError:  # a stale one removed while we looked
        return False


def _log_has(run_dir: Path, stage: str, text: str) -> bool:
    log = run_dir / "logs" / f"{stage}.log"
    return log.is_file() and text in log.read_text(errors="replace")


def _after_kill(run_dir: Path, killed_stage: str, staged_folder: str) -> None:
    """What a crash leaves: the killed stage not done, its half-written folder hidden and never in the manifest."""
    from quantize_pipeline.run.rundir import is_locked

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "running"  # nobody got to record an end
    assert not is_locked(run_dir)  # the dead run's lock died with it: nothing stale blocks the resume
    assert not _stage_done(run_dir, killed_stage), killed_stage
    assert _staged(run_dir, staged_folder), f"no half-written .{staged_folder}.*.tmp left to test with"
    folder = "model" if killed_stage == "export" else killed_stage
    assert not (run_dir / folder).exists()
    for record in manifest["stages"].values():
        assert not any(name.startswith(".") or "/." in name for name in record.get("outputs", {}))


def kill_first_run_in_quantize(run_args: tuple[str, ...], exports: Path, tmp_path: Path, log_text: str,
                               what: str, timeout: int) -> Path:
    """Start `run`, wait until its quantize log says `log_text`, kill it like a crash; its run directory."""
    from tests.process_tree import CliRun

    first = CliRun(*run_args, cwd=tmp_path, logs=tmp_path / "cli-1")
    first.wait_for(lambda: any((exports / DRILL_NAME).glob("*/logs/quantize.log")), "the quantize stage", 600)
    run_dir = next((exports / DRILL_NAME).iterdir())
    first.wait_for(lambda: _log_has(run_dir, "quantize", log_text), what, timeout)
    first.kill_like_a_crash()
    return run_dir


def test_kill_9_at_quantize_export_and_evaluate_then_resume_gives_the_uninterrupted_export(tmp_path):
    """A machine crash (SIGKILL to the CLI and every stage child's session) three times over, each time resumed:
    the final export is byte-identical to an uninterrupted run's, and no half-written folder is ever kept."""
    from tests.process_tree import CliRun

    recipe = _drill_recipe(tmp_path)
    # In memory: Quark's calibration and a whole-model export are the windows this drill kills in (the default's
    # auto picks data_free, whose shards are drilled in tests/test_data_free.py).
    recipe.write_text(recipe.read_text().replace("quantization:\n", "quantization:\n  mode: in_memory\n", 1))
    exports = tmp_path / "exports"
    run_args = ("run", str(recipe), "--output-dir", str(exports))

    # 1. A fresh run, killed while Quark calibrates its quantizers.
    run_dir = kill_first_run_in_quantize(run_args, exports, tmp_path, "In-place OPs replacement start",
                                         "Quark to start quantizing", 600)
    _after_kill(run_dir, "quantize", "quantize")
    assert _stage_done(run_dir, "calibrate")

    # 2. `run` again: it resumes that run on its own (lock of the dead process taken over); killed mid-export.
    second = CliRun(*run_args, cwd=tmp_path, logs=tmp_path / "cli-2")
    second.wait_for(lambda: _staged_has_files(run_dir, "model"), "the export's first file", 900)
    second.kill_like_a_crash()
    assert f"resuming unfinished run {run_dir}" in second.stdout, second.stdout + second.stderr
    _after_kill(run_dir, "export", "model")
    assert len(list((exports / DRILL_NAME).iterdir())) == 1  # no second run directory

    # 3. An explicit --resume, killed while the export's engine (serve and evaluate: one child) works.
    third = CliRun("run", str(recipe), "--resume", str(run_dir), cwd=tmp_path, logs=tmp_path / "cli-3")
    third.wait_for(lambda: _log_has(run_dir, "serve", "quantize_pipeline.evaluate.evaluate:export_job"), "serve", 900)
    time.sleep(5)  # well into loading the model in vLLM
    third.kill_like_a_crash()
    _after_kill(run_dir, "evaluate", "evaluate")
    assert _stage_done(run_dir, "export") and not _stage_done(run_dir, "serve")
    assert not (run_dir / "report.json").exists()

    # 4. Resumed on its own once more, to the end, with machine-readable events.
    last = CliRun(*run_args, "--json", cwd=tmp_path, logs=tmp_path / "cli-4")
    assert last.wait(1800) == 0, last.stderr[-3000:]
    events = [json.loads(line) for line in last.stdout.splitlines()]  # nothing but JSON on stdout
    assert events[0] == {"event": "run_start", "run_dir": str(run_dir), "resumed": True}
    reused = [event["stage"] for event in events if event["event"] == "stage_reused"]
    assert reused == ["calibrate", "quantize", "freeze", "export", "verify"]
    assert {event["stage"] for event in events if event["event"] == "stage_end"} == {"serve", "evaluate", "gate", "publish"}
    # lm-eval's request bars came through the progress file (the base model's figures may be cached: quantized only).
    requests = [event for event in events if event["event"] == "progress" and event["task"] == "Running loglikelihood requests"
                and event["label"] == "quantized"]
    assert requests and requests[-1]["completed"] == requests[-1]["total"] > 0
    result = events[-1]
    assert result["event"] == "result" and result["verdict"] == "pass" and result["exit_code"] == 0
    assert result["run_dir"] == str(run_dir) and result["published"]

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "passed" and tuple(manifest["stages"]) == STAGES
    assert not [path.name for path in run_dir.iterdir() if path.name.endswith(".tmp") or ".old-" in path.name]
    for name, digest in manifest["files"].items():
        assert sha256_file(run_dir / name) == digest, name
    # The export, file by file, is what one uninterrupted quantize -> freeze -> export of the same inputs writes.
    assert hash_tree(run_dir / "model") == _uninterrupted_export(recipe, run_dir, tmp_path / "reference")


def _uninterrupted_export(recipe: Path, run_dir: Path, reference: Path) -> dict[str, str]:
    """sha256 of every file of an export made in one go (Quark's child, ~30 s) from the run's own inputs."""
    from quantize_pipeline.recipe.schema import load_recipe
    from quantize_pipeline.run.worker import call_isolated

    out_dirs = {folder: reference / folder for folder in ("quantize", "freeze", "model")}
    for folder in out_dirs.values():
        folder.mkdir(parents=True)
    call_isolated(
        "quantize_pipeline.quantize.stage:quantize_freeze_export",
        {"recipe": load_recipe(recipe).model_dump(mode="json"),
         "model_dir": json.loads((run_dir / "manifest.json").read_text())["base_model"]["path"],
         "calibrate_dir": str(run_dir / "calibrate"), "out_dirs": {name: str(path) for name, path in out_dirs.items()}},
        log_path=reference / "quantize.log", stage="quantize",
    )
    return hash_tree(out_dirs["model"])
