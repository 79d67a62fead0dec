"""Child-process isolation: results, memory, errors and leftovers, on real processes."""

from __future__ import annotations

import os
import time

import pytest

from quantize_pipeline.errors import StageError, VerifyFailed
from quantize_pipeline.run.worker import Session, call_isolated


def test_result_and_peak_memory_of_the_child(tmp_path):
    result, peak_mb = call_isolated("tests.worker_targets:allocate", {"megabytes": 300}, log_path=tmp_path / "x.log", stage="t")
    assert result == {"allocated": 300 * 2**20}
    assert peak_mb > 300


def test_no_process_outlives_its_stage(tmp_path):
    pid_file = tmp_path / "pid"
    call_isolated("tests.worker_targets:spawn_grandchild", {"pid_file": str(pid_file)}, log_path=tmp_path / "x.log", stage="t")
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {grandchild} still alive after the stage ended")


def test_pipeline_errors_keep_their_type_and_exit_code(tmp_path):
    with pytest.raises(VerifyFailed, match="tensors do not match") as caught:
        call_isolated("tests.worker_targets:raise_verify_failed", {}, log_path=tmp_path / "x.log", stage="verify")
    assert caught.value.exit_code == 3 and caught.value.stage == "verify"


def test_a_recipe_error_in_a_child_is_the_same_recipe_error_here(tmp_path):
    """Errors serialise themselves across the hop: file, field and exit code 2 survive it."""
    from quantize_pipeline.errors import RecipeError

    with pytest.raises(RecipeError) as caught:
        call_isolated("tests.worker_targets:raise_recipe_error", {}, log_path=tmp_path / "x.log", stage="quantize")
    error = caught.value
    assert (error.path, error.field, error.exit_code, error.stage) == ("recipes/x.yaml", "resources.device", 2, "quantize")
    assert error.one_line() == "[quantize] recipes/x.yaml: resources.device: 'cuda' asked for, no CUDA device here"


def test_a_crash_is_one_line_with_the_traceback_in_the_log(tmp_path):
    log = tmp_path / "x.log"
    with pytest.raises(StageError, match="ZeroDivisionError: boom"):
        call_isolated("tests.worker_targets:crash", {}, log_path=log, stage="serve")
    assert "Traceback" in log.read_text()


def test_a_session_keeps_what_its_calls_loaded_and_ends_with_close(tmp_path):
    """How a model's engine is loaded once for several calls: the child and its memory outlive each call."""
    import psutil

    with Session(log_path=tmp_path / "x.log") as session:
        first, _ = session.call("tests.worker_targets:remember", {"value": 1}, stage="t")
        with pytest.raises(VerifyFailed):  # a failed call leaves the child and what it holds
            session.call("tests.worker_targets:raise_verify_failed", {}, stage="verify")
        second, _ = session.call("tests.worker_targets:remember", {"value": 2}, stage="t")
        _, peak_mb = session.call("tests.worker_targets:allocate", {"megabytes": 200}, stage="t")
    assert first["remembered"] == [1] and second["remembered"] == [1, 2] and first["pid"] == second["pid"]
    assert peak_mb > 200
    assert not psutil.pid_exists(first["pid"]) or psutil.Process(first["pid"]).status() == psutil.STATUS_ZOMBIE
    assert tmp_path.joinpath("x.log").read_text().count("$ tests.worker_targets:remember") == 2
    # A fresh child for each call_isolated: nothing carried over.
    again, _ = call_isolated("tests.worker_targets:remember", {"value": 3}, log_path=tmp_path / "x.log", stage="t")
    assert again["remembered"] == [3]


def test_a_child_that_dies_in_a_call_is_a_stage_error_naming_its_exit_code(tmp_path):
    with Session(log_path=tmp_path / "x.log") as session:
        with pytest.raises(StageError, match="exit_hard exited with code 7"):
            session.call("tests.worker_targets:exit_hard", {"code": 7}, stage="evaluate")
        assert not session.alive


def test_a_run_directory_is_locked_while_written(tmp_path):
    from quantize_pipeline.run.rundir import RunLocked, locked

    with locked(tmp_path):
        with pytest.raises(RunLocked, match="being written by another run"):
            with locked(tmp_path):
                pass
    with locked(tmp_path):  # released after the first run ended
        pass


def test_a_stage_ends_with_the_process_that_started_it(tmp_path):
    """kill -9 of the parent alone (not its children's sessions): the stage and its grandchild go too."""
    import signal
    import subprocess
    import sys

    import psutil

    from tests.conftest import REPO

    pid_file = tmp_path / "pids"
    parent = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from quantize_pipeline.run.worker import call_isolated; "
         "call_isolated('tests.worker_targets:spawn_grandchild_and_wait', {'pid_file': sys.argv[1]}, "
         "log_path=Path(sys.argv[2]), stage='t')", str(pid_file), str(tmp_path / "x.log")],
        cwd=REPO, start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    for _ in range(300):
        if pid_file.is_file() and " " in pid_file.read_text():
            break
        time.sleep(0.05)
    else:
        parent.kill()
        pytest.fail("the stage never started")
    stage_pids = [int(pid) for pid in pid_file.read_text().split()]
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in stage_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in stage_pids if alive(pid)]
    for pid in survivors:  # do not leave them behind for the next test
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"stage processes outlived their parent: {survivors}"
