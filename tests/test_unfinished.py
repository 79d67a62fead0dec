"""Which earlier run `run RECIPE` resumes on its own: fabricated run directories, real locks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quantize_pipeline.recipe.schema import load_recipe
from quantize_pipeline.run.rundir import is_stale_temp, locked, remove_stale_temps
from quantize_pipeline.run.unfinished import describe, is_finished, unfinished_run
from tests.conftest import REPO

RECIPE_SHA = "a" * 64


def _fake_run(root: Path, name: str, *, status: str, started_at: str, recipe_sha256: str = RECIPE_SHA,
              error: dict | None = None, stages: tuple[str, ...] = ("calibrate",), recipe: str = "r") -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    manifest = {"recipe": recipe, "recipe_sha256": recipe_sha256, "run_id": name, "started_at": started_at,
                "status": status, "stages": {stage: {"status": "done"} for stage in stages}}
    if error is not None:
        manifest["error"] = error
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return run_dir


@pytest.mark.parametrize(("status", "exit_code", "finished"), [
    ("passed", None, True),
    ("failed", 3, True),       # gate or verify failed: a verdict, not an interruption
    ("failed", 4, True),       # gate inconclusive: a verdict too
    ("failed", 1, False),      # a stage crashed
    ("failed", 2, False),      # bad input at run time (e.g. disk full)
    ("crashed", None, False),
    ("running", None, False),  # killed: never finished
])
def test_finished_means_passed_or_failed_a_check(status, exit_code, finished):
    manifest = {"status": status, **({"error": {"exit_code": exit_code}} if exit_code else {})}
    assert is_finished(manifest) is finished


def test_the_newest_unfinished_run_of_the_same_recipe_is_picked(tmp_path):
    _fake_run(tmp_path, "20260101T000000Z-aaaaaaaa", status="running", started_at="2026-01-01T00:00:00+00:00")
    newest = _fake_run(tmp_path, "20260102T000000Z-aaaaaaaa", status="running", started_at="2026-01-02T00:00:00+00:00",
                       stages=("calibrate", "quantize", "freeze", "export"))
    _fake_run(tmp_path, "20260103T000000Z-bbbbbbbb", status="running", started_at="2026-01-03T00:00:00+00:00",
              recipe_sha256="b" * 64)  # another recipe version
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / ".hidden.tmp").mkdir()
    assert unfinished_run(tmp_path, RECIPE_SHA) == newest
    assert describe(newest) == "stopped after export (the process died)"


def test_a_finished_newest_run_means_a_fresh_run(tmp_path):
    _fake_run(tmp_path, "20260101T000000Z-aaaaaaaa", status="running", started_at="2026-01-01T00:00:00+00:00")
    _fake_run(tmp_path, "20260102T000000Z-aaaaaaaa", status="failed", started_at="2026-01-02T00:00:00+00:00",
              error={"stage": "gate", "exit_code": 3})
    assert unfinished_run(tmp_path, RECIPE_SHA) is None
    assert unfinished_run(tmp_path / "missing", RECIPE_SHA) is None


def test_a_run_held_by_a_live_process_is_not_resumed(tmp_path):
    run_dir = _fake_run(tmp_path, "20260101T000000Z-aaaaaaaa", status="running", started_at="2026-01-01T00:00:00+00:00")
    with locked(run_dir):
        assert unfinished_run(tmp_path, RECIPE_SHA) is None
    assert unfinished_run(tmp_path, RECIPE_SHA) == run_dir  # released: a dead run's lock is no obstacle


def test_a_crashed_stage_is_described(tmp_path):
    run_dir = _fake_run(tmp_path, "r1", status="failed", started_at="2026-01-01T00:00:00+00:00",
                        error={"stage": "serve", "exit_code": 1}, stages=("calibrate", "verify"))
    assert describe(run_dir) == "failed in serve, after verify"


def test_stale_temps_are_removed_and_nothing_else(tmp_path):
    for name in (".model.k2j3.tmp", ".quantize.x1.tmp", ".model.old-123"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "partial.safetensors").write_bytes(b"\0" * 10)
    (tmp_path / ".manifest.json.ab12.tmp").write_text("{")
    keep = ("model", "calibrate", ".lock", ".hashcache.json", "manifest.json")
    for name in keep:
        (tmp_path / name).mkdir() if "." not in name.strip(".") else (tmp_path / name).write_text("{}")
    removed = remove_stale_temps(tmp_path)
    assert sorted(removed) == [".manifest.json.ab12.tmp", ".model.k2j3.tmp", ".model.old-123", ".quantize.x1.tmp"]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(keep)
    assert not is_stale_temp(".lock") and not is_stale_temp("model.tmp")


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", "run", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_run_says_it_resumes_an_unfinished_run_and_new_run_does_not(tmp_path):
    """The CLI wiring, cheaply: the recipe is refused (exit 2) right after the choice is made."""
    recipe_path = tmp_path / "fp8-on-vllm.yaml"
    recipe_path.write_text((REPO / "recipes" / "smollm2-135m-fp8.yaml").read_text().replace("engine: auto", "engine: vllm"))
    recipe = load_recipe(recipe_path)
    run_dir = _fake_run(tmp_path / "exports" / recipe.name, "20260101T000000Z-aaaaaaaa", status="running",
                        started_at="2026-01-01T00:00:00+00:00", recipe_sha256=recipe.content_hash(), recipe=recipe.name)
    resumed = _run_cli(str(recipe_path), "--output-dir", str(tmp_path / "exports"), cwd=tmp_path)
    assert f"resuming unfinished run {run_dir}" in resumed.stdout, resumed.stdout + resumed.stderr
    assert resumed.returncode == 2 and "quantization.scheme" in resumed.stderr
    fresh = _run_cli(str(recipe_path), "--output-dir", str(tmp_path / "exports"), "--new-run", cwd=tmp_path)
    assert fresh.returncode == 2 and "resuming" not in fresh.stdout + fresh.stderr
    both = _run_cli(str(recipe_path), "--new-run", "--resume", str(run_dir), cwd=tmp_path)
    assert both.returncode == 2 and "exclude each other" in both.stderr


def test_resume_of_a_run_being_written_leaves_its_manifest_alone(tmp_path):
    from tests.conftest import DEFAULT_RECIPE

    recipe = load_recipe(DEFAULT_RECIPE)
    run_dir = _fake_run(tmp_path / "exports" / recipe.name, "20260101T000000Z-aaaaaaaa", status="running",
                        started_at="2026-01-01T00:00:00+00:00", recipe_sha256=recipe.content_hash(), recipe=recipe.name)
    before = (run_dir / "manifest.json").read_bytes()
    with locked(run_dir):  # a live run holds it
        refused = _run_cli(str(DEFAULT_RECIPE), "--resume", str(run_dir), cwd=tmp_path)
    assert refused.returncode == 2 and "being written by another run" in refused.stderr, refused.stderr
    assert (run_dir / "manifest.json").read_bytes() == before
