"""Functions that tests run through quantize_pipeline.run.worker.call_isolated (real child processes)."""

from __future__ import annotations

import subprocess
import sys

from quantize_pipeline.errors import VerifyFailed


def spawn_grandchild(pid_file: str) -> dict:
    """Leave a long-running grandchild behind, as vLLM's engine can."""
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(pid_file, "w") as handle:
        handle.write(str(grandchild.pid))
    return {"grandchild": grandchild.pid}


def allocate(megabytes: int, hold_s: float = 0.6) -> dict:
    """Hold the memory a while, as a loaded model does: the parent's RSS samples (every 0.2 s) see it even
    where the kernel's lifetime peak (ru_maxrss) misses an allocation freed at once (seen once under load)."""
    import time

    block = bytearray(megabytes * 2**20)
    time.sleep(hold_s)
    return {"allocated": len(block)}


def raise_recipe_error() -> None:
    from quantize_pipeline.errors import RecipeError

    raise RecipeError("recipes/x.yaml", "resources.device", "'cuda' asked for, no CUDA device here")


def raise_verify_failed() -> dict:
    raise VerifyFailed("tensors do not match")


def crash() -> dict:
    raise ZeroDivisionError("boom")


def count_with_tqdm(steps: int) -> dict:
    """Draw a tqdm bar, as Quark, vLLM and lm-eval do."""
    from tqdm import tqdm

    done = 0
    for _ in tqdm(range(steps), desc="counting things", mininterval=0):
        done += 1
    return {"counted": done}


def spawn_grandchild_and_wait(pid_file: str) -> dict:
    """A stage that never ends on its own, with a grandchild (as vLLM's engine): 'worker_pid grandchild_pid'."""
    import os
    import time

    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(pid_file, "w") as handle:
        handle.write(f"{os.getpid()} {grandchild.pid}")
    time.sleep(600)
    return {}


def _engine(model_dir: str, recipe_path: str):
    from quantize_pipeline import engines
    from quantize_pipeline.engines import settings as engine
    from quantize_pipeline.recipe.schema import load_recipe

    options = engine.engine_options(load_recipe(recipe_path), quantized=True)
    engine.prepare_environment(options)
    return engines.load(model_dir, options)


def generate(model_dir: str, recipe_path: str, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """Greedy completions of a model folder by the recipe's engine settings (does a published copy serve?)."""
    return [{"completion": item.text, "tokens": item.tokens}
            for item in _engine(model_dir, recipe_path).generate(prompts, max_new_tokens)]


def serving_figures_and_hand_timed(model_dir: str, recipe_path: str, out_dir: str) -> dict:
    """serve's figures, then llm.generate timed by hand on the same load, same prompts and settings."""
    import statistics
    import time
    from dataclasses import asdict
    from pathlib import Path

    from vllm import SamplingParams

    from quantize_pipeline import engines
    from quantize_pipeline.engines import serve
    from quantize_pipeline.recipe.schema import load_recipe

    spec = load_recipe(recipe_path).evaluation
    loaded = _engine(model_dir, recipe_path)
    sampling = SamplingParams(temperature=0.0, max_tokens=spec.max_new_tokens)

    def hand_timed() -> float:
        started = time.perf_counter()
        outputs = loaded.llm.generate(list(spec.prompts), sampling, use_tqdm=False)
        seconds = time.perf_counter() - started
        return sum(len(output.outputs[0].token_ids) for output in outputs) / seconds

    hand_timed()  # warm-up, as serve's own
    # Timed before and after serve: a 2-core machine drifts by 10-20% within a minute, so the figure
    # is compared with the spread of hand timings around it, not with one median taken after it.
    rates = [hand_timed() for _ in range(serve.REPEATS)]
    figures = serve.serve(loaded, engines.version(loaded.name), list(spec.prompts), spec.max_new_tokens, Path(out_dir))
    rates += [hand_timed() for _ in range(serve.REPEATS)]
    return {"figures": asdict(figures), "hand_timed_tokens_per_s": statistics.median(rates), "hand_timed_rates": rates}


_remembered: list[int] = []  # lives as long as the child: a Session's later calls see it


def remember(value: int) -> dict:
    import os

    _remembered.append(value)
    return {"remembered": list(_remembered), "pid": os.getpid()}


def engine_job(model_dir: str, engine_options: dict, value: int) -> dict:
    """Stands in for an evaluate job (EngineChildren's tests): the first call in a child "starts an engine"."""
    started = not _remembered
    result = remember(value)
    return {**result, "engine_start": {"role": model_dir} if started else None}


def exit_hard(code: int) -> dict:
    """Die as an OOM kill or a segfault would: no result, no traceback."""
    import os

    os._exit(code)
