"""MLflow reporting against a real local file store, read back with MLflow's own client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from quantize_pipeline.verdict.mlflow_report import LOCAL_STORE, log_run
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
    assert run.info.status == "FINISHED" and run.data.tags["verdict"] == report.verdict == "pass"
    assert client.get_experiment(logged["experiment_id"]).name == "t"
    assert run.data.params["gates.min_recovery"] == "0.9" and run.data.params["quantization.scheme"] == "int8_per_channel"
    assert run.data.params["evaluation.limit"] == "200"
    recovery = next(rule for rule in report.rules if rule.rule == "min_recovery[arc_easy]")
    metrics = run.data.metrics
    assert metrics["gate.min_recovery.arc_easy.figure"] == recovery.figure
    assert metrics["gate.min_recovery.arc_easy.interval_low"] == recovery.interval[0]
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
    from pydantic import ValidationError

    from quantize_pipeline.recipe.schema import Recipe

    base = {"name": "t", "model": {"source": "builtin:smollm2-135m-instruct"}, "quantization": {"scheme": "int8_per_channel"}}
    assert Recipe.model_validate({**base, "report_to": ["mlflow"]}).report_to == ("mlflow",)
    with pytest.raises(ValidationError, match="report_to"):
        Recipe.model_validate({**base, "report_to": ["wandb"]})


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """A real MLflow tracking server (`mlflow server`, SQLite backend, artifacts served by it) on a loopback
    port, as teams run one; make install puts full mlflow in .venv/mlflow-server."""
    mlflow = Path(sys.prefix) / "mlflow-server" / "bin" / "mlflow"
    assert mlflow.is_file(), f"{mlflow}: missing: `make install` builds the tests' MLflow server"
    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
         str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-3000:]
            time.sleep(1)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()


@pytest.mark.slow
def test_a_gated_run_reads_back_from_a_tracking_server(tracking_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    run_dir, report, recipe_data = _run_dir(tmp_path)
    logged = log_run(run_dir, report, recipe_data)
    assert logged["tracking_uri"] == tracking_server and not (run_dir / LOCAL_STORE).exists()

    client = MlflowClient(tracking_server)  # a second client, as a teammate's would be
    run = client.get_run(logged["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["verdict"] == report.verdict == "pass"
    assert client.get_experiment(logged["experiment_id"]).name == "t"
    assert run.data.params["quantization.scheme"] == "int8_per_channel" and run.data.params["evaluation.limit"] == "200"
    recovery = next(rule for rule in report.rules if rule.rule == "min_recovery[arc_easy]")
    assert run.data.metrics["gate.min_recovery.arc_easy.figure"] == recovery.figure
    artifacts = {item.path for item in client.list_artifacts(logged["run_id"])}
    assert {"report.json", "report.md", "accuracy.png", "manifest.json", "recipe.yaml"} <= artifacts
    fetched = client.download_artifacts(logged["run_id"], "report.json", str(tmp_path / "fetched"))
    assert Path(fetched).read_bytes() == (run_dir / "report.json").read_bytes()
