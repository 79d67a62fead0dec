"""Run heavy work (Quark, vLLM, lm-eval) in a fresh child process.

Why a child: memory is returned to the OS between stages, vLLM's spawned
workers need a `__main__` guard, and the parent CLI never imports torch. The
parent samples the RSS of the child's whole process tree (vLLM runs its engine
in a grandchild), so "peak RSS" is the real memory the work needed.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from pipeline import errors, events

SAMPLE_INTERVAL_S = 0.2
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def tree_rss_bytes(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _kill_session(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    child.wait()


def call_isolated(target: str, kwargs: dict[str, Any], *, log_path: Path, stage: str,
                  on_event: events.Emit | None = None, label: str | None = None) -> tuple[Any, float]:
    """Call `package.module:function(**kwargs)` in a child; return (its result, peak tree RSS in MiB).

    The child's output goes to `log_path`. A PipelineError raised in the child
    is raised again here with the same type, so exit codes survive the hop.
    With `on_event`, the child's progress bars arrive as progress events (see events.py),
    tagged with `stage` (and `label`: which model, when a stage runs several children).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qp-worker-") as tmp:
        args_file, result_file = Path(tmp, "args.json"), Path(tmp, "result.json")
        args_file.write_text(json.dumps(kwargs))
        command = [sys.executable, "-m", "pipeline.worker", target, str(args_file), str(result_file), str(os.getpid())]
        env, progress = None, None
        if on_event is not None:
            progress_path = Path(tmp, "progress.jsonl")
            env, progress = {**os.environ, events.PROGRESS_FILE_ENV: str(progress_path)}, events.ProgressFile(progress_path)
            tag = {"stage": stage, **({"label": label} if label else {})}
            forward = events.safe(on_event)

            def relay() -> None:
                for event in progress.read_new():
                    forward({**event, **tag})
        peak_bytes = 0
        with open(log_path, "ab") as log:
            log.write(f"\n$ {target}  ({time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
            log.flush()
            # Own session: when the stage ends, every process it started ends with it
            # (vLLM's engine and workers otherwise outlive a child that exits early).
            child = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env,
            )
            try:
                while child.poll() is None:
                    peak_bytes = max(peak_bytes, tree_rss_bytes(child.pid))
                    if progress is not None:
                        relay()
                    time.sleep(SAMPLE_INTERVAL_S)
            finally:
                _kill_session(child)
            if progress is not None:
                relay()
        outcome = json.loads(result_file.read_text()) if result_file.exists() else {}
    peak_mb = max(peak_bytes / 2**20, outcome.get("ru_maxrss_mb", 0.0))
    if "error" in outcome:
        raise errors.PipelineError.from_json(outcome["error"], stage=stage)
    if child.returncode != 0 or "result" not in outcome:
        raise errors.StageError(f"{target} exited with code {child.returncode}; see {log_path}", stage=stage)
    return outcome["result"], peak_mb


def _kill_own_group(*_) -> None:
    if os.getpgrp() == os.getpid():  # the session call_isolated gave us: this stage and what it started
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os._exit(1)


def _end_with_parent(parent_pid: int) -> None:
    """If the process that started this stage dies (kill -9 of the CLI alone), end this stage's whole
    process group too: left running, it would keep writing into a staged folder that the next resume
    removes. On Linux the kernel sends SIGTERM when the parent dies (PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        signal.signal(signal.SIGTERM, _kill_own_group)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            return
    except (OSError, AttributeError, ValueError):  # not Linux: the stage just outlives its parent
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        _kill_own_group()


def _main(target: str, args_file: str, result_file: str, parent_pid: str | None = None) -> int:
    if parent_pid is not None:
        _end_with_parent(int(parent_pid))
    module_name, function_name = target.split(":")
    kwargs = json.loads(Path(args_file).read_text())
    outcome: dict[str, Any]
    exit_code = 0
    if os.environ.get(events.PROGRESS_FILE_ENV):
        try:
            events.install_tqdm_reporter()
        except Exception:  # no progress bars is no reason to fail the stage
            traceback.print_exc()
    try:
        function = getattr(importlib.import_module(module_name), function_name)
        outcome = {"result": function(**kwargs)}
    except errors.PipelineError as exc:
        traceback.print_exc()
        outcome = {"error": exc.to_json()}
        exit_code = exc.exit_code
    except Exception as exc:  # a crash: the log has the traceback, the user gets one line
        traceback.print_exc()
        outcome = {"error": {"type": "StageError", "message": f"{type(exc).__name__}: {exc}"}}
        exit_code = 1
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    outcome["ru_maxrss_mb"] = max(own, children) / 1024  # Linux reports KiB
    Path(result_file).write_text(json.dumps(outcome))
    sys.stdout.flush()
    sys.stderr.flush()
    return exit_code


if __name__ == "__main__":
    code = _main(*sys.argv[1:5])
    # vLLM and lm-eval can leave non-daemon threads behind; do not hang on them.
    os._exit(code)
