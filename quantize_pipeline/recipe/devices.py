"""Where heavy work runs: the recipe's `resources.device` resolved against what torch sees.

The runner process stays light (no torch): the accelerators are read by a short child
(`python -c "import torch; ..."`), once per process and only when the recipe may use one.
A device the recipe asks for and torch cannot see is a one-line error before anything loads.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from quantize_pipeline.errors import RecipeError
from quantize_pipeline.recipe.compute_dtype import GPU_DEVICE_NODES, gpu_present
from quantize_pipeline.recipe.schema import Recipe, ResourcesSpec

# Share of this machine's memory the quantize stage may take when the recipe sets no budget.
DEFAULT_HOST_MEMORY_SHARE = 0.8
_PROBE = (
    "import json, torch\n"
    "count = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
    "print(json.dumps({'torch': torch.__version__, 'hip': torch.version.hip, 'cuda': torch.version.cuda,"
    " 'count': count, 'memory': [torch.cuda.get_device_properties(i).total_memory for i in range(count)],"
    " 'names': [torch.cuda.get_device_name(i) for i in range(count)]}))\n"
)


@dataclass(frozen=True)
class Accelerators:
    """What torch sees on this machine."""

    torch_version: str
    kind: str | None  # "cuda", "rocm" or None (no accelerator torch can use)
    count: int
    memory_bytes: tuple[int, ...]
    names: tuple[str, ...]

    def describe(self) -> str:
        if self.torch_version == NO_ACCELERATOR_NODES:
            return f"this machine has {NO_ACCELERATOR_NODES}"
        if self.kind is None:
            return f"torch {self.torch_version} sees no accelerator"
        return f"torch {self.torch_version} sees {self.count} {self.kind} device(s): {', '.join(self.names)}"


# Without these device nodes no torch build can reach a GPU: skip the probe (it costs an import of torch).
NO_ACCELERATOR_NODES = "no GPU device node (" + ", ".join(GPU_DEVICE_NODES) + ")"


@functools.cache
def accelerators() -> Accelerators:
    """Probe torch in a child process (the caller never imports torch for this)."""
    if not gpu_present():
        return Accelerators(NO_ACCELERATOR_NODES, None, 0, (), ())
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"could not ask torch for its devices: {last}")
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    kind = None if seen["count"] == 0 else "rocm" if seen["hip"] else "cuda"
    return Accelerators(seen["torch"], kind, seen["count"], tuple(seen["memory"]), tuple(seen["names"]))


def resolve_device(resources: ResourcesSpec, recipe_path: str, seen: Accelerators | None = None) -> str:
    """The torch device type for the recipe ("cpu" or "cuda"; ROCm builds of torch call their GPUs "cuda").

    auto takes the accelerator when torch sees one; cuda/rocm that torch cannot see are refused."""
    if resources.device == "cpu":
        return "cpu"
    seen = seen or accelerators()
    if resources.device == "auto":
        return "cpu" if seen.kind is None else "cuda"
    if seen.kind != resources.device:
        raise RecipeError(recipe_path, "resources.device",
                          f"{resources.device} requested but {seen.describe()}; set device: auto or cpu")
    return "cuda"


def host_memory_budget_bytes(recipe: Recipe) -> int:
    """Host RAM the quantize stage may use: the recipe's budget, else a share of this machine's."""
    if recipe.resources.host_memory_gb is not None:
        return int(recipe.resources.host_memory_gb * 2**30)
    return int(psutil.virtual_memory().total * DEFAULT_HOST_MEMORY_SHARE)


def max_memory(resources: ResourcesSpec, device_count: int) -> dict | None:
    """accelerate's max_memory ({gpu index: "NGiB"}) from the recipe's per-device limits; None: accelerate decides."""
    limits = resources.device_memory_gb
    if limits is None:
        return None
    if not isinstance(limits, dict):
        limits = {index: limits for index in range(device_count)}
    return {index: f"{gib:g}GiB" for index, gib in sorted(limits.items())}
