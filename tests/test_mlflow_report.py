"""MLflow reporting against a real local file store, read back with MLflow's own client."""

from __future__ import annotations

import json

import yaml
from mlflow.tracking import MlflowClient

from pipeline.mlflow_report import LOCAL_STORE, log_run
from tests.test_gate import _evaluation, _facts, _gate, _recipe


def _run_dir(tmp_path):
    recipe = _recipe(min_recovery=0.9)
    report = _gate(recipe, _facts(), _evaluation(), tmp_path)
    run_dir = tmp_path / "gate"  # report.json, report.md, accuracy.png are here
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    (run_dir / "manifest.json").write_text(json.dumps({"run_id": "r1"}))
    return run_dir, report, recipe.model_dump(mode="json")


def test_run_lands_in_a_local_store_under_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir, report, recipe_data = _run_dir(tmp_path)
    logged = log_run(run_dir, report, recipe_data)
    assert logged["tracking_uri"] == (run_dir / LOCAL_STORE).resolve().as_uri()

    client = MlflowClient(logged["tracking_uri"])
    run = client.get_run(logged["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["verdict"] == report["verdict"] == "pass"
    assert client.get_experiment(logged["experiment_id"]).name == "t"
    assert run.data.params["gates.min_recovery"] == "0.9" and run.data.params["quantization.scheme"] == "int8_per_channel"
    assert run.data.params["evaluation.limit"] == "200"
    recovery = next(rule for rule in report["rules"] if rule["rule"] == "min_recovery[arc_easy]")
    metrics = run.data.metrics
    assert metrics["gate.min_recovery.arc_easy.figure"] == recovery["figure"]
    assert metrics["gate.min_recovery.arc_easy.interval_low"] == recovery["interval"][0]
    assert metrics["gate.min_recovery.arc_easy.state"] == 1.0
    assert metrics["eval.arc_easy.quantized.acc"] == 0.49 and metrics["eval.divergence.mean_kl"] == 0.02
    artifacts = {item.path for item in client.list_artifacts(logged["run_id"])}
    assert {"report.json", "report.md", "accuracy.png", "manifest.json", "recipe.yaml"} <= artifacts


def test_tracking_uri_from_the_environment_wins(tmp_path, monkeypatch):
    store = tmp_path / "elsewhere"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir, report, recipe_data = _run_dir(tmp_path)
    logged = log_run(run_dir, report, recipe_data)
    assert logged["tracking_uri"] == store.as_uri() and not (run_dir / LOCAL_STORE).exists()
    assert MlflowClient(store.as_uri()).get_run(logged["run_id"]).data.tags["scheme"] == "int8_per_channel"


def test_recipe_names_mlflow_and_nothing_unknown():
    import pytest
    from pydantic import ValidationError

    from pipeline.recipe import Recipe

    base = {"name": "t", "model": {"source": "builtin:smollm2-135m-instruct"}, "quantization": {"scheme": "int8_per_channel"}}
    assert Recipe.model_validate({**base, "report_to": ["mlflow"]}).report_to == ("mlflow",)
    with pytest.raises(ValidationError, match="report_to"):
        Recipe.model_validate({**base, "report_to": ["wandb"]})
