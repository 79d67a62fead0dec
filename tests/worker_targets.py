"""Functions that tests run through pipeline.worker.call_isolated (real child processes)."""

from __future__ import annotations

import subprocess
import sys

from pipeline.errors import VerifyFailed


def spawn_grandchild(pid_file: str) -> dict:
    """Leave a long-running grandchild behind, as vLLM's engine can."""
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(pid_file, "w") as handle:
        handle.write(str(grandchild.pid))
    return {"grandchild": grandchild.pid}


def allocate(megabytes: int) -> dict:
    block = bytearray(megabytes * 2**20)
    return {"allocated": len(block)}


def raise_verify_failed() -> dict:
    raise VerifyFailed("tensors do not match")


def crash() -> dict:
    raise ZeroDivisionError("boom")


def count_with_tqdm(steps: int) -> dict:
    """Draw a tqdm bar, as Quark, vLLM and lm-eval do."""
    from tqdm import tqdm

    done = 0
    for _ in tqdm(range(steps), desc="counting things", mininterval=0):
        done += 1
    return {"counted": done}


def spawn_grandchild_and_wait(pid_file: str) -> dict:
    """A stage that never ends on its own, with a grandchild (as vLLM's engine): 'worker_pid grandchild_pid'."""
    import os
    import time

    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(pid_file, "w") as handle:
        handle.write(f"{os.getpid()} {grandchild.pid}")
    time.sleep(600)
    return {}
