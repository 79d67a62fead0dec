"""What the gate decides (report.json), as pydantic models: rules with their states, the verdict, the rounds,
the evaluation they were judged on and the run's facts.

report.json is written through `Report.to_json` and read back through `load_report` by every reader
(`report`, `compare`, `publish`, the model card, JUnit, MLflow, a sweep's row, `run --json`'s result
event). Reports of earlier schema versions load: schema 1 had no rule states (only `passed`), schema 2
no quantize warnings.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path

from pydantic import ValidationError, model_validator

from quantize_pipeline.errors import InputError
from quantize_pipeline.evaluate.record import Evaluation, Record, Round, ServeFigures

# 2: rules carry state (pass/fail/inconclusive), interval and samples; verdict inconclusive. 3: quantize_warnings
REPORT_SCHEMA_VERSION = 3


class RuleState(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"  # the interval holds the threshold: more samples would decide


class Verdict(StrEnum):
    """The gate's answer: pass only when every rule passed; inconclusive when none failed but one is undecided."""

    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


class Rule(Record):
    """One gate rule: its figure against its threshold, judged on the figure's interval when it has one."""

    rule: str
    figure: float | None = None
    threshold: float | None = None
    state: RuleState
    passed: bool = False
    interval: tuple[float, float] | None = None
    confidence: float | None = None
    samples: int | None = None
    unit: str | None = None  # what a sample is: questions, documents, paragraphs
    detail: str = ""
    more_samples_to_decide: int | None = None  # an inconclusive rule's estimate
    verdict: str | None = None  # no_garbage: "garbage" or "sane"
    worst_sample: dict | None = None  # no_garbage: the completion that looked worst

    @model_validator(mode="before")
    @classmethod
    def _state_of_schema_1(cls, data):
        """Schema 1 reports have only `passed`: its state is pass or fail."""
        if isinstance(data, dict) and data.get("state") is None:
            data = {**data, "state": RuleState.PASS if data.get("passed") else RuleState.FAIL}
        return data


class GateRounds(Record):
    """The rounds the accuracy rules were judged over, and the confidence each look was given."""

    looks_planned: int | None = None
    alpha: float | None = None
    accuracy_confidence_per_look: float | None = None
    rounds: list[Round] = []


class ExportFigures(Record):
    export_size_bytes: int | None = None
    base_size_bytes: int | None = None
    size_ratio: float | None = None  # export safetensors / base safetensors


class EngineRecord(Record):
    name: str | None = None  # an engines.names.EngineName
    label: str | None = None  # what the report says about it (e.g. the fallback engine, and why)


class Report(Record):
    """report.json: the verdict, every rule, the evaluation judged, and the run's facts (verdict/run_facts.py)."""

    schema_version: int = 1
    recipe: str | None = None
    scheme: str | None = None
    verdict: Verdict
    failed_rules: list[str] = []
    inconclusive_rules: list[str] = []
    rules: list[Rule] = []
    sequential: GateRounds | None = None
    evaluation: Evaluation = Evaluation()
    # The run's facts (RunFacts.to_json()), at the top level.
    run_dir: str | None = None
    base_model: dict | None = None
    export: ExportFigures | None = None
    serve: ServeFigures | None = None
    engine: EngineRecord | None = None
    packages: dict[str, str] = {}
    quantize_warnings: list[str] = []  # schema 3

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")


def load_report(path: Path) -> Report:
    """A run's report.json, of any schema version; a file that is not one is a one-line error naming the field."""
    try:
        return Report.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not JSON: {exc}") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        raise InputError(f"{path}: {field}: {error['msg']}") from None
