"""Memory while an engine works: host RSS of this process tree and accelerator memory, sampled."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from quantize_pipeline.engines.settings import CPU_KV_CACHE_GIB, EngineOptions
from quantize_pipeline.run.worker import tree_rss_bytes

SAMPLE_INTERVAL_S = 0.05


def device_used_mb() -> float | None:
    """Memory in use on the current accelerator, all processes (None without one)."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


class PeakSampler:
    """`with PeakSampler(device) as peak:` samples, in a thread, the RSS of this process and its
    children (vLLM's engine core is one) and `device()`; peak.rss_mb / peak.device_mb afterwards."""

    def __init__(self, device: Callable[[], float | None]):
        self._device = device
        self._stop = threading.Event()
        self.rss_mb = 0.0
        self.device_mb: float | None = None

    def _sample(self) -> None:
        self.rss_mb = max(self.rss_mb, tree_rss_bytes(os.getpid()) / 2**20)
        used = self._device()
        if used is not None:
            self.device_mb = max(self.device_mb or 0.0, used)

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self._sample()

    def __enter__(self) -> PeakSampler:
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# What an engine child holds besides its weights and KV cache: Python, torch, vLLM, lm-eval. Measured: the
# 135M model's serve child peaked at 4.29 GiB with 0.27 GiB of weights and vLLM's 2 GiB CPU KV cache.
ENGINE_PROCESS_BYTES = 2 * 2**30
# Left free beside a second engine child: the run's other work, and a second test worker on CI.
HEADROOM_BYTES = 4 * 2**30


def _weights_bytes(model_dir: Path, options: EngineOptions) -> int:
    """The model's weights as the engine holds them: in float32, twice what a 16-bit checkpoint stores."""
    weights = sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))
    return weights * 2 if options.dtype == "float32" else weights


def engine_child_bytes(model_dir: Path, options: EngineOptions) -> int:
    """Host memory an engine child on the CPU needs for this model: its weights, vLLM's CPU KV cache and the
    process itself."""
    weights = _weights_bytes(model_dir, options)
    kv_cache = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)) * 2**30
    return int(weights + kv_cache + ENGINE_PROCESS_BYTES)


def room_for_another(model_dir: Path, options: EngineOptions) -> bool:
    """Whether an engine child for this model can start while another model's child stays alive: on the CPU, when
    the host has its memory and HEADROOM_BYTES free (then each model's engine starts once per run, however many
    rounds alternate between them); on an accelerator, no (each engine takes most of the device's memory)."""
    import psutil

    if options.device != "cpu":
        return False
    return engine_child_bytes(model_dir, options) + HEADROOM_BYTES <= psutil.virtual_memory().available


def room_to_sleep(model_dir: Path, options: EngineOptions) -> bool:
    """Whether this model's engine may sleep (vLLM's level 1 keeps its weights in host memory, pinned): the host has
    the weights, twice in float32, and HEADROOM_BYTES free."""
    import psutil

    return _weights_bytes(model_dir, options) + HEADROOM_BYTES <= psutil.virtual_memory().available
