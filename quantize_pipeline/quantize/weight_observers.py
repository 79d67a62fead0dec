"""Quark's weight observers, less their count of calibration tokens.

The count sizes MoE experts' calibration (how many tokens reached an expert's input); for a weight it is meaningless,
and finding the non-zero rows is a full extra pass over every weight: a third of the data-free fast path's time
(measured on 14B MLP weights, AVX2 EPYC), ~0.2 s a 14B layer in calibrated streaming. Min/max and scales are Quark's;
config.json's `quantization_config` is written from the recipe's config, not from the copies these classes are set on.
"""

from __future__ import annotations

import copy
import functools

from quantize_pipeline.formats.quark_config import quark_layer_configs


def _skip_token_count(self, tensor) -> None:
    return None


@functools.cache
def weight_observer(observer_cls: type) -> type:
    """`observer_cls` without the token count."""
    return type(f"Weight{observer_cls.__name__}", (observer_cls,), {"record_observed_tokens": _skip_token_count})


def use_weight_observers(quark_config) -> None:
    """Every single-stage weight spec of the config observed by `weight_observer`. In place: give it a copy.
    Each weight spec is replaced by a copy first: Quark's templates share one spec object between weights and
    activations, and an activation keeps its count (issue #26: the shared spec first changed both)."""
    for _, layer in quark_layer_configs(quark_config):
        spec = layer.weight
        if spec is not None and not isinstance(spec, list) and spec.observer_cls is not None:
            layer.weight = copy.copy(spec)
            layer.weight.observer_cls = weight_observer(spec.observer_cls)
