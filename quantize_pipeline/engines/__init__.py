"""One object per (model, engine): load once, then generate, evaluate and score with it.

`load(model_dir, options)` picks the engine named by the options from a small registry;
engine modules are imported only when loaded (vLLM's import alone takes seconds).
The serve stage (`serve.py`) and the engine settings built from a recipe (`settings.py`) live here too.
"""

from __future__ import annotations

import importlib
import importlib.metadata

from quantize_pipeline.engines.base import Engine, Generation
from quantize_pipeline.engines.lm_eval_vllm import vllm_version
from quantize_pipeline.engines.settings import EngineOptions

# name -> ("module:class", distribution whose version is the engine's version; vLLM's has two names)
ENGINES = {
    "vllm": ("quantize_pipeline.engines.vllm:VllmEngine", "vllm"),
    "transformers": ("quantize_pipeline.engines.transformers:TransformersEngine", "transformers"),
    # Baseline columns only (recipe `baselines:`): the base model quantized on load.
    "bitsandbytes-int8": ("quantize_pipeline.engines.bitsandbytes:Int8Engine", "bitsandbytes"),
    "bitsandbytes-nf4": ("quantize_pipeline.engines.bitsandbytes:NF4Engine", "bitsandbytes"),
}

__all__ = ["ENGINES", "Engine", "Generation", "load", "version"]


def load(model_dir: str, options: EngineOptions, *, sleep_mode: bool = False) -> Engine:
    """The loaded engine (import and load timed apart: engine.import_s, engine.load_s). sleep_mode: built so that it
    can sleep (give the accelerator's memory back between calls), where the engine and the platform can: its
    `sleep_mode` attribute says whether it was."""
    module_name, class_name = ENGINES[options.engine][0].split(":")
    engine_class = getattr(importlib.import_module(module_name), class_name)
    if sleep_mode and getattr(engine_class, "has_sleep_mode", False):
        return engine_class(model_dir, options, sleep_mode=True)
    return engine_class(model_dir, options)


def version(engine_name: str) -> str:
    """Version of the engine package, from metadata (no import)."""
    distribution = ENGINES[engine_name][1]
    return vllm_version() if distribution == "vllm" else importlib.metadata.version(distribution)
