"""Failure drills on real resources: a full disk fails cleanly, before a half-written checkpoint."""

from __future__ import annotations

import json
import subprocess

import pytest

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
    completed = run_recipe(DEFAULT_RECIPE, small_disk)
    assert completed.returncode == 2, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert "not enough disk space for the export" in completed.stderr
    assert completed.stderr.count("error:") == 1 and "Traceback" not in completed.stderr
    run_dir = run_dir_of(completed)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"]["stage"] == "export"
    assert manifest["stages"]["calibrate"]["status"] == "done"
    assert (run_dir / "calibrate" / "tokens.jsonl").is_file()
    assert not (run_dir / "model").exists() and not list(run_dir.glob(".model.*"))
