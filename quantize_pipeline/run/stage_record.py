"""What a stage hands the runner: its summary (kept in manifest.json), its wall time and the peak RSS of the
processes that did its work. Child processes send it as JSON (`to_json`); the runner reads it back here."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StageRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    summary: dict
    wall_s: float
    peak_rss_mb: float
    # quantize, when one child did quantize, freeze and export: that child's whole wall time (imports and
    # set-up included), which bench/scale_vs_peers.py compares with the peers' whole runs.
    total_wall_s: float | None = None

    def to_json(self) -> dict:
        return self.model_dump(exclude_none=True)


def records_to_json(records: dict[str, StageRecord]) -> dict[str, dict]:
    """A child job's return value: its stages' records as JSON."""
    return {stage: record.to_json() for stage, record in records.items()}
