"""Run heavy work (Quark, vLLM, lm-eval) in child processes: one call per child (call_isolated), or
several calls in one child that keeps what they load (Session: a model's engine loaded once).

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
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from quantize_pipeline import errors
from quantize_pipeline.run import events

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


class Session:
    """One child process that runs calls one after another: what a call loads (an engine) stays loaded
    for the next call, so a model's later work does not start its engine again.

    The child reads one request per line on stdin and answers each in a result file written with a
    rename (whole or absent). Its output goes to `log_path`. While a call runs, the parent samples the
    RSS of the child's whole process tree: each call's peak is the memory that call needed, including
    what earlier calls left loaded. Closing ends the child and everything it started.
    """

    def __init__(self, *, log_path: Path, on_event: events.Emit | None = None) -> None:
        self.log_path = log_path
        self._tmp = Path(tempfile.mkdtemp(prefix="qp-worker-"))
        self._calls = 0
        env, self._progress = None, None
        if on_event is not None:
            progress_path = self._tmp / "progress.jsonl"
            env, self._progress = {**os.environ, events.PROGRESS_FILE_ENV: str(progress_path)}, events.ProgressFile(progress_path)
        self._forward = events.safe(on_event) if on_event is not None else None
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        # Own session: when the work ends, every process it started ends with it
        # (vLLM's engine and workers otherwise outlive a child that exits early).
        self._child = subprocess.Popen(
            [sys.executable, "-m", "quantize_pipeline.run.worker", "--session", str(os.getpid())],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.PIPE, start_new_session=True, env=env,
        )

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._child.poll() is None

    def call(self, target: str, kwargs: dict[str, Any], *, stage: str, label: str | None = None) -> tuple[Any, float]:
        """`package.module:function(**kwargs)` in the child; (its result, peak tree RSS in MiB during the call).
        A PipelineError raised in the child is raised again here with the same type, so exit codes survive
        the hop. With on_event, the child's progress bars arrive as progress events tagged with `stage`
        (and `label`: which model, when a stage runs several children)."""
        self._calls += 1
        args_file, result_file = self._tmp / f"args-{self._calls}.json", self._tmp / f"result-{self._calls}.json"
        args_file.write_text(json.dumps(kwargs))
        self._log.write(f"\n$ {target}  ({time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
        self._log.flush()
        tag = {"stage": stage, **({"label": label} if label else {})}

        def relay() -> None:
            if self._progress is not None:
                for event in self._progress.read_new():
                    self._forward({**event, **tag})

        request = json.dumps({"target": target, "args_file": str(args_file), "result_file": str(result_file)})
        peak_bytes = 0
        try:
            self._child.stdin.write((request + "\n").encode())
            self._child.stdin.flush()
        except BrokenPipeError:  # the child is gone; its exit code says why below
            pass
        while not result_file.exists() and self._child.poll() is None:
            peak_bytes = max(peak_bytes, tree_rss_bytes(self._child.pid))
            relay()
            time.sleep(SAMPLE_INTERVAL_S)
        relay()
        outcome = json.loads(result_file.read_text()) if result_file.exists() else {}
        peak_mb = max(peak_bytes / 2**20, outcome.get("call_peak_rss_mb", 0.0))
        if "error" in outcome:
            raise errors.PipelineError.from_json(outcome["error"], stage=stage)
        if "result" not in outcome:
            self.close()
            raise errors.StageError(f"{target} exited with code {self._child.returncode}; see {self.log_path}",
                                    stage=stage)
        return outcome["result"], peak_mb

    def close(self) -> None:
        if self._log.closed:
            return
        _kill_session(self._child)
        if self._progress is not None:
            for event in self._progress.read_new():  # what arrived after the last call's relay
                self._forward(event)
        self._log.close()
        shutil.rmtree(self._tmp, ignore_errors=True)


def call_isolated(target: str, kwargs: dict[str, Any], *, log_path: Path, stage: str,
                  on_event: events.Emit | None = None, label: str | None = None) -> tuple[Any, float]:
    """Call `package.module:function(**kwargs)` in a child of its own; return (its result, peak tree RSS in MiB).
    See Session.call; the child ends with the call."""
    with Session(log_path=log_path, on_event=on_event) as session:
        return session.call(target, kwargs, stage=stage, label=label)


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


def _max_rss_kib() -> int:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # Linux reports KiB


def _call(target: str, args_file: str) -> tuple[dict[str, Any], int]:
    before = _max_rss_kib()
    module_name, function_name = target.split(":")
    kwargs = json.loads(Path(args_file).read_text())
    try:
        function = getattr(importlib.import_module(module_name), function_name)
        outcome: dict[str, Any] = {"result": function(**kwargs)}
        exit_code = 0
    except errors.PipelineError as exc:
        traceback.print_exc()
        outcome, exit_code = {"error": exc.to_json()}, exc.exit_code
    except Exception as exc:  # a crash: the log has the traceback, the user gets one line
        traceback.print_exc()
        outcome, exit_code = {"error": {"type": "StageError", "message": f"{type(exc).__name__}: {exc}"}}, 1
    # The process's lifetime peak, when this call raised it (a peak between two RSS samples); else
    # the samples alone say what this call needed on top of what earlier calls left loaded.
    after = _max_rss_kib()
    outcome["call_peak_rss_mb"] = after / 1024 if after > before else 0.0
    return outcome, exit_code


def _session_main(parent_pid: str) -> int:
    """Child side of Session: one request per stdin line, until stdin closes (the parent ended or closed us)."""
    _end_with_parent(int(parent_pid))
    if os.environ.get(events.PROGRESS_FILE_ENV):
        try:
            events.install_tqdm_reporter()
        except Exception:  # no progress bars is no reason to fail the stage
            traceback.print_exc()
    exit_code = 0
    for line in iter(sys.stdin.readline, ""):
        request = json.loads(line)
        outcome, exit_code = _call(request["target"], request["args_file"])
        sys.stdout.flush()
        sys.stderr.flush()
        staged = Path(request["result_file"] + ".tmp")
        staged.write_text(json.dumps(outcome))
        staged.rename(request["result_file"])  # whole or absent: the parent polls for it
    return exit_code


if __name__ == "__main__":
    code = _session_main(sys.argv[2])
    # vLLM and lm-eval can leave non-daemon threads behind; do not hang on them.
    os._exit(code)
