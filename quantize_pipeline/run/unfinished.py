"""Which earlier run of a recipe `run` picks up again instead of starting over.

A run is finished when it passed, or when it failed a check (verify or gate, exit 3) or
its gate was inconclusive (exit 4): that verdict is the answer, and rerunning the same recipe would only repeat it. Anything
else left behind (killed: status still "running"; crashed; a stage that failed with exit
1 or 2) is unfinished. Only the newest run of the exact same recipe (same resolved-recipe
sha256) is considered, and only while no process holds its lock.
"""

from __future__ import annotations

import json
from pathlib import Path

from quantize_pipeline.run.manifest import MANIFEST_FILE
from quantize_pipeline.run.rundir import is_locked

# exit codes of a failed check (VerifyFailed, GateFailed) and of an inconclusive gate (GateInconclusive):
# final verdicts, not interruptions
CHECK_FAILED_EXIT_CODE = 3
VERDICT_EXIT_CODES = (CHECK_FAILED_EXIT_CODE, 4)


def is_finished(manifest: dict) -> bool:
    status = manifest.get("status")
    if status == "passed":
        return True
    return status == "failed" and (manifest.get("error") or {}).get("exit_code") in VERDICT_EXIT_CODES


def _read_manifest(run_dir: Path) -> dict | None:
    try:
        data = json.loads((run_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def newest_run(recipe_root: Path, recipe_sha256: str) -> tuple[Path, dict] | None:
    """The most recently started run of this exact recipe under OUTPUT_DIR/<recipe name>/."""
    if not recipe_root.is_dir():
        return None
    runs = []
    for run_dir in recipe_root.iterdir():
        if run_dir.name.startswith(".") or not run_dir.is_dir():
            continue
        manifest = _read_manifest(run_dir)
        if manifest is not None and manifest.get("recipe_sha256") == recipe_sha256:
            runs.append((manifest.get("started_at", ""), run_dir.name, run_dir, manifest))
    if not runs:
        return None
    *_, run_dir, manifest = max(runs, key=lambda entry: entry[:2])
    return run_dir, manifest


def unfinished_run(recipe_root: Path, recipe_sha256: str) -> Path | None:
    """The run to resume: the newest run of this recipe, if it is unfinished and not being written."""
    newest = newest_run(recipe_root, recipe_sha256)
    if newest is None:
        return None
    run_dir, manifest = newest
    if is_finished(manifest) or is_locked(run_dir):
        return None
    return run_dir


def describe(run_dir: Path) -> str:
    """'stopped after serve (the process died)', 'failed in serve, after verify': where the run stopped."""
    manifest = _read_manifest(run_dir) or {}
    done = [stage for stage, record in manifest.get("stages", {}).items() if record.get("status") == "done"]
    stopped = f"after {done[-1]}" if done else "before any stage finished"
    status = manifest.get("status", "unknown")
    if status == "running":
        return f"stopped {stopped} (the process died)"
    error = manifest.get("error") or {}
    where = f" in {error['stage']}" if error.get("stage") else ""
    return f"{status}{where}, {stopped}"
