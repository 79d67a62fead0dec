"""What the evaluate stage produces (evaluate.json, and report.json's `evaluation`), as pydantic models.

Every reader (the gate, report.md, the plot, the model card, MLflow, a sweep's row) reads these
attributes, not string keys. Records are lenient on purpose: every figure is optional (a crashed
task, a run without divergence text) and unknown keys are kept, so that files written by earlier
and later releases load; `to_json` writes back only what was set, so a file round-trips unchanged.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    """A record read from or written to a run's JSON: unknown keys kept, only the keys set written back."""

    model_config = ConfigDict(extra="allow")

    def to_json(self) -> dict:
        """The JSON-ready dict (json.dumps writes enums as their values, tuples as lists)."""
        return self.model_dump(exclude_unset=True)


class TaskMetrics(Record):
    """One model's figures on one lm-eval task (lm-eval's metric names; `samples`: questions or documents)."""

    acc: float | None = None
    samples: int | None = None
    word_perplexity: float | None = None


class PairedComparison(Record):
    """Base vs quantized on the same questions (verdict/metrics.paired_accuracy_comparison): the counts
    are sufficient statistics, so the gate redoes the intervals at its own confidence."""

    questions: int | None = None
    base_accuracy: float | None = None
    quantized_accuracy: float | None = None
    recovery: float | None = None
    accuracy_drop: float | None = None
    drop_ci_low: float | None = None
    drop_ci_high: float | None = None
    recovery_ci_low: float | None = None
    recovery_ci_high: float | None = None
    confidence: float | None = None
    both_right: int | None = None  # absent in reports written before it was recorded
    b: int | None = None  # base right, quantized wrong
    c: int | None = None  # base wrong, quantized right
    mcnemar_p_value: float | None = None


class TaskComparison(Record):
    base: TaskMetrics = TaskMetrics()
    quantized: TaskMetrics = TaskMetrics()
    paired: PairedComparison | None = None  # None for a task that is not gated on accuracy


class Perplexity(Record):
    """Word perplexity of both models on the recipe's perplexity text."""

    text: str | None = None
    base: float | None = None
    quantized: float | None = None


class Divergence(Record):
    """Next-token divergence of the export from the base on held-out text (evaluate/divergence.py)."""

    tokens: int | None = None
    mean_kl: float | None = None  # None: infinite (the export gave a base token no mass)
    median_kl: float | None = None
    p90_kl: float | None = None
    p99_kl: float | None = None
    max_kl: float | None = None
    top1_agreement: float | None = None
    text: str | None = None
    limit: int | None = None
    base_reference_cached: bool | None = None
    method: str | None = None


class Round(Record):
    """One round of the gate's sequential evaluation: questions per task and why the next did (not) follow."""

    limit: dict[str, int | None] | None = None
    questions: dict[str, int] | None = None
    decision: str | None = None
    base_questions_evaluated: dict[str, int] | None = None


class Rounds(Record):
    looks_planned: int | None = None
    rounds: list[Round] = []


class BaselineSource(Record):
    """Where the base model's figures came from: the cache (by model content hash) or this run."""

    model_sha256: str | None = None
    cached_tasks: list[str] = []
    computed_tasks: list[str] = []
    completion_perplexities_cached: bool | None = None


class ServeFigures(Record):
    """Serving figures (engines/serve.py ServingFigures; a baseline column's subset of them)."""

    engine: str | None = None
    engine_version: str | None = None
    import_s: float | None = None
    load_s: float | None = None
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    batch1_tokens_per_s: float | None = None
    batch_tokens_per_s: float | None = None
    batch_size: int | None = None
    peak_rss_mb: float | None = None
    device_peak_mb: float | None = None
    completions: list[dict] = []
    definitions: dict | None = None  # absent in runs that timed the import and load with the generation


class BaselineTask(Record):
    acc: float | None = None
    samples: int | None = None
    paired: PairedComparison | None = None


class BaselineColumn(Record):
    """An evaluation-only column (recipe `baselines:`): its figures, or the error it raised here."""

    kind: str | None = None
    engine: str | None = None
    serve: ServeFigures | None = None
    tasks: dict[str, BaselineTask] | None = None
    error: str | None = None
    log: str | None = None
    seconds: float | None = None


class Evaluation(Record):
    """The evaluate stage's figures (evaluate.json): base vs quantized per task, perplexity, divergence, the
    base's perplexity of the export's completions, the rounds, the baseline columns, seconds per figure."""

    engine: str | None = None
    engine_version: str | None = None
    engine_starts: list[dict] = []
    baseline: BaselineSource | None = None
    limits: dict[str, int | None] | None = None
    tasks: dict[str, TaskComparison] = {}
    completion_perplexities_under_base: list[float | None] | None = None
    perplexity: Perplexity | None = None
    divergence: Divergence | None = None
    sequential: Rounds | None = None
    baselines: dict[str, BaselineColumn] | None = None
    timings_s: dict[str, float] = {}
