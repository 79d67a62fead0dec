"""Quantization schemes: recipe name (or explicit form) -> what it means (dtypes, granularity).

This module is data only (no torch, no Quark) so `validate` stays fast. Quark's
config is derived from these specs, and an exported Quark config read back into
one, in `formats/quark_config.py`; `verify` checks the exported tensors against
the same specs, so a mislabelled export ("FP8" that is really INT8) cannot pass.

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

# Element dtypes of the block formats (OCP MX, NVFP4): tiny floats that share one scale per block.
BLOCK_DTYPES = ("fp4_e2m1", "fp6_e3m2", "fp6_e2m3")
# What per_block takes. Not FP8 E4M3 (OCP MXFP8): Quark 0.13 quantizes it but its exporter raises
# "Unsupported QuantSchema: per_group for quant_dtype: fp8_e4m3" (measured here).
PER_BLOCK_DTYPES = BLOCK_DTYPES
WEIGHT_DTYPES = ("int8", "uint8", "int4", "uint4", "fp8_e4m3", *BLOCK_DTYPES)
ACTIVATION_DTYPES = ("int8", "uint8", "fp8_e4m3", *BLOCK_DTYPES)
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_block")
ACTIVATION_GRANULARITIES = ("per_tensor", "per_token", "per_block")
WEIGHT_BITS = {"int8": 8, "uint8": 8, "fp8_e4m3": 8, "int4": 4, "uint4": 4, "fp4_e2m1": 4, "fp6_e3m2": 6, "fp6_e2m3": 6}
# Block scales: OCP MX shares a power-of-two (e8m0) scale per 32 elements; NVFP4 an FP8 E4M3 scale
# per 16 elements under one FP32 scale per tensor (the global scale).
BLOCK_SCALE_DTYPES = {"e8m0": 32, "fp8_e4m3": 16}  # scale dtype -> the block size its format fixes


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
    # Block formats (granularity per_block; per_block activations share the weight's block and scale).
    block_size: int | None = None
    scale_dtype: str | None = None  # "e8m0" (OCP MX) or "fp8_e4m3" (NVFP4)
    global_scale: bool = False  # NVFP4: one FP32 scale per tensor above the FP8 block scales

    def __post_init__(self) -> None:
        """Bad states are unwritable: each granularity carries exactly the sizes it needs (a per-group scheme
        without a group size cannot be built), and a weight-only scheme carries no activation fields."""
        problems = []
        if self.weight_dtype not in WEIGHT_DTYPES or self.weight_granularity not in WEIGHT_GRANULARITIES:
            problems.append(f"weight {self.weight_dtype} {self.weight_granularity} is not one of ours")
        if (self.weight_granularity == "per_group") != (self.group_size is not None):
            problems.append("per_group weights need a group_size, and only per_group weights take one")
        elif self.group_size is not None and self.group_size <= 0:
            problems.append(f"group_size {self.group_size} is not positive")
        blocks = self.weight_granularity == "per_block"
        if blocks != (self.block_size is not None) or blocks != (self.scale_dtype in BLOCK_SCALE_DTYPES):
            problems.append("per_block weights need a block_size and a scale_dtype, and only they take them")
        if self.global_scale and not blocks:
            problems.append("only per_block weights take a global scale")
        if self.activation_dtype is None:
            if self.activation_granularity is not None or self.activation_static:
                problems.append("weight-only: no activation granularity or static activation scale")
        elif (self.activation_dtype not in ACTIVATION_DTYPES
              or self.activation_granularity not in ACTIVATION_GRANULARITIES):
            problems.append(f"activations {self.activation_dtype} {self.activation_granularity} are not one of ours")
        elif self.activation_granularity == "per_block" and not blocks:
            problems.append("per_block activations share the weights' blocks: the weights must be per_block")
        if problems:
            raise ValueError(f"scheme {self.name}: " + "; ".join(problems))

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
# Quark packs FP4 codes two to a byte and FP6 codes four to three bytes, in uint8 tensors.
STORED_WEIGHT_DTYPE.update({dtype: "U8" for dtype in BLOCK_DTYPES})
# Safetensors dtype of a stored block scale: e8m0 exponents as uint8 bytes, FP8 scales as F8_E4M3.
STORED_BLOCK_SCALE_DTYPE = {"e8m0": "U8", "fp8_e4m3": "F8_E4M3"}


def _mx(name: str, description: str, weight: str, activation: str | None, **fields) -> SchemeSpec:
    """An OCP MX scheme (block of 32, e8m0 scales) as Quark's template of the same name builds it."""
    activation_fields = dict(activation_dtype=activation, activation_granularity="per_block") if activation else {}
    return SchemeSpec(name, description, weight, "per_block", block_size=32, scale_dtype="e8m0",
                      quark_scheme=name, **{**activation_fields, **fields})

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
        _mx("mxfp4", "OCP MXFP4 weights and activations (FP4 E2M1, one e8m0 scale per 32; activations dynamic)",
            "fp4_e2m1", "fp4_e2m1"),
        _mx("mxfp4_weight_only", "OCP MXFP4 weights only (FP4 E2M1, one e8m0 scale per 32)", "fp4_e2m1", None),
        _mx("mxfp6_e3m2", "OCP MXFP6 E3M2 weights and activations (one e8m0 scale per 32; activations dynamic)",
            "fp6_e3m2", "fp6_e3m2"),
        _mx("mxfp6_e2m3", "OCP MXFP6 E2M3 weights and activations (one e8m0 scale per 32; activations dynamic)",
            "fp6_e2m3", "fp6_e2m3"),
        _mx("mxfp4_mxfp6_e2m3", "OCP MXFP4 weights + MXFP6 E2M3 activations (dynamic)", "fp4_e2m1", "fp6_e2m3"),
        _mx("mxfp4_fp8", "OCP MXFP4 weights + FP8 E4M3 activations, one static scale per tensor",
            "fp4_e2m1", None, activation_dtype="fp8_e4m3", activation_granularity="per_tensor",
            activation_static=True),
        SchemeSpec(
            "nvfp4",
            "NVFP4: FP4 E2M1 weights and activations, one FP8 E4M3 scale per 16 under an FP32 per-tensor "
            "scale (activation block scales dynamic, their tensor scale static)",
            "fp4_e2m1", "per_block", "fp4_e2m1", "per_block", block_size=16, scale_dtype="fp8_e4m3",
            global_scale=True, quark_scheme="nvfp4",
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

def _block_token(block_size: int | None, scale_dtype: str | None, global_scale: bool) -> str:
    """`per_block32-scale_e8m0`, `per_block16-scale_fp8_e4m3-global`: the block part of a name."""
    return f"{block_size}-scale_{scale_dtype}" + ("-global" if global_scale else "")


def explicit_name(
    weight_dtype: str, weight_granularity: str, group_size: int | None, weight_symmetric: bool,
    activation_dtype: str | None = None, activation_granularity: str | None = None,
    activation_static: bool = False, activation_symmetric: bool = True,
    block_size: int | None = None, scale_dtype: str | None = None, global_scale: bool = False,
) -> str:
    """A stable name that spells out every field: `w-uint4-per_group128-asym`,
    `w-int8-per_channel-sym+a-int8-per_token-dynamic-asym`,
    `w-fp6_e3m2-per_block32-scale_e8m0-sym` (per_block activations use the weight's blocks)."""
    size = {"per_group": str(group_size), "per_block": _block_token(block_size, scale_dtype, global_scale)}
    name = f"w-{weight_dtype}-{weight_granularity}{size.get(weight_granularity, '')}-{'sym' if weight_symmetric else 'asym'}"
    if activation_dtype is not None:
        mode = "static" if activation_static else "dynamic"
        name += f"+a-{activation_dtype}-{activation_granularity}-{mode}-{'sym' if activation_symmetric else 'asym'}"
    return name


_EXPLICIT_NAME = re.compile(
    r"^w-(?P<wd>[a-z0-9_]+?)-(?P<wg>per_tensor|per_channel|per_group|per_block)(?P<gs>[0-9]+)?"
    r"(?:-scale_(?P<sd>e8m0|fp8_e4m3)(?P<gl>-global)?)?-(?P<ws>sym|asym)"
    r"(?:\+a-(?P<ad>[a-z0-9_]+?)-(?P<ag>per_tensor|per_token|per_block)-(?P<am>static|dynamic)-(?P<as>sym|asym))?$"
)

DTYPE_WORDS = {"int8": "INT8", "uint8": "UINT8", "int4": "INT4", "uint4": "UINT4", "fp8_e4m3": "FP8 E4M3",
               "fp4_e2m1": "FP4 E2M1", "fp6_e3m2": "FP6 E3M2", "fp6_e2m3": "FP6 E2M3"}
GRANULARITY_WORDS = {
    "per_tensor": "one scale per tensor", "per_channel": "per output channel", "per_token": "per token",
    "per_block": "per block (the weight's blocks)",
}


def _weight_where(spec_fields: dict) -> str:
    weight = spec_fields["weight_granularity"]
    if weight == "per_group":
        return f"per group of {spec_fields['group_size']} input channels"
    if weight == "per_block":
        scale = "an e8m0 scale" if spec_fields["scale_dtype"] == "e8m0" else "an FP8 E4M3 scale"
        where = f"{scale} per block of {spec_fields['block_size']}"
        return where + (" under an FP32 per-tensor scale" if spec_fields["global_scale"] else "")
    return GRANULARITY_WORDS[weight]


def _describe(spec_fields: dict) -> str:
    text = (f"{DTYPE_WORDS[spec_fields['weight_dtype']]} weights {_weight_where(spec_fields)} "
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
    block_size: int | None = None, scale_dtype: str | None = None, global_scale: bool = False,
) -> SchemeSpec:
    """The SchemeSpec of an explicit form (already validated by the recipe schema); the named
    scheme itself when the fields spell one out exactly."""
    blocks = weight_granularity == "per_block"
    spec_fields = dict(
        weight_dtype=weight_dtype, weight_granularity=weight_granularity,
        group_size=group_size if weight_granularity == "per_group" else None, weight_symmetric=weight_symmetric,
        activation_dtype=activation_dtype,
        activation_granularity=activation_granularity if activation_dtype else None,
        activation_static=activation_static if activation_dtype else False,
        activation_symmetric=activation_symmetric if activation_dtype else True,
        block_size=block_size if blocks else None, scale_dtype=scale_dtype if blocks else None,
        global_scale=global_scale if blocks else False,
    )
    spec = SchemeSpec(name=explicit_name(**spec_fields), description=_describe(spec_fields), **spec_fields)
    return next((named for named in SCHEMES.values() if named.layout() == spec.layout()), spec)


def parse_explicit_name(name: str) -> SchemeSpec | None:
    match = _EXPLICIT_NAME.match(name)
    if match is None or match["wd"] not in WEIGHT_DTYPES or (match["ad"] and match["ad"] not in ACTIVATION_DTYPES):
        return None
    if match["wg"] in ("per_group", "per_block") and match["gs"] is None:
        return None
    if match["wg"] not in ("per_group", "per_block") and match["gs"] is not None:
        return None
    if (match["wg"] == "per_block") != (match["sd"] is not None):
        return None
    size = int(match["gs"]) if match["gs"] else None
    return explicit_scheme(
        match["wd"], match["wg"], size if match["wg"] == "per_group" else None, match["ws"] == "sym",
        match["ad"], match["ag"], match["am"] == "static", match["as"] != "asym",
        block_size=size if match["wg"] == "per_block" else None, scale_dtype=match["sd"],
        global_scale=match["gl"] is not None,
    )


def recipe_value(spec: SchemeSpec) -> str | dict:
    """How a recipe writes this scheme: its name, or the explicit mapping."""
    if not spec.explicit:
        return spec.name
    weight = {"dtype": spec.weight_dtype, "granularity": spec.weight_granularity, "symmetric": spec.weight_symmetric}
    if spec.group_size is not None:
        weight["group_size"] = spec.group_size
    if spec.block_size is not None:
        weight.update(block_size=spec.block_size, scale_dtype=spec.scale_dtype, global_scale=spec.global_scale)
    value: dict = {"weight": weight}
    if not spec.weight_only:
        value["activation"] = {
            "dtype": spec.activation_dtype, "granularity": spec.activation_granularity,
            "dynamic": not spec.activation_static, "symmetric": spec.activation_symmetric,
        }
    return value
