"""Memory while an engine works: host RSS of this process tree and accelerator memory, sampled."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

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
