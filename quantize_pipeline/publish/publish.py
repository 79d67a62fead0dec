"""publish: only after a passing gate, the model + card + provenance go to publish.target.

A local folder appears whole or not at all (staged beside it, then renamed);
a Hub repo gets one atomic commit (quantize_pipeline/publish/hub.py). Publishing the same
content again changes nothing and says where it already is. The HF token is
checked before any upload and never written anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from quantize_pipeline.errors import GateFailed, VerifyFailed
from quantize_pipeline.publish import hub
from quantize_pipeline.publish.card import build_model_card
from quantize_pipeline.recipe.schema import Recipe
from quantize_pipeline.run.manifest import MANIFEST_FILE
from quantize_pipeline.run.rundir import hash_tree, read_json, sha256_file, staged_folder
from quantize_pipeline.verdict.record import Report, Verdict, load_report
from quantize_pipeline.verdict.report import ACCURACY_PLOT, render_markdown

# The Hub id that a shipped builtin model was made from, for the card's base_model.
BUILTIN_BASE_MODEL_IDS = {"builtin:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# Shipped task -> (dataset id, dataset name) for the card's model-index.
TASK_DATASETS = {"arc_easy": ("allenai/ai2_arc", "ARC-Easy"), "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge")}
PROVENANCE_FILES = ("recipe.yaml", "report.json", MANIFEST_FILE, ACCURACY_PLOT)
# Stands for a folder of the machine that published the bundle (absolute paths are not carried over).
LOCAL_PATH_PLACEHOLDER = "<publishing machine>"
# What the publish stage itself writes into the run (left out of the published manifest).
PUBLISH_OWN_FILES = ("publish/", "logs/publish.log")


def base_model_id(recipe: Recipe) -> str:
    source = recipe.model.source
    if recipe.model.kind == "hub":
        return source
    return BUILTIN_BASE_MODEL_IDS.get(source, Path(source).stem)


def model_card(recipe: Recipe, report: Report, serve_as: str) -> str:
    task_results = []
    for task, figures in report.evaluation.tasks.items():
        dataset_type, dataset_name = TASK_DATASETS.get(task, (task.removeprefix("lm_eval:"), task.removeprefix("lm_eval:")))
        task_results.append({
            "task_type": "text-generation", "dataset_type": dataset_type, "dataset_name": dataset_name,
            "metric_type": "acc", "base": figures.base.acc, "quantized": figures.quantized.acc,
        })
    card = build_model_card(
        model_name=recipe.name,
        base_model=base_model_id(recipe),
        scheme=recipe.scheme.name,
        scheme_description=recipe.scheme.description,
        weight_dtype_tag=recipe.scheme.weight_dtype.split("_")[0],
        excluded=list(recipe.quantization.exclude),
        kv_cache=recipe.quantization.kv_cache,
        task_results=task_results,
        gate_markdown=render_markdown(report, plot_link=f"provenance/{ACCURACY_PLOT}"),
        serve_as=serve_as,
    )
    extras = "".join(f"\n## {title}\n\n{text}\n" for title, text in recipe.publish.card_extras.items())
    return card + extras


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)  # same filesystem: no second copy of the weights
    except OSError:
        shutil.copy2(source, destination)


def build_bundle(recipe: Recipe, run_dir: Path, report: Report, bundle: Path, serve_as: str) -> None:
    """What gets published: model/ files, a model card, and the run's provenance."""
    shutil.copytree(run_dir / "model", bundle, dirs_exist_ok=True, copy_function=_link_or_copy)
    (bundle / "README.md").write_text(model_card(recipe, report, serve_as), encoding="utf-8")
    provenance = bundle / "provenance"
    provenance.mkdir()
    for name in PROVENANCE_FILES:
        source = run_dir / name
        if not source.is_file():
            continue
        if name == MANIFEST_FILE:
            (provenance / name).write_text(json.dumps(portable(provenance_manifest(read_json(source))), indent=2) + "\n")
        elif name.endswith(".json"):
            (provenance / name).write_text(json.dumps(portable(read_json(source)), indent=2, sort_keys=True) + "\n")
        elif name.endswith(".yaml"):
            text = yaml.safe_dump(portable(yaml.safe_load(source.read_text())), sort_keys=False)
            (provenance / name).write_text(text)
        else:
            shutil.copy2(source, provenance / name)


