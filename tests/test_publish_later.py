"""`publish RUN_DIR` records the publish stage in the run's manifest, so a resume keeps it."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from quantize_pipeline.recipe.schema import PublishSpec, load_recipe
from quantize_pipeline.run.resume import STAGES, reusable_stages, stage_config_sha256
from quantize_pipeline.run.rundir import hash_tree
from tests.conftest import REPO


def _passed_run_without_publish(tmp_path):
    """A finished run (gate passed, no publish target at run time), fabricated: small files, real hashes."""
    recipe_data = yaml.safe_load((REPO / "recipes" / "smollm2-135m-int8.yaml").read_text())
    recipe_data.pop("publish")
    run_dir = tmp_path / "exports" / recipe_data["name"] / "20260101T000000Z-abcdef12"
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe_data, sort_keys=False))
    recipe = load_recipe(run_dir / "recipe.yaml")
    (run_dir / "model" / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "quark"}}))
    (run_dir / "model" / "model.safetensors").write_bytes(b"\0" * 64)
    report = {"recipe": recipe.name, "verdict": "pass", "scheme": "int8_per_channel", "rules": [],
              "evaluation": {"tasks": {}}}
    (run_dir / "report.json").write_text(json.dumps(report))
    stages = {stage: {"status": "done", "config_sha256": stage_config_sha256(recipe, stage, "vllm"), "outputs": {}}
              for stage in STAGES if stage != "publish"}
    manifest = {"recipe": recipe.name, "recipe_sha256": recipe.content_hash(), "status": "passed",
                "engine": {"name": "vllm"}, "stages": stages, "files": hash_tree(run_dir)}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return run_dir, recipe


def test_publish_later_is_recorded_in_the_manifest_and_kept_on_resume(tmp_path):
    run_dir, recipe = _passed_run_without_publish(tmp_path)
    target = tmp_path / "published"
    done = subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", "publish", str(run_dir), "--target", str(target)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("published:"), done.stderr
    manifest = json.loads((run_dir / "manifest.json").read_text())
    record = manifest["stages"]["publish"]
    assert record["status"] == "done" and record["published_later"] and record["summary"]["url"] == str(target)
    assert record["outputs"] == {"publish/publish.json": hash_tree(run_dir / "publish")["publish.json"]}
    assert "publish/publish.json" in manifest["files"] and manifest["status"] == "passed"
    assert "done later" in (run_dir / "logs" / "publish.log").read_text()
    published_manifest = json.loads((target / "provenance" / "manifest.json").read_text())
    assert "publish" not in published_manifest["stages"] and published_manifest["stages"]["gate"]["status"] == "done"

    # Recording itself did not change what gets published: the same run again changes nothing.
    again = subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", "publish", str(run_dir), "--target", str(target)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert again.returncode == 0 and again.stdout.startswith("already published, unchanged"), again.stdout + again.stderr
    manifest = json.loads((run_dir / "manifest.json").read_text())

    # A resume with the same target keeps every stage, publish included: nothing is published again.
    published = recipe.model_copy(update={"publish": PublishSpec(target=str(target))})
    assert list(reusable_stages(manifest, published, "vllm", run_dir, None)) == list(STAGES)
    # ...while a resume that publishes elsewhere redoes the publish stage only.
    elsewhere = recipe.model_copy(update={"publish": PublishSpec(target=str(tmp_path / "other"))})
    assert list(reusable_stages(manifest, elsewhere, "vllm", run_dir, None)) == list(STAGES[:-1])


def test_a_published_folder_names_no_path_of_the_machine_that_made_it(tmp_path):
    """The bundle is copied or uploaded: its card loads the model by a relative path and its
    provenance carries no absolute path of this machine (run dir, model cache, recipe folders)."""
    run_dir, _ = _passed_run_without_publish(tmp_path)
    report = json.loads((run_dir / "report.json").read_text())
    report.update(run_dir=str(run_dir), base_model={"path": str(tmp_path / "cache" / "smollm2"), "sha256": "ab"})
    (run_dir / "report.json").write_text(json.dumps(report))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest.update(base_model={"source": "builtin:smollm2-135m-instruct", "path": str(tmp_path / "cache" / "smollm2")},
                    files={name: digest for name, digest in hash_tree(run_dir).items() if name != "manifest.json"})
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    target = tmp_path / "published" / "smollm2-int8"
    done = subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", "publish", str(run_dir), "--target", str(target)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    card = (target / "README.md").read_text()
    assert 'LLM(model="./smollm2-int8", quantization="quark")  # the folder of this README' in card
    texts = {"README.md": card} | {f"provenance/{path.name}": path.read_text()
                                   for path in (target / "provenance").iterdir() if path.suffix in (".json", ".yaml")}
    assert set(texts) >= {"README.md", "provenance/report.json", "provenance/manifest.json", "provenance/recipe.yaml"}
    for name, text in texts.items():
        assert str(tmp_path) not in text and str(REPO) not in text, name
    published_report = json.loads(texts["provenance/report.json"])
    assert published_report["base_model"]["path"] == "<publishing machine>/smollm2"
