"""Rich progress bars for the progress events of a running stage (human output of `run`).

A stage's bars appear with its first progress event and go (transient) when the stage
ends, so the one-line stage summaries stay the lasting output. On a non-terminal (CI
logs, pipes) rich draws nothing. Drawing errors are swallowed: bars never end a run.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class ProgressBars:
    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.progress: Progress | None = None
        self.bars: dict[tuple, int] = {}

    def handle(self, event: dict) -> None:
        try:
            self._handle(event)
        except Exception:  # a broken terminal must not fail a quantization run
            pass

    def _handle(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "progress" and self.console.is_terminal:  # a pipe or CI log gets the stage lines only
            if self.progress is None:
                self.progress = Progress(
                    TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=self.console, transient=True,
                )
                self.progress.start()
            key = (event.get("stage"), event.get("label"), event.get("task"))
            total = event.get("total")
            if key not in self.bars:
                label = f" ({event['label']})" if event.get("label") else ""
                self.bars[key] = self.progress.add_task(f"{event.get('stage', ''):<9} {event.get('task')}{label}", total=total)
            self.progress.update(self.bars[key], completed=event.get("completed", 0), total=total)
        elif kind in ("stage_end", "stage_failed", "stage_reused"):
            self.close()

    def close(self) -> None:
        if self.progress is not None:
            progress, self.progress, self.bars = self.progress, None, {}
            try:
                progress.stop()
            except Exception:
                pass
