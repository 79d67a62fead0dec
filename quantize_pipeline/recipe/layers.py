"""Layer-name patterns, as in llm-compressor's `ignore`: names, globs, `re:` regexes."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable


def matches(name: str, pattern: str) -> bool:
    """True when a module name is selected by a pattern.

    - `re:REGEX`: REGEX matched from the start of the name (llm-compressor's rule);
    - a glob with * ? [ ]: matched against the whole name;
    - a plain name: equal to the name or to its last dotted parts
      (`gate` selects `model.layers.0.mlp.gate`).
    """
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if any(char in pattern for char in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


# Layers vLLM fuses into one (its packed_modules_mapping for Llama-family models: qkv_proj, gate_up_proj)
# must share one scheme: vLLM refuses "different quantization schemes for the shards of ...gate_up_proj"
# (measured: an export that kept up_proj unquantized and gate_proj in int8).
FUSED_SHARDS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fused_siblings(name: str, names: Iterable[str]) -> list[str]:
    """`name` with the layers vLLM fuses it with (those present in `names`), in the fused order."""
    parent, _, leaf = name.rpartition(".")
    group = next((group for group in FUSED_SHARDS if leaf in group), (leaf,))
    present = set(names) | {name}
    return [member for member in (f"{parent}.{leaf_}" if parent else leaf_ for leaf_ in group) if member in present]


def keep_units(ranked_layers: list[str]) -> list[list[str]]:
    """A ranking in units that can be kept out of quantization alone: a layer, or the shards vLLM fuses
    with it, ranked by the most sensitive member."""
    units, seen = [], set()
    for name in ranked_layers:
        if name not in seen:
            unit = fused_siblings(name, ranked_layers)
            seen.update(unit)
            units.append(unit)
    return units


def split_fused_groups(selected: Iterable[str], names: Iterable[str]) -> list[tuple[str, list[str]]]:
    """(selected layer, its fused siblings left out) for every fused group `selected` takes only part of."""
    names, chosen = list(names), set(selected)
    split = []
    for name in selected:
        missing = [member for member in fused_siblings(name, names) if member not in chosen]
        if missing:
            split.append((name, missing))
    return split


def select(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """Names selected by any of the patterns, in their original order."""
    patterns = list(patterns)
    return [name for name in names if any(matches(name, pattern) for pattern in patterns)]


EXPERT_MARKERS = (".experts.",)


def is_expert_layer(name: str) -> bool:
    """A MoE expert's linear layer (unfused names, as plan and the exports use)."""
    return any(marker in name for marker in EXPERT_MARKERS)


def assign_schemes(recipe, linear_names: list[str]) -> dict[str, str | None]:
    """The scheme name each linear layer gets from a Recipe (its `layers` overrides first), None where kept."""
    excluded = set(select(linear_names, recipe.quantization.kept))
    assigned: dict[str, str | None] = {}
    for name in linear_names:
        if name in excluded:
            assigned[name] = None
            continue
        override = next(
            (spec.name for pattern, spec in recipe.quantization.layer_schemes().items() if matches(name, pattern)),
            None,
        )
        assigned[name] = override or recipe.scheme.name
    return assigned
