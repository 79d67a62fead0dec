"""Run events: progress from real child processes, the --json stream, bars that never break a run."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from rich.console import Console

from quantize_pipeline.run.events import ProgressFile, safe
from quantize_pipeline.run.progress_bars import ProgressBars
from quantize_pipeline.run.worker import call_isolated
from tests.conftest import REPO


def test_a_childs_tqdm_bar_arrives_as_progress_events(tmp_path):
    received = []
    result, _ = call_isolated("tests.worker_targets:count_with_tqdm", {"steps": 40}, log_path=tmp_path / "x.log",
                              stage="quantize", on_event=received.append, label="base")
    assert result == {"counted": 40}
    assert received, "no progress event came back"
    assert all(event["event"] == "progress" and event["stage"] == "quantize" and event["label"] == "base"
               for event in received)
    assert {event["task"] for event in received} == {"counting things"}
    assert received[-1]["completed"] == received[-1]["total"] == 40
    assert [event["completed"] for event in received] == sorted(event["completed"] for event in received)


def test_a_broken_event_sink_does_not_fail_the_stage(tmp_path):
    def broken(event):
        raise RuntimeError("terminal gone")

    result, _ = call_isolated("tests.worker_targets:count_with_tqdm", {"steps": 5}, log_path=tmp_path / "x.log",
                              stage="serve", on_event=broken)
    assert result == {"counted": 5}
    safe(broken)({"event": "progress"})  # swallowed


def test_progress_file_returns_only_complete_lines(tmp_path):
    path = tmp_path / "progress.jsonl"
    reader = ProgressFile(path)
    assert reader.read_new() == []  # not there yet
    path.write_bytes(b'{"event": "progress", "completed": 1}\n{"event": "progr')
    assert reader.read_new() == [{"event": "progress", "completed": 1}]
    with open(path, "ab") as handle:
        handle.write(b'ess", "completed": 2}\nnot json\n')
    assert reader.read_new() == [{"event": "progress", "completed": 2}]


def test_progress_bars_draw_and_survive_odd_events():
    out = io.StringIO()
    bars = ProgressBars(Console(file=out, force_terminal=True, width=100))
    bars.handle({"event": "progress", "stage": "quantize", "task": "Calibrating all params", "completed": 3, "total": 10})
    assert bars.progress is not None and len(bars.bars) == 1
    bars.handle({"event": "progress", "stage": "quantize", "task": "x", "completed": "n/a", "total": object()})
    bars.handle({"event": "stage_end", "stage": "quantize"})
    assert bars.progress is None
    assert "Calibrating all params" in out.getvalue()


def test_run_json_prints_only_json_with_a_result_event(tmp_path):
    """A recipe refused before any stage: stdout is one result event; the one-line error is on stderr."""
    recipe = tmp_path / "fp8-on-vllm.yaml"
    recipe.write_text((REPO / "recipes" / "smollm2-135m-fp8.yaml").read_text().replace("engine: auto", "engine: vllm"))
    done = subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", "run", str(recipe), "--json", "--output-dir",
                           str(tmp_path / "exports")], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events == [{"event": "result", "verdict": "not reached", "run_dir": None, "exit_code": 2, "published": None,
                       "error": events[0]["error"], "rules": [], "quantize_warnings": []}]
    assert "quantization.scheme" in events[0]["error"] and "quantization.scheme" in done.stderr


def test_progress_bars_stay_off_a_pipe():
    out = io.StringIO()
    bars = ProgressBars(Console(file=out, force_terminal=False))
    bars.handle({"event": "progress", "stage": "serve", "task": "Processed prompts", "completed": 1, "total": 2})
    bars.handle({"event": "stage_end", "stage": "serve"})
    assert bars.progress is None and out.getvalue() == ""
