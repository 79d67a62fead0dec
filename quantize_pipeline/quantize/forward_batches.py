"""Calibration samples grouped into forward passes.

Quark observes each calibration batch in one call. A min/max observer's scale is the same however the tokens
are split into calls (the min and max of their union), so where every static activation observer is one,
consecutive samples of one length go through the model together: one [k, L] matmul instead of k [1, L] ones,
and Quark's per-call work (hooks, observers) once. On this machine the outputs are the same bits
(tests/test_forward_batches.py checks it on the tiny model; streaming == in-memory either way, both group alike).
Any other observer (percentile, MSE, histogram) or an algorithm (GPTQ's Hessian, AWQ's search) may depend on
the split: one sample a pass, as before.
"""

from __future__ import annotations

import dataclasses

# At most this many tokens in one pass (a longer sample alone): the 14B shape's streaming fp8 bench (8 x 128)
# runs one pass a layer; a 2048-token calibration is one sample a pass, as before, and its activations no larger.
BATCH_TOKENS = 1024
MIN_MAX_OBSERVERS = frozenset({"PerTensorMinMaxObserver", "PerChannelMinMaxObserver"})


def static_activation_observers(quark_config) -> set[str]:
    """The observer class names of every static (calibrated) spec of a Quark QConfig other than weights'."""
    found: set[str] = set()

    def walk(value, field: str = "") -> None:
        if field in ("weight", "bias"):
            return  # observed once, whole, not per calibration pass
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            if hasattr(value, "observer_cls") and hasattr(value, "is_dynamic"):  # a QTensorConfig
                if value.is_dynamic is False and value.observer_cls is not None:
                    found.add(value.observer_cls.__name__)
                return
            for item in dataclasses.fields(value):
                walk(getattr(value, item.name), item.name)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item, field)

    walk(quark_config)
    return found


def forward_batches(token_batches: list[list[int]], quark_config) -> list[list[list[int]]]:
    """The calibration samples as forward passes (lists of samples), in order."""
    if quark_config.algo_config or not static_activation_observers(quark_config) <= MIN_MAX_OBSERVERS:
        return [[ids] for ids in token_batches]
    passes: list[list[list[int]]] = []
    for ids in token_batches:
        last = passes[-1] if passes else None
        if last and len(last[0]) == len(ids) and (len(last) + 1) * len(ids) <= BATCH_TOKENS:
            last.append(ids)
        else:
            passes.append([ids])
    return passes
