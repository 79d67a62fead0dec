"""Start a CLI run the way a user would, and kill it the way a machine crash would (tests only)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from tests.conftest import REPO


class CliRun:
    """`quantize-pipeline ARGS` in its own session, stdout and stderr to files (no pipe to fill up)."""

    def __init__(self, *args: str, cwd: Path, logs: Path):
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = logs / "stdout", logs / "stderr"
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            # Own session: killing its process group never reaches pytest.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "quantize_pipeline.cli", *args], cwd=cwd, stdout=stdout, stderr=stderr,
                stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for(self, condition: Callable[[], bool], what: str, timeout_s: float = 900) -> None:
        """Poll until `condition()`; fail if the run ends first or the time runs out."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"the run ended (exit {self.process.returncode}) before {what}:\n{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.stderr[-3000:]}")
            time.sleep(0.02)

    def wait(self, timeout_s: float = 1800) -> int:
        return self.process.wait(timeout=timeout_s)

    def kill_like_a_crash(self) -> list[int]:
        """SIGKILL the CLI and every process under it, with their process groups: stage children run in
        sessions of their own (vLLM's engine in a grandchild), and a crash spares none of them."""
        try:
            tree = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        groups = set()
        for process in tree:
            try:
                groups.add(os.getpgid(process.pid))
            except ProcessLookupError:
                pass
        groups.discard(os.getpgrp())  # never our own (pytest's) group
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in tree:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.process.wait(timeout=60)
        _, alive = psutil.wait_procs(tree, timeout=30)
        survivors = []
        for process in alive:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:  # an orphan's zombie waits for init to reap it
                    survivors.append(process.pid)
            except psutil.NoSuchProcess:
                pass
        assert not survivors, f"processes survived SIGKILL: {survivors}"
        return [process.pid for process in tree]
