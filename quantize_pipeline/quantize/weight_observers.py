"""Quark's weight observers, less their count of calibration tokens; and activation observers too where no MoE
expert needs it.

The count sizes MoE experts' calibration (how many tokens reached an expert's input); for a weight it is meaningless,
and finding the non-zero rows is a full extra pass over every weight: a third of the data-free fast path's time
(measured on 14B MLP weights, AVX2 EPYC), ~0.2 s a 14B layer in calibrated streaming. On a dense model's
activations nothing reads it either (moe.fill_uncalibrated_expert_scales is its one reader), and it cost a
calibrated 14B streaming run ~0.075 s a layer (8 x 128 tokens, AVX-512 EPYC): 3.6 s of 48 layers. Min/max and
scales are Quark's; config.json's `quantization_config` is written from the recipe's config, not from the copies
these classes are set on.
"""

from __future__ import annotations

import copy
import functools

from quantize_pipeline.formats.quark_config import quark_layer_configs


def _skip_token_count(self, tensor) -> None:
    return None


@functools.cache
def observer_without_token_count(observer_cls: type) -> type:
    """`observer_cls` without the token count."""
    return type(f"Uncounted{observer_cls.__name__}", (observer_cls,), {"record_observed_tokens": _skip_token_count})


def use_uncounted_observers(quark_config, activations: bool = False) -> None:
    """Every single-stage weight spec of the config observed by `observer_without_token_count`. In place: give it
    a copy. Each weight spec is replaced by a copy first: Quark's templates share one spec object between weights and
    activations, and an activation keeps its count (issue #26: the shared spec first changed both).
    activations: the input and output specs too (a model without MoE experts: nothing reads their count)."""
    fields = ("weight", "input_tensors", "output_tensors") if activations else ("weight",)
    for _, layer in quark_layer_configs(quark_config):
        for field in fields:
            spec = getattr(layer, field)
            if spec is not None and not isinstance(spec, list) and spec.observer_cls is not None:
                setattr(layer, field, copy.copy(spec))
                getattr(layer, field).observer_cls = observer_without_token_count(spec.observer_cls)
