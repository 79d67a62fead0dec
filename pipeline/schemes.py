"""Quantization schemes: recipe name -> what it means (dtypes, granularity).

This module is data only (no torch, no Quark) so `validate` stays fast. The
Quark config is built from these specs in `stages/quantize.py`; `verify` checks
the exported tensors against the same specs, so a mislabelled export ("FP8"
that is really INT8) cannot pass.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class SchemeSpec:
    name: str
    description: str
    weight_dtype: str  # "int8" | "fp8_e4m3" | "int4"
    weight_granularity: str  # "per_tensor" | "per_channel" | "per_group"
    activation_dtype: str | None = None  # None: weight-only
    activation_granularity: str | None = None  # "per_tensor" | "per_token"
    activation_static: bool = False
    group_size: int | None = None
    # Name in Quark's LLMTemplate vocabulary, or None where we build the spec ourselves.
    quark_scheme: str | None = None
    # Weights quantized in two steps (Quark's progressive int4_fp8: FP8 then INT4).
    progressive: bool = False

    @property
    def weight_only(self) -> bool:
        return self.activation_dtype is None


# Safetensors header dtype of a stored quantized weight, per weight dtype.
# Quark packs int4 weights eight to an int32.
STORED_WEIGHT_DTYPE = {"int8": "I8", "fp8_e4m3": "F8_E4M3", "int4": "I32"}

SCHEMES: dict[str, SchemeSpec] = {
    spec.name: spec
    for spec in (
        SchemeSpec(
            "int8_per_channel",
            "INT8 weights per output channel (static, symmetric) + INT8 activations per token (dynamic)",
            "int8", "per_channel", "int8", "per_token", activation_static=False,
        ),
        SchemeSpec(
            "int8_per_tensor",
            "INT8 weights and activations, one static scale per tensor (fragile on small models)",
            "int8", "per_tensor", "int8", "per_tensor", activation_static=True,
            quark_scheme="int8",
        ),
        SchemeSpec(
            "fp8",
            "FP8 E4M3 weights and activations, one static scale per tensor",
            "fp8_e4m3", "per_tensor", "fp8_e4m3", "per_tensor", activation_static=True,
            quark_scheme="fp8",
        ),
        SchemeSpec(
            "ptpc_fp8",
            "FP8 E4M3 weights per output channel + FP8 activations per token (dynamic)",
            "fp8_e4m3", "per_channel", "fp8_e4m3", "per_token", activation_static=False,
            quark_scheme="ptpc_fp8",
        ),
        SchemeSpec(
            "int4_fp8",
            "INT4 weights per output channel (quantized via FP8) + FP8 activations per tensor (dynamic); W4A8",
            "int4", "per_channel", "fp8_e4m3", "per_tensor", activation_static=False,
            quark_scheme="int4_fp8", progressive=True,
        ),
        *(
            SchemeSpec(
                f"int4_wo_{group}",
                f"INT4 weight-only, one scale per group of {group} input channels",
                "int4", "per_group", group_size=group, quark_scheme=f"int4_wo_{group}",
            )
            for group in (32, 64, 128)
        ),
    )
}


def get_scheme(name: str) -> SchemeSpec:
    try:
        return SCHEMES[name]
    except KeyError:
        raise KeyError(unknown_scheme_message(name)) from None


def unknown_scheme_message(name: str) -> str:
    close = difflib.get_close_matches(name, SCHEMES, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown scheme '{name}' ({hint}known: {', '.join(SCHEMES)})"


QUARK_DTYPES = {"int8": "int8", "fp8_e4m3": "fp8_e4m3", "int4": "int4", "uint4": "int4"}


def infer_from_quark_config(quantization_config: dict) -> str | None:
    """The recipe scheme an exported Quark `quantization_config` claims to be, or None."""
    global_config = quantization_config.get("global_quant_config") or {}
    weight, activation = global_config.get("weight"), global_config.get("input_tensors")
    if isinstance(weight, list):  # progressive (two-step) weights: Quark's int4_fp8
        return "int4_fp8" if weight and weight[-1].get("dtype") in ("int4", "uint4") else None
    if not isinstance(weight, dict):
        return None
    for spec in SCHEMES.values():
        if QUARK_DTYPES.get(weight.get("dtype")) != spec.weight_dtype or spec.progressive:
            continue
        if weight.get("qscheme") != spec.weight_granularity:
            continue
        if spec.group_size is not None and weight.get("group_size") != spec.group_size:
            continue
        if spec.weight_only != (not activation):
            continue
        if activation and (QUARK_DTYPES.get(activation.get("dtype")) != spec.activation_dtype
                           or bool(activation.get("is_dynamic")) == spec.activation_static):
            continue
        return spec.name
    return None
