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


_asleep: list[bool] = [False]  # the stand-in engine's sleep (engine_job, sleep_job)


def _awake_file(model_dir: str):
    import os
    from pathlib import Path

    return Path(model_dir).parent / f"awake-{os.getpid()}"


def engine_job(model_dir: str, engine_options: dict, value: int, may_sleep: bool = False, sleep_fails: bool = False,
               wake_fails: bool = False, start_fails_beside_a_sleeper: bool = False) -> dict:
    """Stands in for an evaluate job (EngineChildren's tests): the first call in a child "starts an engine" (one
    that can sleep when may_sleep), a later one wakes it if it sleeps. On an accelerator ("device" not "cpu") it
    fails if another live child's engine is awake, as a second engine on a full GPU would."""
    import json
    import os

    if engine_options["device"] != "cpu":
        for marker in _awake_file(model_dir).parent.glob("awake-*"):
            pid = int(marker.name.split("-")[1])
            if pid != os.getpid() and _alive(pid):
                raise RuntimeError(f"another engine is awake on the accelerator (pid {pid})")
    started = not _remembered
    if started and start_fails_beside_a_sleeper and any(
            _alive(int(marker.name.split("-")[1])) for marker in _awake_file(model_dir).parent.glob("asleep-*")):
        raise RuntimeError("not enough device memory beside a sleeping engine")
    woke = _asleep[0]
    if woke and wake_fails:
        raise RuntimeError("wake_up failed")
    _asleep[0] = False
    _awake_file(model_dir).with_name(f"asleep-{os.getpid()}").unlink(missing_ok=True)
    _awake_file(model_dir).write_text(json.dumps({"sleep_fails": sleep_fails}))
    result = remember(value)
    return {**result, "woke": woke,
            "engine_start": {"role": model_dir, "sleep_mode": may_sleep} if started else None}


def sleep_job() -> dict:
    """Stands in for evaluate's sleep_job: the stand-in engine sleeps (or fails to, as asked at its start)."""
    import json

    awake = list(_awake_file_of_self())
    if awake and json.loads(awake[0].read_text())["sleep_fails"]:
        raise RuntimeError("sleep failed")
    for marker in awake:
        marker.rename(marker.with_name(marker.name.replace("awake-", "asleep-")))
    _asleep[0] = True
    return {"asleep": True, "seconds": 0.0}


def _awake_file_of_self():
    import os
    from pathlib import Path

    return Path(os.environ["QP_TEST_AWAKE_DIR"]).glob(f"awake-{os.getpid()}")


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def exit_hard(code: int) -> dict:
    """Die as an OOM kill or a segfault would: no result, no traceback."""
    import os

    os._exit(code)