def portable(value):
    """The value with every absolute path of this machine replaced by a placeholder and the last part
    of the path: a published bundle is copied elsewhere, where this machine's folders mean nothing."""
    if isinstance(value, dict):
        return {key: portable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [portable(item) for item in value]
    if isinstance(value, str) and value.startswith("/") and "\n" not in value and Path(value).is_absolute():
        return f"{LOCAL_PATH_PLACEHOLDER}/{Path(value).name}"
    return value


def serve_location(target: str) -> str:
    """What the card's vLLM snippet loads: the Hub repo id, or for a folder target a relative path to
    the folder by its name (the bundle is meant to be copied; the absolute path here would be wrong there)."""
    repo_id = hub.parse_hub_target(target)
    return repo_id or f"./{Path(target).name}"


def provenance_manifest(manifest: dict) -> dict:
    """The manifest as published: without the publish stage's own record and files. A publish cannot
    describe itself, and `publish RUN_DIR` records itself in the manifest: publishing the same run
    again must still see the same bundle (and change nothing)."""
    stages = {stage: record for stage, record in manifest.get("stages", {}).items() if stage != "publish"}
    published = {**manifest, "stages": stages}
    if "files" in manifest:
        published["files"] = {name: digest for name, digest in manifest["files"].items()
                              if not name.startswith(PUBLISH_OWN_FILES)}
    return published


def check_publishable(run_dir: Path) -> Report:
    """The run's report, if it passed its gate and its files still match the manifest."""
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise GateFailed(f"{run_dir}: no report.json: the run never reached its gate", stage="publish")
    report = load_report(report_path)
    if report.verdict != Verdict.PASS:
        raise GateFailed(f"{run_dir}: gate verdict is '{report.verdict}': refusing to publish", stage="publish")
    manifest = read_json(run_dir / MANIFEST_FILE)
    for name, digest in manifest.get("files", {}).items():
        if not name.startswith("publish/") and (not (run_dir / name).is_file() or sha256_file(run_dir / name) != digest):
            raise VerifyFailed(f"{run_dir}: {name} does not match manifest.json: refusing to publish", stage="publish")
    return report


def publish(recipe: Recipe, run_dir: Path, report: Report, out_dir: Path, *, dry_run: bool = False) -> dict:
    target = recipe.publish.target
    repo_id = hub.parse_hub_target(target)
    serve_as = serve_location(target)
    token = None
    if repo_id is not None and not dry_run:
        token = hub.resolve_token()
        hub.check_token(token, recipe.publish.endpoint)  # one line, before any upload
    bundle = out_dir / "bundle"
    build_bundle(recipe, run_dir, report, bundle, serve_as)
    listing = hub.dry_run_listing(bundle)
    summary: dict = {"target": target, "files": {item["path"]: item["sha256"] for item in listing}}
    if dry_run:
        summary["dry_run"] = True
        summary["listing"] = listing
    elif repo_id is not None:
        result = hub.publish_folder(
            bundle, repo_id, token=token, endpoint=recipe.publish.endpoint, private=recipe.publish.private,
            revision=recipe.publish.revision, commit_message=f"{recipe.name}: {recipe.scheme.name}, gate passed",
        )
        summary.update(result)
    else:
        summary.update(_publish_local(bundle, Path(target)))
    shutil.rmtree(bundle)  # the run keeps model/; the bundle was hard links and small files
    (out_dir / "publish.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _publish_local(bundle: Path, target: Path) -> dict:
    if target.is_dir() and hash_tree(target) == hash_tree(bundle):
        return {"url": str(target.resolve()), "already_published": True}
    with staged_folder(target) as staging:
        shutil.copytree(bundle, staging, dirs_exist_ok=True)
    return {"url": str(target.resolve()), "already_published": False}
