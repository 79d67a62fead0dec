"""Quantization schemes: recipe name (or explicit form) -> what it means (dtypes, granularity).

This module is data only (no torch, no Quark) so `validate` stays fast. The
Quark config is built from these specs in `stages/quantize.py`; `verify` checks
the exported tensors against the same specs, so a mislabelled export ("FP8"
that is really INT8) cannot pass.

A scheme written in the recipe's explicit form gets a descriptive name that
spells out every field (`w-int8-per_channel-sym+a-int8-per_token-dynamic-asym`);
`get_scheme` parses such a name back, so reports, manifests and layer overrides
carry plain strings. An explicit form that spells out a named scheme *is* that
scheme (same name, same Quark config).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, fields

WEIGHT_DTYPES = ("int8", "uint8", "int4", "uint4", "fp8_e4m3")
ACTIVATION_DTYPES = ("int8", "uint8", "fp8_e4m3")
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel", "per_group")
ACTIVATION_GRANULARITIES = ("per_tensor", "per_token")
WEIGHT_BITS = {"int8": 8, "uint8": 8, "fp8_e4m3": 8, "int4": 4, "uint4": 4}


@dataclass(frozen=True)
class SchemeSpec:
    name: str
    description: str
    weight_dtype: str  # one of WEIGHT_DTYPES
    weight_granularity: str  # "per_tensor" | "per_channel" | "per_group"
    activation_dtype: str | None = None  # None: weight-only
    activation_granularity: str | None = None  # "per_tensor" | "per_token"
    activation_static: bool = False
    group_size: int | None = None
    # Name in Quark's LLMTemplate vocabulary, or None where we build the spec ourselves.
    quark_scheme: str | None = None
    # Weights quantized in two steps (Quark's progressive int4_fp8: FP8 then INT4).
    progressive: bool = False
    # Symmetric: no zero point. Every named scheme is symmetric; the explicit form may say otherwise.
    weight_symmetric: bool = True
    activation_symmetric: bool = True

    @property
    def weight_only(self) -> bool:
        return self.activation_dtype is None

    @property
    def explicit(self) -> bool:
        """Written in the recipe's explicit form (not one of the named schemes)."""
        return self.name not in SCHEMES

    def layout(self) -> tuple:
        """Every field that decides the quantized tensors (not the name or description)."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.name not in ("name", "description", "quark_scheme"))


# Safetensors header dtype of a stored quantized weight, per weight dtype.
# Quark packs int4/uint4 weights eight to an int32.
STORED_WEIGHT_DTYPE = {"int8": "I8", "uint8": "U8", "fp8_e4m3": "F8_E4M3", "int4": "I32", "uint4": "I32"}

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
    """A named scheme, or the scheme an explicit-form name (see `explicit_name`) spells out."""
    if name in SCHEMES:
        return SCHEMES[name]
    parsed = parse_explicit_name(name)
    if parsed is None:
        raise KeyError(unknown_scheme_message(name))
    return parsed


def unknown_scheme_message(name: str) -> str:
    close = difflib.get_close_matches(name, SCHEMES, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown scheme '{name}' ({hint}known: {', '.join(SCHEMES)})"


# ---- the explicit form -------------------------------------------------------------------

def explicit_name(
    weight_dtype: str, weight_granularity: str, group_size: int | None, weight_symmetric: bool,
    activation_dtype: str | None = None, activation_granularity: str | None = None,
    activation_static: bool = False, activation_symmetric: bool = True,
) -> str:
    """A stable name that spells out every field: `w-uint4-per_group128-asym`,
    `w-int8-per_channel-sym+a-int8-per_token-dynamic-asym`."""
    group = str(group_size) if weight_granularity == "per_group" else ""
    name = f"w-{weight_dtype}-{weight_granularity}{group}-{'sym' if weight_symmetric else 'asym'}"
    if activation_dtype is not None:
        mode = "static" if activation_static else "dynamic"
        name += f"+a-{activation_dtype}-{activation_granularity}-{mode}-{'sym' if activation_symmetric else 'asym'}"
    return name


_EXPLICIT_NAME = re.compile(
    r"^w-(?P<wd>[a-z0-9_]+?)-(?P<wg>per_tensor|per_channel|per_group)(?P<gs>[0-9]+)?-(?P<ws>sym|asym)"
    r"(?:\+a-(?P<ad>[a-z0-9_]+?)-(?P<ag>per_tensor|per_token)-(?P<am>static|dynamic)-(?P<as>sym|asym))?$"
)

DTYPE_WORDS = {"int8": "INT8", "uint8": "UINT8", "int4": "INT4", "uint4": "UINT4", "fp8_e4m3": "FP8 E4M3"}
GRANULARITY_WORDS = {
    "per_tensor": "one scale per tensor", "per_channel": "per output channel", "per_token": "per token",
}


def _describe(spec_fields: dict) -> str:
    weight = spec_fields["weight_granularity"]
    where = (f"per group of {spec_fields['group_size']} input channels" if weight == "per_group"
             else GRANULARITY_WORDS[weight])
    text = (f"{DTYPE_WORDS[spec_fields['weight_dtype']]} weights {where} "
            f"({'symmetric' if spec_fields['weight_symmetric'] else 'asymmetric'})")
    if spec_fields.get("activation_dtype") is None:
        return text + ", weight-only (explicit form)"
    mode = "static" if spec_fields["activation_static"] else "dynamic"
    symmetry = "symmetric" if spec_fields["activation_symmetric"] else "asymmetric"
    return (text + f" + {DTYPE_WORDS[spec_fields['activation_dtype']]} activations "
            f"{GRANULARITY_WORDS[spec_fields['activation_granularity']]} ({mode}, {symmetry}) (explicit form)")


def explicit_scheme(
    weight_dtype: str, weight_granularity: str, group_size: int | None = None, weight_symmetric: bool = True,
    activation_dtype: str | None = None, activation_granularity: str | None = None,
    activation_static: bool = False, activation_symmetric: bool = True,
) -> SchemeSpec:
    """The SchemeSpec of an explicit form (already validated by the recipe schema); the named
    scheme itself when the fields spell one out exactly."""
    spec_fields = dict(
        weight_dtype=weight_dtype, weight_granularity=weight_granularity,
        group_size=group_size if weight_granularity == "per_group" else None, weight_symmetric=weight_symmetric,
        activation_dtype=activation_dtype,
        activation_granularity=activation_granularity if activation_dtype else None,
        activation_static=activation_static if activation_dtype else False,
        activation_symmetric=activation_symmetric if activation_dtype else True,
    )
    spec = SchemeSpec(name=explicit_name(**spec_fields), description=_describe(spec_fields), **spec_fields)
    return next((named for named in SCHEMES.values() if named.layout() == spec.layout()), spec)


def parse_explicit_name(name: str) -> SchemeSpec | None:
    match = _EXPLICIT_NAME.match(name)
    if match is None or match["wd"] not in WEIGHT_DTYPES or (match["ad"] and match["ad"] not in ACTIVATION_DTYPES):
        return None
    if (match["wg"] == "per_group") != (match["gs"] is not None):
        return None
    return explicit_scheme(
        match["wd"], match["wg"], int(match["gs"]) if match["gs"] else None, match["ws"] == "sym",
        match["ad"], match["ag"], match["am"] == "static", match["as"] != "asym",
    )


def recipe_value(spec: SchemeSpec) -> str | dict:
    """How a recipe writes this scheme: its name, or the explicit mapping."""
    if not spec.explicit:
        return spec.name
    weight = {"dtype": spec.weight_dtype, "granularity": spec.weight_granularity, "symmetric": spec.weight_symmetric}
    if spec.group_size is not None:
        weight["group_size"] = spec.group_size
    value: dict = {"weight": weight}
    if not spec.weight_only:
        value["activation"] = {
            "dtype": spec.activation_dtype, "granularity": spec.activation_granularity,
            "dynamic": not spec.activation_static, "symmetric": spec.activation_symmetric,
        }
    return value



def infer_from_quark_config(quantization_config: dict) -> str | None:
    """The recipe scheme an exported Quark `quantization_config` claims to be (a named scheme, or
    an explicit-form name), or None."""
    global_config = quantization_config.get("global_quant_config") or {}
    weight, activation = global_config.get("weight"), global_config.get("input_tensors")
    if isinstance(weight, list):  # progressive (two-step) weights: Quark's int4_fp8
        return "int4_fp8" if weight and weight[-1].get("dtype") in ("int4", "uint4") else None
    if not isinstance(weight, dict):
        return None
    return _explicit_from_quark(weight, activation)


# Quark writes a per-token activation scale as qscheme per_channel (ch_axis 1 on [tokens, hidden]).
_QUARK_ACTIVATION_QSCHEME = {"per_tensor": "per_tensor", "per_channel": "per_token"}


def _explicit_from_quark(weight: dict, activation: dict | None) -> str | None:
    """The scheme (named when it is one) whose fields a Quark weight/input_tensors config spells out."""
    weight_dtype, granularity = weight.get("dtype"), weight.get("qscheme")
    if weight_dtype not in WEIGHT_DTYPES or granularity not in WEIGHT_GRANULARITIES or weight.get("is_dynamic"):
        return None
    group_size = weight.get("group_size") if granularity == "per_group" else None
    if granularity == "per_group" and not isinstance(group_size, int):
        return None
    arguments = dict(
        weight_dtype=weight_dtype, weight_granularity=granularity, group_size=group_size,
        weight_symmetric=weight.get("symmetric", True) is not False,
    )
    if activation:
        if isinstance(activation, list) or activation.get("dtype") not in ACTIVATION_DTYPES:
            return None
        activation_granularity = _QUARK_ACTIVATION_QSCHEME.get(activation.get("qscheme"))
        if activation_granularity is None or (activation_granularity == "per_token" and not activation.get("is_dynamic")):
            return None
        arguments.update(
            activation_dtype=activation["dtype"], activation_granularity=activation_granularity,
            activation_static=not activation.get("is_dynamic"),
            activation_symmetric=activation.get("symmetric", True) is not False,
        )
    return explicit_scheme(**arguments).name


def infer_kv_cache(quantization_config: dict) -> str | None:
    """The recipe kv_cache an export's Quark kv_cache_quant_config claims: fp8, or None."""
    groups = quantization_config.get("kv_cache_quant_config") or {}
    dtypes = {((group or {}).get("output_tensors") or {}).get("dtype") for group in groups.values()}
    return "fp8" if dtypes == {"fp8_e4m3"} else None
