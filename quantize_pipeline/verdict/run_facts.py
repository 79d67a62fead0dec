"""What the gate judges besides the evaluation: serving figures, the export's size, what ran it.

Typed so that a missing field is an error where the facts are built (or read back from a
recorded run), not a gate rule that quietly fails closed on a misspelled key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ExportSize:
    export_size_bytes: int
    base_size_bytes: int
    size_ratio: float  # export safetensors / base safetensors


@dataclass(frozen=True)
class EngineLabel:
    name: str  # an engines.names.EngineName
    label: str  # what the report says about it (e.g. the fallback engine, and why)


def completion_texts(serve_figures: dict) -> list[str]:
    """The greedy completions of serve's figures (what the garbage rule reads)."""
    return [item["completion"] for item in serve_figures["completions"]]


@dataclass(frozen=True)
class RunFacts:
    run_dir: str
    base_model: dict  # {"source", "path", "sha256"}: the manifest's
    export: ExportSize
    serve: dict  # the serve stage's figures (engines/serve.py ServingFigures as JSON, or a recorded run's)
    engine: EngineLabel
    packages: dict[str, str]
    # What the quantize stage did that a reader must know before trusting the verdict (e.g. MoE experts no
    # calibration token reached, and the input scale they got instead); empty for `check` of another's export.
    quantize_warnings: tuple[str, ...] = ()

    def __post_init__(self):
        for key in ("completions", "peak_rss_mb"):  # what the gate reads: required here, not looked up later
            if key not in self.serve:
                raise KeyError(f"run facts: serve figures lack {key!r}")

    @property
    def completions(self) -> list[str]:
        return completion_texts(self.serve)

    @property
    def serve_peak_rss_mb(self) -> float | None:
        return self.serve["peak_rss_mb"]

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "quantize_warnings": list(self.quantize_warnings)}

    @classmethod
    def from_json(cls, data: dict) -> RunFacts:
        """A recorded run's facts (report.json's top level); a missing field raises."""
        return cls(run_dir=data["run_dir"], base_model=data["base_model"], export=ExportSize(**data["export"]),
                   serve=data["serve"], engine=EngineLabel(**data["engine"]), packages=data["packages"],
                   quantize_warnings=tuple(data.get("quantize_warnings", ())))  # absent in schema 2 reports
