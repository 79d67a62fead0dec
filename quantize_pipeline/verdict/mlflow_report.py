"""Log a gated run to MLflow with the stock client: the recipe as params, every figure as metrics,
report/plot/manifest as artifacts, the verdict as a tag.

Optional: `pip install 'quantize-pipeline[mlflow]'` (mlflow-skinny: the client and the file
store, without the server's heavy dependencies). Tracking store: MLFLOW_TRACKING_URI when set,
else a local folder under the run (RUN_DIR/mlruns; MLflow 3 keeps its file store in
maintenance mode behind MLFLOW_ALLOW_FILE_STORE, which this sets for that local folder only).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from quantize_pipeline.errors import InputError
from quantize_pipeline.verdict.record import Report, RuleState

LOCAL_STORE = "mlruns"
ARTIFACTS = ("report.json", "report.md", "accuracy.png", "manifest.json", "recipe.yaml")
_PARAM_VALUE_MAX = 6000  # MLflow's limit on a param value
_STATE_VALUE = {RuleState.PASS: 1.0, RuleState.INCONCLUSIVE: 0.5, RuleState.FAIL: 0.0}


def tracking_uri(run_dir: Path) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (run_dir / LOCAL_STORE).resolve().as_uri()


def _flatten(data, prefix: str = "") -> dict[str, str]:
    """{"evaluation.limit": "200", ...}: nested recipe fields as dotted param names."""
    if isinstance(data, dict):
        items: dict[str, str] = {}
        for key, value in data.items():
            items |= _flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return items
    return {prefix: str(data)[:_PARAM_VALUE_MAX]}


def _metric_name(name: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and spaces: min_recovery[arc_easy] -> min_recovery.arc_easy."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", ".", name).strip(".").replace("..", ".")


def figures(report: Report) -> dict[str, float]:
    """Every finite number the report holds about the export: rules (figure, interval, threshold, state),
    per-task accuracy, perplexity, divergence statistics, timings, size and serving figures."""
    values: dict[str, float] = {}
    for rule in report.rules:
        name = _metric_name(rule.rule)
        values[f"gate.{name}.figure"] = rule.figure
        values[f"gate.{name}.threshold"] = rule.threshold
        values[f"gate.{name}.state"] = _STATE_VALUE.get(rule.state)
        if rule.interval:
            values[f"gate.{name}.interval_low"], values[f"gate.{name}.interval_high"] = rule.interval
        if rule.samples is not None:
            values[f"gate.{name}.samples"] = rule.samples
    evaluation = report.evaluation
    for task, task_figures in evaluation.tasks.items():
        for role, role_figures in (("base", task_figures.base), ("quantized", task_figures.quantized)):
            for key, value in role_figures.to_json().items():
                values[f"eval.{_metric_name(task)}.{role}.{_metric_name(key)}"] = value
    for key, value in (evaluation.perplexity.to_json() if evaluation.perplexity else {}).items():
        values[f"eval.perplexity.{key}"] = value
    for key, value in (evaluation.divergence.to_json() if evaluation.divergence else {}).items():
        values[f"eval.divergence.{key}"] = value
    for name, column in (evaluation.baselines or {}).items():  # evaluation-only columns
        prefix = f"baseline.{_metric_name(name)}"
        for task, entry in (column.tasks or {}).items():
            values[f"{prefix}.{_metric_name(task)}.acc"] = entry.acc
            values[f"{prefix}.{_metric_name(task)}.recovery"] = entry.paired.recovery if entry.paired else None
        for key in ("tokens_per_s", "peak_rss_mb", "device_peak_mb", "load_s"):
            values[f"{prefix}.{key}"] = getattr(column.serve, key) if column.serve else None
    for key, value in evaluation.timings_s.items():
        values[f"seconds.{_metric_name(key)}"] = value
    for section, record in (("export", report.export), ("serve", report.serve)):
        for key, value in (record.to_json() if record else {}).items():
            values[f"{section}.{_metric_name(key)}"] = value
    return {
        key: float(value) for key, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


def log_run(run_dir: Path, report: Report, recipe_data: dict) -> dict:
    """One MLflow run for this pipeline run (experiment = recipe name). Returns where it went."""
    try:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise InputError("MLflow reporting needs the optional extra: pip install 'quantize-pipeline[mlflow]'") from None
    import time

    uri = tracking_uri(run_dir)
    client = MlflowClient(uri)
    name = recipe_data.get("name") or report.recipe or "quantize-pipeline"
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name=run_dir.name, tags={
        "verdict": str(report.verdict), "scheme": str(report.scheme), "run_dir": str(run_dir),
    })
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    params = [Param(key, value) for key, value in sorted(_flatten(recipe_data).items())]
    metrics = [Metric(key, value, now, 0) for key, value in sorted(figures(report).items())]
    for start in range(0, max(len(params), len(metrics)), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, metrics=metrics[start:start + 100], params=params[start:start + 100],
                         tags=[RunTag("failed_rules", ",".join(report.failed_rules))] if start == 0 else [])
    for artifact in ARTIFACTS:
        if (run_dir / artifact).is_file():
            client.log_artifact(run_id, str(run_dir / artifact))
    client.set_terminated(run_id, "FINISHED")
    return {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run_id}
