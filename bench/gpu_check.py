"""The GPU check (issue 28): the product's GPU path, asserted, in one command that writes one JSON summary.

    python bench/gpu_check.py                       # on a GPU machine (wheels: make gpu-wheels; see docs/gpu.md)
    python bench/gpu_check.py --device cpu          # small sizes: CI runs it (tests/test_gpu_check.py)

Steps (each prints one line; a failed assertion names its step and the check exits 1; the JSON is written either way):
  1. streaming: the tiny model, `fp8` (static), quantized in streaming mode on DEVICE; its export equals the CPU
     export of the same recipe tensor by tensor (quantize_pipeline/verify/export_equality.py: the streaming-equality tolerances)
     and passes verify.
  2. in memory: the same recipe in memory on DEVICE (an accelerate device map on GPUs): equal to the same CPU
     reference, verified.
  3. synthetic: a synthetic checkpoint (bench/synthetic_llama.py; 8B-shaped on GPUs, a small shape on CPU) written
     on this machine's disk, `fp8` streaming on DEVICE: wall time, peak device memory (torch's counters) and peak
     host RSS (the quantize process tree) within 25% of plan's estimates, export verified.
  4. evaluate: step 1's export gated by `quantize-pipeline check` with the transformers engine on DEVICE: every
     figure lies in the interval the CPU run of the same check gives.

With --device cpu the CPU reference of steps 1 and 4 is the device run itself (one run, not two of the same
thing), so there step 2's in-memory export against step 1's streaming one is the comparison that can differ.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
# The quantize jobs run in child processes (quantize_pipeline.run.worker) that import this file by name.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")]))

GIB = 2**30
PLAN_TOLERANCE = 0.25
# Small sizes: the check compares devices, it does not decide a verdict. 8 calibration rows of 128 tokens (the
# streaming-equality tests'). Evaluation on GPUs: the gate's workloads of CI's slow tests (tests/ci_recipes.py: 20
# questions, 20 and 16 paragraphs, one prompt of 8 new tokens, first round only). At the CPU sizes (the run CI
# makes): the transformers fallback tests' workloads (10 questions, 6 and 4 paragraphs, 4 new tokens, eager), so
# that in CI the base model's transformers figures come from the cache those tests fill. No base perplexity of the
# completions (one more engine start).
CALIBRATION = {"samples": 8, "max_seq_len": 128}
EVALUATION = {
    "cuda": {"limit": 20, "max_limit": 20, "perplexity_limit": 20, "divergence_limit": 16,
             "prompts": ["The capital of France is"], "max_new_tokens": 8},
    "cpu": {"limit": 10, "max_limit": 10, "perplexity_limit": 6, "divergence_limit": 4,
            "prompts": ["The capital of France is"], "max_new_tokens": 4, "enforce_eager": True},
}
GATES = {"garbage_max_completion_perplexity": None}
SYNTHETIC_SHAPE = {"cuda": "8b", "cpu": "135m-4layers"}


class StepFailed(AssertionError):
    def __init__(self, step: str, message: str):
        super().__init__(f"{step}: {message}")
        self.step = step


def check(step: str, condition: bool, message: str) -> None:
    if not condition:
        raise StepFailed(step, message)


def recipe_dict(name: str, model_source: str, mode: str, device: str, dtype: str = "auto",
                sizes: str = "cuda") -> dict:
    """sizes: the evaluation workload, "cuda" or "cpu" (the check's device: its CPU reference runs at its sizes)."""
    return {"name": name, "model": {"source": model_source, "dtype": dtype}, "calibration": dict(CALIBRATION),
            "quantization": {"scheme": "fp8", "exclude": ["lm_head"], "mode": mode},
            "resources": {"device": device},
            "evaluation": {"engine": "transformers", **EVALUATION[sizes]}, "gates": dict(GATES)}


def quantize_job(recipe: dict, model_dir: str, calibrate_dir: str, out_root: str, device: str,
                 corrupt: bool = False) -> dict:
    """Child-process job: quantize -> freeze -> export on DEVICE (the runner's own job); its stage records and
    the device's peak allocated bytes (torch's counter). corrupt: store one FP8 weight back in bf16 (the test
    that shows a broken step fails)."""
    import torch

    from quantize_pipeline.quantize.stage import quantize_freeze_export

    on_gpu = device != "cpu"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    out_dirs = {stage: str(Path(out_root) / stage) for stage in ("quantize", "freeze", "model")}
    for folder in out_dirs.values():
        Path(folder).mkdir(parents=True, exist_ok=True)
    records = quantize_freeze_export(recipe, model_dir, calibrate_dir, out_dirs, device=device)
    if corrupt:
        _unquantize_one_weight(Path(out_dirs["model"]))
    return {"records": records, "device_peak_bytes": torch.cuda.max_memory_allocated() if on_gpu else 0}


def _unquantize_one_weight(model_dir: Path) -> None:
    """One FP8 weight stored back in bf16 under the same quantization_config: what verify exists to catch."""
    import torch
    from safetensors.torch import load_file, save_file

    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(shard)
        name = next((name for name in sorted(tensors) if name.endswith(".weight")
                     and tensors[name].dtype == torch.float8_e4m3fn), None)
        if name is not None:
            tensors[name] = tensors[name].to(torch.bfloat16)
            save_file(tensors, str(shard), metadata={"format": "pt"})
            return


class Check:
    def __init__(self, device: str, work: Path, model: str, tokenizer: Path, corrupt_step: int | None):
        self.device, self.work, self.model, self.tokenizer, self.corrupt_step = device, work, model, tokenizer, corrupt_step
        # A synthetic checkpoint is bf16 and computed in bf16, as on GPUs. (`auto` is float32 on AVX2-only CPUs,
        # and there a bf16 checkpoint's in-memory export stores unquantized tensors in float32 where streaming
        # keeps bf16: found by this check, see docs/performance.md.)
        self.dtype = "bfloat16" if model.startswith("synthetic:") else "auto"
        self.summary: dict = {"device": device, "steps": {}}

    # --- pieces the steps share -------------------------------------------------------------------------------
    def model_dir(self) -> Path:
        """The tiny model as a local folder: the builtin (converted once), a folder, or `synthetic:SHAPE` (random
        weights written here, with the default model's tokenizer from --tokenizer: the GPU machines lack its GGUF)."""
        from quantize_pipeline.recipe.schema import Recipe
        from quantize_pipeline.run.runner import resolve_base_model

        if self.model.startswith("synthetic:"):
            from synthetic_llama import write_checkpoint

            check("model", (self.tokenizer / "tokenizer.json").is_file(),
                  f"no tokenizer.json in {self.tokenizer} (make gpu-wheels writes .whl/tokenizer)")
            shape = self.model.removeprefix("synthetic:")
            folder = self.work / f"model-{shape}"
            write_checkpoint(shape, folder, tokenizer_from=self.tokenizer)
            return folder
        recipe = Recipe.model_validate(recipe_dict("gpu-check", self.model, "streaming", "cpu", self.dtype))
        return Path(resolve_base_model(recipe, self.work / "logs" / "model.log", say=print))

    def calibrate(self, model_dir: Path) -> Path:
        from quantize_pipeline.quantize.calibrate import calibrate
        from quantize_pipeline.recipe.schema import Recipe

        folder = self.work / "calibrate"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        calibrate(Recipe.model_validate(recipe_dict("gpu-check", self.model, "streaming", "cpu", self.dtype)), model_dir, folder)
        return folder

    def quantize(self, label: str, recipe: dict, model_dir: Path, calibrate_dir: Path, device: str,
                 corrupt: bool = False) -> dict:
        from quantize_pipeline.run.worker import call_isolated

        out_root = self.work / label
        shutil.rmtree(out_root, ignore_errors=True)
        started = time.perf_counter()
        result, peak_mb = call_isolated(
            "gpu_check:quantize_job",
            {"recipe": recipe, "model_dir": str(model_dir), "calibrate_dir": str(calibrate_dir),
             "out_root": str(out_root), "device": device, "corrupt": corrupt},
            log_path=self.work / "logs" / f"{label}.log", stage="quantize")
        return {"model": out_root / "model", "wall_s": round(time.perf_counter() - started, 1),
                "host_peak_bytes": int(peak_mb * 2**20), "device_peak_bytes": result["device_peak_bytes"],
                "mode": result["records"]["quantize"]["summary"]["mode"]}

    def verify(self, step: str, recipe: dict, base_dir: Path, export_dir: Path) -> None:
        from quantize_pipeline.recipe import checks
        from quantize_pipeline.recipe.schema import Recipe
        from quantize_pipeline.verify import verify

        out = export_dir.parent / "verify"
        out.mkdir(exist_ok=True)
        try:
            result = verify.verify(Recipe.model_validate(recipe), base_dir, export_dir,
                                   checks.weight_layer_names(base_dir), out)
        except Exception as exc:  # verify raises on a mismatch: the step fails, naming why
            raise StepFailed(step, f"verify failed: {exc}") from exc
        check(step, result["passed"] and result["quantized_layers_checked"] > 0, f"verify: {result}")

    def equal(self, step: str, reference: Path, export: Path) -> None:
        from quantize_pipeline.verify.export_equality import differences

        found = differences(reference, export)
        check(step, not found, f"{len(found)} differences from the CPU reference, first: {found[:3]}")

    # --- the steps ---------------------------------------------------------------------------------------------
    def step_streaming(self) -> None:
        step = "step 1 (streaming)"
        self.base = self.model_dir()
        self.model = str(self.base)  # every recipe below names the folder (a builtin's converted one)
        self.calibration = self.calibrate(self.base)
        recipe = recipe_dict("gpu-check", self.model, "streaming", self.device, self.dtype)
        run = self.quantize("streaming", recipe, self.base, self.calibration, self.device,
                            corrupt=self.corrupt_step == 1)
        check(step, run["mode"] == "streaming", f"quantized {run['mode']}, not streaming")
        if self.device == "cpu":
            self.reference = run["model"]
        else:
            reference = self.quantize("cpu-reference", recipe_dict("gpu-check", self.model, "streaming", "cpu", self.dtype),
                                      self.base, self.calibration, "cpu")
            self.reference = reference["model"]
            self.equal(step, self.reference, run["model"])
        self.verify(step, recipe, self.base, run["model"])
        self.streamed = run["model"]
        self.summary["steps"]["1"] = {"wall_s": run["wall_s"], "host_peak_gib": round(run["host_peak_bytes"] / GIB, 2),
                                      "device_peak_gib": round(run["device_peak_bytes"] / GIB, 2), "equal": True,
                                      "verified": True}
        print(f"{step}: fp8 streaming on {self.device} in {run['wall_s']} s, equal to the CPU export, verified")

    def step_in_memory(self) -> None:
        step = "step 2 (in memory)"
        recipe = recipe_dict("gpu-check", self.model, "in_memory", self.device, self.dtype)
        run = self.quantize("in-memory", recipe, self.base, self.calibration, self.device,
                            corrupt=self.corrupt_step == 2)
        check(step, run["mode"] == "in_memory", f"quantized {run['mode']}, not in memory")
        self.equal(step, self.reference, run["model"])
        self.verify(step, recipe, self.base, run["model"])
        self.summary["steps"]["2"] = {"wall_s": run["wall_s"], "host_peak_gib": round(run["host_peak_bytes"] / GIB, 2),
                                      "device_peak_gib": round(run["device_peak_bytes"] / GIB, 2), "equal": True,
                                      "verified": True}
        print(f"{step}: fp8 in memory on {self.device} in {run['wall_s']} s, equal to the CPU streaming export, "
              "verified")

    def step_synthetic(self) -> None:
        from memory_scaling import _calibration_tokens
        from synthetic_llama import SHAPES, write_checkpoint

        from quantize_pipeline.recipe import plan
        from quantize_pipeline.recipe.schema import Recipe

        step = "step 3 (synthetic)"
        shape = SYNTHETIC_SHAPE["cpu" if self.device == "cpu" else "cuda"]
        model_dir = self.work / f"checkpoint-{shape}"
        started = time.perf_counter()
        written = write_checkpoint(shape, model_dir)
        write_s = round(time.perf_counter() - started, 1)
        recipe = recipe_dict(f"gpu-check-{shape}", str(model_dir), "streaming", self.device, "bfloat16")
        calibration = _calibration_tokens(self.work / f"calibrate-{shape}", SHAPES[shape]["vocab_size"],
                                          CALIBRATION["samples"], CALIBRATION["max_seq_len"])
        run = self.quantize(f"synthetic-{shape}", recipe, model_dir, calibration, self.device,
                            corrupt=self.corrupt_step == 3)
        estimate = plan.make_plan(Recipe.model_validate(recipe), model_dir / "config.json",
                                  device="cpu" if self.device == "cpu" else "cuda").quantize_peaks["streaming"]
        ratios = {"host": run["host_peak_bytes"] / estimate["host"]}
        if self.device != "cpu":
            ratios["device"] = run["device_peak_bytes"] / estimate["device"]
        self.summary["steps"]["3"] = {
            "shape": shape, "checkpoint_gib": round(written["bytes"] / GIB, 2), "write_s": write_s,
            "wall_s": run["wall_s"], "host_peak_gib": round(run["host_peak_bytes"] / GIB, 2),
            "host_plan_gib": round(estimate["host"] / GIB, 2), "device_peak_gib": round(run["device_peak_bytes"] / GIB, 2),
            "device_plan_gib": round(estimate["device"] / GIB, 2),
            "measured_over_plan": {where: round(ratio, 2) for where, ratio in ratios.items()}}
        # The export first: a wrong export is the failure to name, whatever the memory (a sampled peak varies by run).
        self.verify(step, recipe, model_dir, run["model"])
        self.summary["steps"]["3"]["verified"] = True
        for where, ratio in ratios.items():
            check(step, abs(ratio - 1) <= PLAN_TOLERANCE,
                  f"peak {where} memory {ratio:.2f}x plan's estimate (tolerance {PLAN_TOLERANCE:.0%})")
        print(f"{step}: {shape} ({written['bytes'] / GIB:.1f} GiB) fp8 streaming on {self.device} in {run['wall_s']} s; "
              f"peak/plan " + ", ".join(f"{where} {ratio:.2f}" for where, ratio in ratios.items()) + "; verified")

    def gate(self, label: str, device: str) -> dict:
        """`quantize-pipeline check` of step 1's export on DEVICE with the transformers engine: report.json."""
        recipe_path = self.work / f"check-{label}.yaml"
        import yaml

        recipe = recipe_dict("gpu-check", self.model, "streaming", device, self.dtype, sizes=self.device)
        recipe_path.write_text(yaml.safe_dump(recipe))
        out = self.work / f"check-{label}"
        shutil.rmtree(out, ignore_errors=True)
        completed = subprocess.run(
            [sys.executable, "-m", "quantize_pipeline.cli", "check", str(self.streamed), "--base", str(self.base),
             "--recipe", str(recipe_path), "--output-dir", str(out)], capture_output=True, text=True)
        reports = sorted(out.glob("*/*/gate/report.json"))
        check("step 4 (evaluate)", completed.returncode in (0, 3, 4) and len(reports) == 1,
              f"check on {device} exited {completed.returncode}: {completed.stderr.strip()[-500:]}")
        return json.loads(reports[0].read_text())

    def step_evaluate(self) -> None:
        step = "step 4 (evaluate)"
        report = self.gate(self.device, self.device)
        check(step, report["engine"]["name"] == "transformers", f"evaluated by {report['engine']['name']}")
        reference = report if self.device == "cpu" else self.gate("cpu-reference", "cpu")
        figures = {}
        for rule, on_cpu in zip(report["rules"], reference["rules"]):
            check(step, rule["rule"] == on_cpu["rule"], f"rules differ: {rule['rule']} vs {on_cpu['rule']}")
            low, high = on_cpu["interval"] or (on_cpu["figure"], on_cpu["figure"])
            figures[rule["rule"]] = {"figure": rule["figure"], "cpu_interval": [low, high]}
            check(step, low - 1e-9 <= rule["figure"] <= high + 1e-9,
                  f"{rule['rule']} {rule['figure']} on {self.device} is outside the CPU run's [{low}, {high}]")
        self.summary["steps"]["4"] = {"verdict": report["verdict"], "figures": figures}
        print(f"{step}: transformers on {self.device}: verdict {report['verdict']}, every figure of "
              f"{len(figures)} rules in the CPU run's interval")


STEPS = {1: Check.step_streaming, 2: Check.step_in_memory, 3: Check.step_synthetic, 4: Check.step_evaluate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct",
                        help="the tiny model: builtin:NAME, a .gguf file, a local HF folder, or synthetic:SHAPE "
                             "(bench/synthetic_llama.py's shapes, random weights, with --tokenizer's files)")
    parser.add_argument("--tokenizer", type=Path, default=BENCH.parent / ".whl" / "tokenizer",
                        help="for synthetic:SHAPE: the default model's tokenizer files (make gpu-wheels writes them)")
    parser.add_argument("--steps", default="1,2,3,4", help="comma-separated step numbers (2 and 4 need 1)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qp-gpu-check"))
    parser.add_argument("--json", type=Path, default=None, help="the summary file (default: WORK/gpu_check.json)")
    parser.add_argument("--corrupt-step", type=int, default=None, help=argparse.SUPPRESS)  # tests/test_gpu_check.py
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu check: torch sees no CUDA device; run with --device cpu for the CPU sizes", file=sys.stderr)
            return 2
    args.work.mkdir(parents=True, exist_ok=True)
    summary_path = args.json or args.work / "gpu_check.json"
    runner = Check(args.device, args.work, args.model, args.tokenizer, args.corrupt_step)
    runner.summary["machine"] = _machine(args.device)
    started, code = time.perf_counter(), 0
    try:
        for number in sorted(int(part) for part in args.steps.split(",")):
            STEPS[number](runner)
    except StepFailed as exc:
        print(f"FAILED {exc}", file=sys.stderr)
        runner.summary["failed"] = {"step": exc.step, "message": str(exc)}
        code = 1
    except Exception as exc:  # a crash inside a step: named like a failed assertion, traceback kept
        traceback.print_exc()
        runner.summary["failed"] = {"step": "crash", "message": f"{type(exc).__name__}: {exc}"}
        code = 1
    runner.summary["wall_s"] = round(time.perf_counter() - started, 1)
    runner.summary["passed"] = code == 0
    summary_path.write_text(json.dumps(runner.summary, indent=2) + "\n")
    print(json.dumps(runner.summary))
    return code


def _machine(device: str) -> dict:
    import platform

    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()}
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        found |= {"gpu": properties.name, "gpu_memory_gib": round(properties.total_memory / GIB, 1)}
    return found


if __name__ == "__main__":
    sys.exit(main())
