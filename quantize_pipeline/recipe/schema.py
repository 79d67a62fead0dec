"""The recipe language: the single source of truth for every setting and default.

A recipe is one YAML file validated by these pydantic models (`extra="forbid"`
everywhere, so a typo is an error, not a silently ignored key). Importing this
module must stay cheap: `validate` and `--help` never import torch or vLLM.

Relative paths in a recipe are resolved against the current working directory,
as lm-eval and llm-compressor do.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from quantize_pipeline.errors import RecipeError
from quantize_pipeline.quantize.moe import ROUTER_PATTERN
from quantize_pipeline.recipe import schemes
from quantize_pipeline.recipe.compute_dtype import auto_dtype

BUILTIN_MODELS = ("smollm2-135m-instruct",)
SHIPPED_CORPORA = ("wikipedia",)
SHIPPED_HELDOUT_TEXTS = ("wikipedia-heldout",)
SHIPPED_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq")
LM_EVAL_TASK = re.compile(r"^lm_eval:[A-Za-z0-9_.-]+$")
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "The three primary colors are",
    "def fibonacci(n):",
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class ModelSpec(Strict):
    source: str = Field(
        description="'builtin:smollm2-135m-instruct' (shipped), a local HF model folder, "
        "a local .gguf file (dequantized once), or a Hub id ORG/NAME (needs network at run time)"
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="what the model is loaded and computed in. auto: bfloat16 on GPUs and on CPUs that "
        "multiply bf16 natively (AVX-512 BF16, AMX, Arm BF16), float32 on other CPUs (bf16 is emulated there, "
        "~100x slower matmuls); resolved when the recipe is read, so reports and hashes carry the concrete dtype",
    )
    trust_remote_code: bool = False
    revision: str | None = Field(None, description="Hub revision, for Hub ids")

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        if source.startswith("builtin:"):
            name = source.removeprefix("builtin:")
            if name not in BUILTIN_MODELS:
                raise ValueError(f"unknown builtin model '{name}' (known: {', '.join(BUILTIN_MODELS)})")
        elif source.endswith(".gguf"):
            if not Path(source).is_file():
                raise ValueError(f"GGUF file not found: {source}")
        elif not Path(source).is_dir() and not HUB_ID.match(source):
            raise ValueError(
                f"'{source}' is neither a local model folder, a .gguf file, a Hub id (ORG/NAME) "
                f"nor builtin:{BUILTIN_MODELS[0]}"
            )
        return source

    @property
    def kind(self) -> Literal["builtin", "gguf", "folder", "hub"]:
        if self.source.startswith("builtin:"):
            return "builtin"
        if self.source.endswith(".gguf"):
            return "gguf"
        return "folder" if Path(self.source).is_dir() else "hub"


CALIBRATION_FILE_SUFFIXES = (".jsonl", ".txt", ".parquet")


class CalibrationSpec(Strict):
    source: str = Field(
        "wikipedia",
        description="shipped corpus name (wikipedia), a local .jsonl/.txt/.parquet file, "
        "or hf:DATASET_ID (needs network; with split and text_field)",
    )
    samples: int = Field(64, ge=1, le=100_000)
    max_seq_len: int = Field(512, ge=16, le=131_072)
    seed: int = 0
    text_field: str = Field("text", description="field that holds the text (.jsonl, .parquet, hf:)")
    split: str = Field("train", description="dataset split, for hf: sources")
    subset: str | None = Field(None, description="dataset configuration name, for hf: sources")

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        if source in SHIPPED_CORPORA:
            return source
        if source.startswith("hf:"):
            if not HUB_ID.match(source[3:]) and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", source[3:]):
                raise ValueError(f"'{source}' is not a dataset id (hf:ORG/NAME)")
            return source
        path = Path(source)
        if path.suffix not in CALIBRATION_FILE_SUFFIXES:
            raise ValueError(
                f"'{source}' is neither a shipped corpus ({', '.join(SHIPPED_CORPORA)}), "
                f"a {'/'.join(CALIBRATION_FILE_SUFFIXES)} file nor hf:DATASET_ID"
            )
        if not path.is_file():
            raise ValueError(f"file not found: {source}")
        return source


def _check_patterns(patterns) -> None:
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise ValueError(f"bad regex {pattern!r}: {exc}") from None


def _check_scheme_name(scheme: str) -> str:
    if scheme not in schemes.SCHEMES:
        raise ValueError(schemes.unknown_scheme_message(scheme))
    return scheme


# ---- the explicit scheme form: Quark's vocabulary (dtype, qscheme, static/dynamic, symmetric) ----

class WeightQuantization(Strict):
    """How weights are quantized (offline, once): Quark's weight QuantizationSpec in recipe words."""

    dtype: Literal[schemes.WEIGHT_DTYPES] = Field(
        description="int8, uint8, int4, uint4, fp8_e4m3, or a block element: fp4_e2m1, fp6_e3m2, fp6_e2m3")
    granularity: str = Field(
        description="per_tensor, per_channel (one scale per output row), per_group, or per_block (MX/NVFP4)")
    group_size: int | None = Field(None, ge=1, description="input channels per scale; per_group only")
    block_size: int | None = Field(None, ge=1, description="elements per block scale; per_block only (32 MX, 16 NVFP4)")
    scale_dtype: Literal["e8m0", "fp8_e4m3"] | None = Field(
        None, description="per_block only: e8m0 (OCP MX) or fp8_e4m3 (NVFP4, with global_scale)")
    global_scale: bool = Field(False, description="per_block fp8_e4m3 scales: one FP32 scale per tensor above them")
    symmetric: bool = Field(True, description="false: a zero point per scale (integer dtypes only)")
    dynamic: bool = Field(False, description="always false: weights are quantized once, offline")

    @field_validator("granularity")
    @classmethod
    def _weight_granularity(cls, granularity: str) -> str:
        if granularity == "per_token":
            raise ValueError("per_token is an activation granularity; weights use per_tensor, per_channel, "
                             "per_group or per_block")
        if granularity not in schemes.WEIGHT_GRANULARITIES:
            raise ValueError(f"unknown granularity '{granularity}' (weights: {', '.join(schemes.WEIGHT_GRANULARITIES)})")
        return granularity

    @field_validator("dynamic")
    @classmethod
    def _static_weights(cls, dynamic: bool) -> bool:
        if dynamic:
            raise ValueError("weights are quantized once, offline: dynamic applies to activations only")
        return dynamic

    @model_validator(mode="after")
    def _consistent(self) -> WeightQuantization:
        if self.granularity == "per_group" and self.group_size is None:
            raise ValueError("per_group needs group_size (e.g. 64 or 128)")
        if self.granularity != "per_group" and self.group_size is not None:
            raise ValueError(f"group_size applies to per_group only, not {self.granularity}")
        if self.dtype == "fp8_e4m3" and not self.symmetric:
            raise ValueError("fp8_e4m3 has no zero point: symmetric must be true")
        if self.dtype == "fp8_e4m3" and self.granularity == "per_group":
            raise ValueError("fp8_e4m3 weights are per_tensor or per_channel")
        _check_blocks(self.dtype, self.granularity, self.symmetric)
        if self.granularity != "per_block":
            for name in ("block_size", "scale_dtype"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to per_block only, not {self.granularity}")
            if self.global_scale:
                raise ValueError(f"global_scale applies to per_block only, not {self.granularity}")
            return self
        if self.scale_dtype is None:
            raise ValueError("per_block needs scale_dtype: e8m0 (OCP MX, blocks of 32) or fp8_e4m3 (NVFP4, blocks of 16)")
        fixed = schemes.BLOCK_SCALE_DTYPES[self.scale_dtype]
        if self.block_size != fixed:
            raise ValueError(f"{self.scale_dtype} block scales come one per {fixed} elements: block_size must be {fixed}")
        if self.scale_dtype == "fp8_e4m3" and self.dtype != "fp4_e2m1":
            raise ValueError("fp8_e4m3 block scales are NVFP4's: dtype must be fp4_e2m1")
        if self.global_scale != (self.scale_dtype == "fp8_e4m3"):
            raise ValueError("global_scale: true goes with fp8_e4m3 block scales (NVFP4) and only with them")
        return self


def _check_blocks(dtype: str, granularity: str, symmetric: bool) -> None:
    """Block elements (FP4/FP6) and per_block go together; their codes are sign-magnitude (no zero point)."""
    if dtype in schemes.BLOCK_DTYPES and granularity != "per_block":
        raise ValueError(f"{dtype} elements share one scale per block: granularity must be per_block")
    if granularity == "per_block" and dtype not in schemes.PER_BLOCK_DTYPES:
        why = " (OCP MXFP8: Quark 0.13 cannot export it)" if dtype == "fp8_e4m3" else ""
        raise ValueError(f"per_block takes {', '.join(schemes.PER_BLOCK_DTYPES)} elements, not {dtype}{why}")
    if dtype in schemes.BLOCK_DTYPES and not symmetric:
        raise ValueError(f"{dtype} has no zero point: symmetric must be true")


class ActivationQuantization(Strict):
    """How layer inputs are quantized: static (scale calibrated once) or dynamic (computed per call)."""

    dtype: Literal[schemes.ACTIVATION_DTYPES] = Field(
        description="int8, uint8, fp8_e4m3, or a block element: fp4_e2m1, fp6_e3m2, fp6_e2m3")
    granularity: str = Field(description="per_tensor, per_token, or per_block (the weight's blocks and scale dtype)")
    dynamic: bool = Field(description="true: scales computed at run time; false: calibrated (static)")
    symmetric: bool = Field(True, description="false: a zero point per scale (integer dtypes only)")

    @field_validator("granularity")
    @classmethod
    def _activation_granularity(cls, granularity: str) -> str:
        if granularity == "per_channel":
            raise ValueError("activations are per_tensor, per_token or per_block (per_channel is a weight granularity)")
        if granularity not in schemes.ACTIVATION_GRANULARITIES:
            raise ValueError(
                f"unknown granularity '{granularity}' (activations: {', '.join(schemes.ACTIVATION_GRANULARITIES)})"
            )
        return granularity

    @model_validator(mode="after")
    def _consistent(self) -> ActivationQuantization:
        if self.granularity == "per_token" and not self.dynamic:
            raise ValueError("per_token scales are computed at run time: per_token needs dynamic: true")
        if self.dtype == "fp8_e4m3" and not self.symmetric:
            raise ValueError("fp8_e4m3 has no zero point: symmetric must be true")
        _check_blocks(self.dtype, self.granularity, self.symmetric)
        if self.granularity == "per_block" and not self.dynamic:
            raise ValueError("per_block activation scales are computed at run time: per_block needs dynamic: true")
        return self


class ExplicitScheme(Strict):
    """A scheme outside the named vocabulary, spelled out field by field."""

    weight: WeightQuantization
    activation: ActivationQuantization | None = Field(None, description="omit or null: weight-only")

    @model_validator(mode="after")
    def _blocks_follow_the_weight(self) -> ExplicitScheme:
        activation, weight = self.activation, self.weight
        if activation is None or activation.granularity != "per_block":
            return self
        if weight.granularity != "per_block":
            raise ValueError("per_block activations use the weight's blocks: weight granularity must be per_block")
        if weight.scale_dtype == "fp8_e4m3" and activation.dtype != "fp4_e2m1":
            raise ValueError("with fp8_e4m3 block scales (NVFP4) per_block activations must be fp4_e2m1")
        return self

    def to_spec(self) -> schemes.SchemeSpec:
        activation, weight = self.activation, self.weight
        return schemes.explicit_scheme(
            weight.dtype, weight.granularity, weight.group_size, weight.symmetric,
            activation.dtype if activation else None, activation.granularity if activation else None,
            not activation.dynamic if activation else False, activation.symmetric if activation else True,
            block_size=weight.block_size, scale_dtype=weight.scale_dtype, global_scale=weight.global_scale,
        )


# A scheme is a name (str) or the explicit mapping; the tag picks the branch so an error names
# only the branch that applies (the loader drops these tags from the field path).
SCHEME_TAGS = ("named-scheme", "explicit-scheme")
SchemeValue = Annotated[
    Union[
        Annotated[Annotated[str, Field(description="one of: " + ", ".join(schemes.SCHEMES))], Tag("named-scheme")],
        Annotated[ExplicitScheme, Tag("explicit-scheme")],
    ],
    Discriminator(lambda value: "explicit-scheme" if isinstance(value, (dict, ExplicitScheme)) else "named-scheme"),
]


def scheme_spec(value: str | ExplicitScheme) -> schemes.SchemeSpec:
    return value.to_spec() if isinstance(value, ExplicitScheme) else schemes.SCHEMES[value]


# ---- algorithms: Quark's, with their options (field names and types mirror Quark's config classes) ----

class _Options(Strict):
    """Unset options keep the Quark template's default for the model type."""

    def chosen(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class GPTQOptions(_Options):  # quark GPTQConfig
    block_size: int | None = Field(None, ge=1)
    damp_percent: float | None = Field(None, gt=0, lt=1)
    desc_act: bool | None = None
    static_groups: bool | None = None
    inside_layer_modules: list[str] | None = None
    model_decoder_layers: str | None = None

    @model_validator(mode="after")
    def _quark_rule(self) -> GPTQOptions:
        if self.desc_act is not False and self.static_groups is False:
            raise ValueError("Quark's GPTQ needs static_groups: true with desc_act (the default); or set desc_act: false")
        return self


class AWQOptions(_Options):  # quark AWQConfig
    scaling_layers: list[dict[str, Any]] | None = None
    model_decoder_layers: str | None = None


class SmoothQuantOptions(_Options):  # quark SmoothQuantConfig
    alpha: float | None = Field(None, ge=0, le=1)
    scale_clamp_min: float | None = Field(None, gt=0)
    scaling_layers: list[dict[str, Any]] | None = None
    model_decoder_layers: str | None = None


class RotationOptions(_Options):  # quark RotationConfig (graph flow)
    r1: bool | None = None
    r2: bool | None = None
    r3: bool | None = None
    r4: bool | None = None
    rotation_size: int | None = Field(None, ge=1)
    random_r1: bool | None = None
    random_r2: bool | None = None
    online_r1_rotation: bool | None = None
    trainable: bool | None = None
    train_smooth: bool | None = None
    smooth_positions: list[Literal["r1", "r2", "r4"]] | None = None
    scaling_layers: dict[str, list[dict[str, Any]]] | None = None
    backbone: str | None = None
    model_decoder_layers: str | None = None
    v_proj: str | None = None
    o_proj: str | None = None
    self_attn: str | None = None
    mlp: str | None = None


@dataclass(frozen=True)
class Algorithm:
    """One Quark algorithm the recipe can name: everything about it in one place (the registry below)."""

    name: str
    options: type[_Options]  # the recipe's `algorithm.options` model
    quark_config_class: str  # its class in quark.torch.quantization.config.config (tests compare the fields)
    needs_whole_model: bool  # cross-layer scaling or Hessians over the replayed model: no streaming


ALGORITHMS: dict[str, Algorithm] = {algorithm.name: algorithm for algorithm in (
    Algorithm("gptq", GPTQOptions, "GPTQConfig", needs_whole_model=True),
    Algorithm("awq", AWQOptions, "AWQConfig", needs_whole_model=True),
    Algorithm("smoothquant", SmoothQuantOptions, "SmoothQuantConfig", needs_whole_model=True),
    Algorithm("rotation", RotationOptions, "RotationConfig", needs_whole_model=True),
)}


class GPTQAlgorithm(Strict):
    name: Literal["gptq"]
    options: GPTQOptions = GPTQOptions()


class AWQAlgorithm(Strict):
    name: Literal["awq"]
    options: AWQOptions = AWQOptions()


class SmoothQuantAlgorithm(Strict):
    name: Literal["smoothquant"]
    options: SmoothQuantOptions = SmoothQuantOptions()


class RotationAlgorithm(Strict):
    name: Literal["rotation"]
    options: RotationOptions = RotationOptions()


AlgorithmSpec = Annotated[
    Union[GPTQAlgorithm, AWQAlgorithm, SmoothQuantAlgorithm, RotationAlgorithm], Field(discriminator="name")
]


def streaming_refusal(algorithm: Any) -> str | None:
    """Why layer-by-layer quantization cannot do this recipe, or None.

    Why: GPTQ/AWQ/SmoothQuant/rotation need the whole model (cross-layer scaling, Hessians over
    the replayed model). The fp8 KV-cache scales are per attention layer (k_proj/v_proj outputs):
    streaming calibrates them like in memory (tested equal).
    """
    if algorithm is not None and ALGORITHMS[algorithm.name].needs_whole_model:
        return (f"streaming quantizes one decoder layer at a time; algorithm {algorithm.name} needs the whole model "
                "(use in_memory)")
    return None


def scheme_data_free_refusal(spec: schemes.SchemeSpec) -> str | None:
    """Why a scheme needs calibration data (an activation scale fixed before serving), or None."""
    if spec.activation_dtype is None:
        return None
    if spec.activation_static or spec.global_scale:
        return f"{spec.name} has static activation scales (calibrated)"
    if spec.activation_granularity not in ("per_token", "per_block"):
        return f"{spec.name}'s {spec.activation_granularity} activation scale is calibrated"
    return None


def data_free_refusal(quantization: "QuantizationSpec") -> str | None:
    """Why these quantization settings need calibration data, or None: the data-free path can do them
    (weights quantized from themselves, activations at run time: quantize/data_free.py)."""
    if quantization.algorithm is not None:
        return f"algorithm {quantization.algorithm_name} needs calibration data"
    if quantization.kv_cache is not None:
        return f"kv_cache {quantization.kv_cache}'s scales are calibrated"
    for spec in (scheme_spec(quantization.scheme), *quantization.layer_schemes().values()):
        if (problem := scheme_data_free_refusal(spec)) is not None:
            return problem
    return None


class QuantizationSpec(Strict):
    scheme: SchemeValue = Field(
        description="a named scheme (" + ", ".join(schemes.SCHEMES) + ") or the explicit form "
        "{weight: {dtype, granularity, group_size, symmetric}, activation: {dtype, granularity, dynamic, symmetric}}"
    )
    kv_cache: Literal["fp8"] | None = Field(None, description="fp8: Quark kv_cache_group on k_proj/v_proj outputs")
    exclude: tuple[str, ...] = Field(
        ("lm_head",), description="layer names, globs (*, ?) or 're:' regexes left unquantized"
    )
    layers: dict[str, SchemeValue] = Field(
        default_factory=dict, description="per-pattern scheme overrides: {pattern: scheme name or explicit form}"
    )
    keep_routers: bool = Field(
        True, description="MoE models: keep the router gates (mlp.gate, block_sparse_moe.gate, shared_expert_gate) "
        "in the model dtype, as Quark's templates and llm-compressor's examples do; false: they follow the scheme",
    )
    algorithm: AlgorithmSpec | None = Field(
        None, description="Quark algorithm: a name (gptq, awq, smoothquant, rotation: the template's defaults "
        "for the model type) or {name: NAME, options: {...}} with options from Quark's config class",
    )
    # Declared last: its check reads the algorithm validated before it.
    mode: Literal["in_memory", "streaming", "data_free", "auto"] = Field(
        "auto", description="in_memory: the whole model at once; streaming: one decoder layer at a time "
        "(peak ~one layer + calibration activations); data_free: checkpoint shards quantized one after the other, "
        "no calibration (schemes without static activation scales, no algorithm, no kv_cache); auto: data_free "
        "when the recipe allows it, else streaming when the in-memory estimate exceeds the memory budget",
    )

    @field_validator("scheme")
    @classmethod
    def _known_scheme(cls, scheme: str | ExplicitScheme) -> str | ExplicitScheme:
        return _check_scheme_name(scheme) if isinstance(scheme, str) else scheme

    @field_validator("exclude")
    @classmethod
    def _valid_patterns(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        _check_patterns(patterns)
        return patterns

    @field_validator("layers")
    @classmethod
    def _valid_overrides(cls, layers: dict[str, str | ExplicitScheme]) -> dict[str, str | ExplicitScheme]:
        _check_patterns(layers)
        for scheme in layers.values():
            if isinstance(scheme, str):
                _check_scheme_name(scheme)
        return layers

    @field_validator("mode")
    @classmethod
    def _streamable(cls, mode: str, info: ValidationInfo) -> str:
        if mode == "streaming":
            problem = streaming_refusal(info.data.get("algorithm"))
            if problem:
                raise ValueError(problem)
        return mode

    @field_validator("algorithm", mode="before")
    @classmethod
    def _algorithm_by_name(cls, algorithm: Any) -> Any:
        """A bare name means the template's defaults; unknown names get a did-you-mean."""
        name = algorithm if isinstance(algorithm, str) else algorithm.get("name") if isinstance(algorithm, dict) else None
        if isinstance(algorithm, dict) and "name" not in algorithm:
            raise ValueError(f"required field is missing: name (one of: {', '.join(ALGORITHMS)})")
        if isinstance(name, str) and name not in ALGORITHMS:
            close = difflib.get_close_matches(name, ALGORITHMS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(f"unknown algorithm '{name}' ({hint}known: {', '.join(ALGORITHMS)})")
        return {"name": algorithm} if isinstance(algorithm, str) else algorithm

    @property
    def kept(self) -> tuple[str, ...]:
        """The layers left in the model dtype: `exclude`, and the MoE routers unless keep_routers is false."""
        return (*self.exclude, ROUTER_PATTERN) if self.keep_routers else self.exclude

    @property
    def algorithm_name(self) -> str | None:
        return self.algorithm.name if self.algorithm is not None else None

    @property
    def algorithm_options(self) -> dict[str, Any]:
        return self.algorithm.options.chosen() if self.algorithm is not None else {}

    def layer_schemes(self) -> dict[str, schemes.SchemeSpec]:
        """Pattern -> scheme of the `layers` overrides."""
        return {pattern: scheme_spec(value) for pattern, value in self.layers.items()}

    @model_validator(mode="after")
    def _data_free_possible(self) -> "QuantizationSpec":
        if self.mode == "data_free" and (problem := data_free_refusal(self)) is not None:
            raise ValueError(f"mode data_free: {problem} (use streaming, in_memory or auto)")
        return self


class EvaluationSpec(Strict):
    engine: Literal["vllm", "transformers", "auto"] = Field(
        "vllm",
        description="vllm (its build decides GPU or CPU); transformers (Quark's emulation: slow, any scheme); "
        "auto: vLLM when it can serve the scheme, else transformers, labelled as a fallback in the report",
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="vLLM: GPUs one model is split over, layer by layer")
    pipeline_parallel_size: int = Field(1, ge=1, le=64, description="vLLM: GPUs (or nodes) the layers are staged over")
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None, description="vLLM's workers: mp (one node), ray (several nodes), null: vLLM's choice"
    )
    data_parallel_size: int = Field(1, ge=1, le=64, description="lm-eval's vLLM backend: replicas sharing the "
                                    "questions; only 1 is accepted (see the validator)")
    tasks: tuple[str, ...] = Field(
        ("arc_easy",),
        description="shipped offline tasks (" + ", ".join(SHIPPED_TASKS) + ") or lm_eval:TASK from lm-eval's registry (needs network)",
    )
    limit: int | None = Field(200, ge=1, description="questions per task in the first round (None: all)")
    max_limit: int | None = Field(
        1000, ge=1, description="questions per task at most, over the rounds run while an accuracy rule is "
        "inconclusive (200 -> 500 -> 1000 -> ...; null: up to the whole split)",
    )
    time_budget_s: float | None = Field(
        None, gt=0, description="no further round when it would end after this many seconds of evaluation",
    )
    perplexity_text: str | None = Field("wikipedia-heldout", description="held-out text for perplexity, or null")
    perplexity_limit: int | None = Field(None, ge=1, description="held-out paragraphs to score (None: all)")
    divergence_text: str | None = Field(
        "wikipedia-heldout", description="held-out text for token-level KL and top-1 agreement vs the base, or null"
    )
    divergence_limit: int | None = Field(32, ge=1, description="held-out paragraphs (up to 256 tokens each) for divergence")
    max_model_len: int = Field(2048, ge=128)
    enforce_eager: bool = Field(
        False, description="skip vLLM's graph compilation: faster load (~30 s vs ~100 s for a tiny model on CPU), slower decode"
    )
    prompts: tuple[str, ...] = Field(DEFAULT_PROMPTS, min_length=1)
    max_new_tokens: int = Field(32, ge=1, le=4096)

    @field_validator("data_parallel_size")
    @classmethod
    def _one_replica(cls, size: int) -> int:
        if size > 1:
            # lm-eval's vLLM replicas live only while it answers questions; serve's generations, the token
            # divergence and the completions' perplexity need an LLM of their own: a second full copy of the
            # model on the same GPUs, competing for their memory.
            raise ValueError(
                f"{size}: only 1 is supported: lm-eval's data-parallel replicas keep no model for generation and "
                "divergence, so a second full copy would share their GPUs; use tensor_parallel_size or "
                "pipeline_parallel_size to spread one model over more GPUs")
        return size

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        for task in tasks:
            if task not in SHIPPED_TASKS and not LM_EVAL_TASK.match(task):
                raise ValueError(
                    f"unknown task '{task}' (shipped: {', '.join(SHIPPED_TASKS)}; or lm_eval:TASK for lm-eval's registry)"
                )
        return tasks

    @model_validator(mode="after")
    def _rounds_grow(self) -> "EvaluationSpec":
        if self.max_limit is not None and (self.limit is None or self.max_limit < self.limit):
            raise ValueError(f"max_limit ({self.max_limit}) must be at least limit ({self.limit}): the first round "
                             "evaluates limit questions, later rounds more, up to max_limit")
        return self

    @field_validator("perplexity_text", "divergence_text")
    @classmethod
    def _known_text(cls, text: str | None) -> str | None:
        if text is not None and text not in SHIPPED_HELDOUT_TEXTS:
            raise ValueError(f"unknown held-out text '{text}' (known: {', '.join(SHIPPED_HELDOUT_TEXTS)})")
        return text


class GatesSpec(Strict):
    """Gate rules, the one set of defaults (shipped tiny recipes and `check` without a recipe use these).

    Rules on sampled figures are judged on their interval (pass / fail / inconclusive), so a
    threshold is the line a broken export's figure is expected to cross, not a noise margin.
    Defaults fit FP8/INT8 W8A8 on a small model; null switches a rule off."""

    min_recovery: float | None = Field(
        0.90, gt=0, le=2, description="quantized acc / base acc, per task (paired-bootstrap interval over questions)",
    )
    max_accuracy_drop: float | None = Field(
        None, gt=0, le=1,
        description="base acc - quantized acc, per task (paired-bootstrap interval over questions)",
    )
    max_perplexity_ratio: float | None = Field(1.10, ge=1.0, description="quantized ppl / base ppl on held-out text")
    # Measured on SmolLM2-135M (5053 held-out tokens): INT8 per-channel W + per-token A 0.032 nats / 0.88;
    # per-tensor INT8 (the known failure) 0.089 / 0.80. Larger models shift far less: tighten for them.
    max_mean_kl: float | None = Field(
        0.05, gt=0, description="mean per-token KL(base || quantized) on held-out text, nats"
    )
    min_top1_agreement: float | None = Field(
        0.85, gt=0, le=1, description="share of held-out tokens whose most likely next token is unchanged"
    )
    alpha: float = Field(
        0.05, gt=0, lt=0.5, description="error rate of each interval rule's verdict (two-sided: intervals at "
        "1 - alpha), split over the planned rounds for the accuracy rules",
    )
    no_garbage: bool = Field(True, description="greedy generations must not be garbage (see the garbage_* limits)")
    garbage_max_repetition_rate: float = Field(0.5, gt=0, le=1, description="share of repeated word 3-grams")
    garbage_max_non_printable_share: float = Field(0.01, ge=0, le=1)
    garbage_max_completion_perplexity: float | None = Field(
        200.0, gt=1, description="the base model's perplexity of a quantized completion (catches word salad)"
    )
    max_export_size_ratio: float | None = Field(None, gt=0, le=2, description="export size / base size")
    max_peak_memory_gb: float | None = Field(None, gt=0, description="peak RSS of the serving process tree, GiB")


class ResourcesSpec(Strict):
    """Where the heavy work runs and how much memory it may take. Settings of real engines
    (torch devices, accelerate's max_memory), not a scheduler of our own."""

    device: Literal["auto", "cpu", "cuda", "rocm"] = Field(
        "auto", description="auto: the accelerator torch sees (else the CPU); cuda/rocm: refused before loading when absent"
    )
    host_memory_gb: float | None = Field(
        None, gt=0, description="host RAM the quantize stage may use (quantization.mode: auto streams above it); "
        "null: 80% of this machine's memory",
    )
    device_memory_gb: float | dict[int, float] | None = Field(
        None, description="memory limit per accelerator, GiB (one value for each, or {index: GiB}): accelerate's "
        "max_memory when the in-memory mode spreads the model over the GPUs",
    )
    offload_folder: str | None = Field(
        None, description="folder for weights accelerate offloads from the GPUs in the in-memory mode (null: none)"
    )

    @field_validator("device_memory_gb")
    @classmethod
    def _positive_limits(cls, limits: float | dict[int, float] | None) -> float | dict[int, float] | None:
        values = limits.values() if isinstance(limits, dict) else [] if limits is None else [limits]
        if any(value <= 0 for value in values):
            raise ValueError("memory limits are GiB above 0")
        if isinstance(limits, dict) and any(index < 0 for index in limits):
            raise ValueError("device indices start at 0")
        return limits


class PublishSpec(Strict):
    target: str = Field(description="hf://ORG/NAME for the Hugging Face Hub, or a local folder")
    endpoint: str | None = Field(None, description="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    revision: str | None = Field(None, description="Hub branch to publish to (default: main)")
    private: bool = Field(True, description="for Hub targets: create the repo private")
    card_extras: dict[str, str] = Field(default_factory=dict, description="extra model-card sections: {title: text}")


class BaselineSpec(Strict):
    """An evaluation-only comparison beside the export (not gated): what users ran before.
    Exactly one of `bitsandbytes` (the base model quantized on load by transformers'
    BitsAndBytesConfig: LLM.int8() or NF4) and `checkpoint` (an existing model folder, any format
    `check` reads, served by the run's engine)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="the column's name in the report")
    bitsandbytes: Literal["int8", "nf4"] | None = Field(None, description="int8: LLM.int8(); nf4: 4-bit NormalFloat")
    checkpoint: str | None = Field(None, description="a local model folder (config.json and safetensors)")

    @model_validator(mode="after")
    def _one_kind(self) -> BaselineSpec:
        if (self.bitsandbytes is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of bitsandbytes (int8 | nf4) and checkpoint (a model folder)")
        return self

    @property
    def kind(self) -> str:
        return f"bitsandbytes {self.bitsandbytes}" if self.bitsandbytes else f"checkpoint {self.checkpoint}"


# The algorithm name of plain round-to-nearest in a sweep: no Quark algorithm (`algorithm: null`).
RTN = "rtn"


def check_sweep_scheme(name: str) -> str:
    """A sweep's scheme: a named scheme (the recipe's explicit form stays in the recipe)."""
    return _check_scheme_name(name)


def check_sweep_algorithm(name: str) -> str:
    if name != RTN and name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm '{name}' (known: {', '.join([RTN, *ALGORITHMS])})")
    return name


class SweepSpec(Strict):
    """`quantize-pipeline sweep`: every scheme with every algorithm, each its own run of this recipe."""

    schemes: tuple[str, ...] = Field(min_length=1, description="named schemes to compare")
    algorithms: tuple[str, ...] = Field(
        (RTN,), min_length=1, description=f"{RTN} (round to nearest: no algorithm) or Quark algorithm names; "
        "the algorithm's template defaults"
    )
    executor: Literal["local", "ray"] = Field(
        "local", description="local: one variant after another; ray: each variant a Ray task (RAY_ADDRESS, else a "
        "local Ray instance)"
    )

    @field_validator("schemes")
    @classmethod
    def _known_schemes(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_sweep_scheme(name) for name in names)

    @field_validator("algorithms")
    @classmethod
    def _known_algorithms(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_sweep_algorithm(name) for name in names)


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    description: str = ""
    model: ModelSpec
    calibration: CalibrationSpec = CalibrationSpec()
    quantization: QuantizationSpec
    evaluation: EvaluationSpec = EvaluationSpec()
    gates: GatesSpec = GatesSpec()
    resources: ResourcesSpec = ResourcesSpec()
    publish: PublishSpec | None = None
    report_to: tuple[Literal["mlflow"], ...] = Field(
        (), description="where else the gated run is logged: mlflow (MLFLOW_TRACKING_URI, else RUN_DIR/mlruns; "
        "needs the optional extra quantize-pipeline[mlflow])",
    )
    baselines: tuple[BaselineSpec, ...] = Field(
        (), description="evaluation-only columns beside the export in the report (not gated): bitsandbytes "
        "int8/nf4 of the base model, or existing checkpoints; same questions, tokens/s and peak memory while generating",
    )
    sweep: SweepSpec | None = Field(
        None, description="variants for `quantize-pipeline sweep` (its --schemes/--algorithms/--executor override); "
        "`run` ignores it",
    )

    @model_validator(mode="before")
    @classmethod
    def _resolve_auto_dtype(cls, data: Any) -> Any:
        """`model.dtype: auto` (the default) becomes this machine's concrete dtype (quantize_pipeline.recipe.compute_dtype)."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            return data
        if data["model"].get("dtype", "auto") != "auto":
            return data
        resources = data.get("resources")
        device = resources.get("device", "auto") if isinstance(resources, dict) else "auto"
        return {**data, "model": {**data["model"], "dtype": auto_dtype(device if isinstance(device, str) else "auto")}}

    @field_validator("baselines")
    @classmethod
    def _unique_baseline_names(cls, baselines: tuple[BaselineSpec, ...]) -> tuple[BaselineSpec, ...]:
        names = [baseline.name for baseline in baselines]
        if duplicated := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"baseline names must be unique: {', '.join(duplicated)}")
        return baselines

    @property
    def scheme(self) -> schemes.SchemeSpec:
        """The recipe's scheme, named or explicit (`.name` is what reports and manifests carry)."""
        return scheme_spec(self.quantization.scheme)

    def content_hash(self) -> str:
        """sha256 of the resolved recipe (defaults included): what produced a run."""
        # `sweep` lists variants to run, not how this run is made: not part of what produced it.
        canonical = json.dumps(self.model_dump(mode="json", exclude={"sweep"}), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


def field_path(loc: tuple) -> str:
    """A pydantic error location as the recipe's field path, without union branch tags."""
    parts = [str(part) for part in loc]
    kept = [
        part for index, part in enumerate(parts)
        if part not in SCHEME_TAGS and not (index and parts[index - 1] == "algorithm" and part in ALGORITHMS)
    ]
    return ".".join(kept)


def apply_settings(data: dict, settings: Sequence[str], source: str) -> dict:
    """`--set FIELD=VALUE` over a recipe's data, in order: FIELD a dotted path into the recipe
    (`evaluation.limit`, `publish.target`), VALUE parsed as YAML (`20`, `null`, `[arc_easy, piqa]`).
    Returns a copy; the result is validated like the file (a bad value names its field)."""
    data = copy.deepcopy(data)
    for setting in settings:
        field, equals, text = setting.partition("=")
        field = field.strip()
        if not equals or not field or any(not part for part in field.split(".")):
            raise RecipeError(source, "--set", f"'{setting}': expected FIELD=VALUE with a dotted FIELD (evaluation.limit=20)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise RecipeError(source, field, f"--set value '{text}' is not YAML") from None
        *parents, key = field.split(".")
        target = data
        for depth, part in enumerate(parents):
            if target.get(part) is None:
                target[part] = {}
            elif not isinstance(target[part], dict):
                raise RecipeError(source, ".".join(parents[:depth + 1]), f"--set {field}: not a section")
            target = target[part]
        target[key] = value
    return data


def load_recipe(path: str | Path, settings: Sequence[str] = ()) -> Recipe:
    """Read and validate a recipe, with `--set FIELD=VALUE` settings applied first; any problem is one
    RecipeError line naming file and field."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), "", "file not found")
    raw = path.read_bytes()
    if b"\0" in raw:
        raise RecipeError(str(path), "", "binary file, expected a YAML recipe")
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(str(path), "", "not UTF-8 text, expected a YAML recipe") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(str(path), "", f"YAML syntax error{where}: {problem}") from None
    if data is None:
        raise RecipeError(str(path), "", "empty recipe")
    if not isinstance(data, dict):
        raise RecipeError(str(path), "", f"expected a mapping at the top level, got {type(data).__name__}")
    data = apply_settings(data, settings, str(path))
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = field_path(error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key (check spelling)"
        elif error["type"] == "missing":
            message = "required field is missing"
        raise RecipeError(str(path), field, message) from None
