"""Run events: what `run --json` prints, one JSON object per line, and what drives the progress bars.

Every event is a plain dict with an "event" key:

    run_start     {run_dir, resumed}                       first, once the run directory is known
    stage_start   {stage}
    stage_end     {stage, wall_s, peak_rss_mb}
    stage_reused  {stage}                                  kept from an earlier run (resume)
    stage_failed  {stage, exit_code, message}
    progress      {stage, task, completed, total, label?}  a child's progress bar (Quark, vLLM, lm-eval)
    result        {verdict, run_dir, exit_code, published, error, rules}   last, from the CLI (rules: per rule
                  state, figure, interval, threshold, samples, unit, more_samples_to_decide)

Stages that run in a child process write their output to a log file, so their progress takes
another way: the parent names a file in QP_PROGRESS_FILE, the child appends one JSON line per
update (tqdm bars, throttled), and the parent reads new lines while it waits. A progress event
is a nicety: nothing here may fail a run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

PROGRESS_FILE_ENV = "QP_PROGRESS_FILE"
# At most this often per bar (seconds), besides the first and the last update.
PROGRESS_INTERVAL_S = 0.25

Emit = Callable[[dict], None]


def no_events(event: dict) -> None:
    """The default sink: events are dropped."""


def safe(emit: Emit) -> Emit:
    """`emit`, except that an error in rendering an event never reaches the run."""

    def guarded(event: dict) -> None:
        try:
            emit(event)
        except Exception:  # a broken progress display must not fail a quantization run
            pass

    return guarded


class ProgressFile:
    """Parent side: the complete JSON lines a child appended since the last read."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""

    def read_new(self) -> list[dict]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except OSError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events


def report_progress(task: str, completed: float, total: float | None) -> None:
    """Child side: append one progress line (no-op unless the parent asked for progress)."""
    report_event({"event": "progress", "task": task, "completed": completed, "total": total})


def _report_bar(bar, *, final: bool) -> None:
    if getattr(bar, "disable", False):
        return
    now = time.monotonic()
    completed, total = getattr(bar, "n", 0), getattr(bar, "total", None) or None  # 0: unknown (datasets)
    last = getattr(bar, "_qp_reported_at", None)
    if not final and last is not None and now - last < PROGRESS_INTERVAL_S and completed != total:
        return
    bar._qp_reported_at = now
    task = (getattr(bar, "desc", "") or "working").strip().rstrip(":")
    report_progress(task, completed, total)


def install_tqdm_reporter() -> None:
    """Child side: report every tqdm bar's progress. Quark (calibration, freezing, export), vLLM
    (processed prompts) and lm-eval (requests) all draw their progress with tqdm."""
    from tqdm import std

    if getattr(std.tqdm, "_qp_reporting", False):
        return
    original_update, original_close = std.tqdm.update, std.tqdm.close

    def update(self, n=1):
        result = original_update(self, n)
        try:
            _report_bar(self, final=False)
        except Exception:
            pass
        return result

    def close(self):
        try:
            if not getattr(self, "_qp_closed", False):
                self._qp_closed = True
                _report_bar(self, final=True)
        except Exception:
            pass
        return original_close(self)

    std.tqdm.update, std.tqdm.close, std.tqdm._qp_reporting = update, close, True


def report_event(event: dict) -> None:
    """Child side: pass one event (e.g. engine_start) to the parent's event stream, as progress lines travel."""
    path = os.environ.get(PROGRESS_FILE_ENV)
    if not path:
        return
    try:
        # One short write in append mode: lines from several processes do not interleave.
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")
    except OSError:
        pass
