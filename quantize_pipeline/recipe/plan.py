"""plan: what a recipe would do, from the model's config alone (no weights loaded).

The model is built on PyTorch's meta device, so a 70B config plans in seconds:
which layers get which scheme, the export size, rough peak memory, and which
engine will serve it (or why none can).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from quantize_pipeline.engines import compat
from quantize_pipeline.formats.base import cdiv
from quantize_pipeline.quantize import moe
from quantize_pipeline.recipe import checks, devices, layers
from quantize_pipeline.recipe.schema import Recipe, data_free_refusal, streaming_refusal
from quantize_pipeline.recipe.schemes import WEIGHT_BITS, SchemeSpec, get_scheme
from quantize_pipeline.run.resume import STAGES

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
DECODER_LAYER = re.compile(r"^(.*\.layers\.\d+)\.")
# RSS of torch + transformers + Quark imported, before any weight (bench/memory_scaling.py: ~0.8 GiB).
LIBRARY_OVERHEAD_BYTES = int(0.8 * 2**30)
STREAMING_SHARD_BYTES = 2**30  # quantize/streaming.py writes shards of at most this size
# The data-free path (quantize/data_free.py): weights quantized per Quark call, and its output files' size.
DATA_FREE_GROUP_BYTES = 256 * 2**20
DATA_FREE_PART_BYTES = 512 * 2**20
IN_MEMORY_FACTOR = 2.0  # in-memory quantize peak / checkpoint size (measured, see quantize_peaks)
# Shipped config.json files for Hub models (offline planning): recipes/model-configs/index.json.
SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "shipped" / "recipes" / "model-configs"  # package data


@dataclass
class Plan:
    stages: tuple[str, ...]
    layer_schemes: dict[str, str | None]  # linear layer -> scheme name, None when excluded
    base_size_bytes: int
    export_size_bytes: int
    quantize_peak_bytes: int
    engines: dict[str, compat.Support] = field(default_factory=dict)
    installed_engine: str | None = None
    device: str = "cpu"  # torch device type the quantize stage uses
    mode: str = "in_memory"  # quantization mode chosen (quantization.mode, auto resolved)
    mode_reason: str = ""
    quantize_peaks: dict[str, dict[str, int]] = field(default_factory=dict)  # mode -> {"host", "device"} bytes
    host_budget_bytes: int = 0
    # MoE models: {"experts_per_layer", "expert_schemes": {scheme: layers}, "routers": n, "routers_kept": n}
    moe: dict | None = None

    @property
    def counts(self) -> Counter:
        return Counter(scheme or "excluded (kept in model dtype)" for scheme in self.layer_schemes.values())


def _quantized_bytes(spec: SchemeSpec, shape: tuple[int, ...]) -> int:
    out_features, in_features = shape[0], shape[-1]
    weight = out_features * in_features * WEIGHT_BITS[spec.weight_dtype] // 8
    if spec.weight_granularity == "per_block":
        # one byte per block scale (e8m0 or FP8); NVFP4 adds one FP32 scale per tensor (and per input)
        return weight + out_features * cdiv(in_features, spec.block_size) + (8 if spec.global_scale else 0)
    if spec.weight_granularity == "per_group":
        scales = out_features * (in_features // spec.group_size)
    elif spec.weight_granularity == "per_channel":
        scales = out_features
    else:
        scales = 1
    zero_points = 0 if spec.weight_symmetric else scales  # one per scale (int8/int4 packed: at most a byte)
    return weight + scales * 2 + zero_points


@dataclass(frozen=True)
class MetaModel:
    """What planning needs of a model, read from a meta-device build (no weights)."""

    linear: dict[str, tuple[int, ...]]  # quantizable layer -> 2-D weight shape
    total_params: int
    largest_block_params: int  # the biggest decoder layer: what streaming holds at once
    embedding_params: int  # embeddings (and an untied lm_head): streamed at the start and the end
    hidden_size: int
    experts: int = 0  # experts per MoE layer (0: dense); a layer of experts is streaming's unit (largest_block_params)
    checkpoint_dtype: str | None = None  # config.json's dtype (the data-free path casts what differs from the recipe's)


def meta_model(config_path: Path, trust_remote_code: bool = False) -> MetaModel:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path.parent, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    linear: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for parameter_name, parameter in module.named_parameters(recurse=False):
            if parameter.ndim == 2 and parameter_name == "weight":  # Linear layers and MoE routers
                linear[name] = tuple(parameter.shape)
            elif parameter.ndim == 3:  # fused MoE experts [experts, out, in] (transformers 5): one layer each
                linear.update(_expert_layers(name, parameter_name, tuple(parameter.shape)))
    # The checkpoint's names, which recipes' patterns and verify speak (Mixtral: block_sparse_moe.experts.E.w1).
    linear = {moe.checkpoint_name(config.model_type, name): shape for name, shape in linear.items()}
    blocks: Counter = Counter()
    for name, parameter in model.named_parameters():  # tied weights (lm_head = embed_tokens) are listed once
        match = DECODER_LAYER.search(name)
        if match:
            blocks[match.group(1)] += parameter.numel()
    embedding = model.get_input_embeddings().weight.numel()
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        embedding = max(embedding, output.weight.numel())
    return MetaModel(
        linear=linear, total_params=sum(parameter.numel() for parameter in model.parameters()),
        largest_block_params=max(blocks.values(), default=0), embedding_params=embedding,
        hidden_size=config.get_text_config().hidden_size,
        experts=max((getattr(config.get_text_config(), key, None) or 0 for key in moe.MOE_EXPERT_COUNT_KEYS), default=0),
        checkpoint_dtype=_dtype_name(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)),
    )


def _dtype_name(dtype) -> str | None:
    """config.json's dtype as the recipe spells it (`bfloat16`), from a torch dtype or a string."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _expert_layers(name: str, parameter_name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """A fused experts parameter as the per-expert linears Quark unfuses it into (quark_experts.QuarkExperts):
    gate_up_proj [E, 2*ffn, hidden] -> E.gate_proj and E.up_proj [ffn, hidden]; down_proj [E, hidden, ffn] ->
    E.down_proj. Another fused parameter stays one layer of all its experts' rows."""
    experts, out_features, in_features = shape
    if parameter_name == "gate_up_proj":
        return {f"{name}.{expert}.{part}": (out_features // 2, in_features)
                for expert in range(experts) for part in ("gate_proj", "up_proj")}
    if parameter_name == "down_proj":
        return {f"{name}.{expert}.down_proj": (out_features, in_features) for expert in range(experts)}
    return {f"{name}.{parameter_name}": (experts * out_features, in_features)}


def quantize_peaks(recipe: Recipe, model: MetaModel, device: str) -> dict[str, dict[str, int]]:
    """Estimated peak bytes of the quantize stage per mode, on the host and on the accelerator.

    in_memory: Quark holds the whole model in its dtype, its quantized copies, observers and activations:
    about twice the checkpoint (bench/memory_scaling.py measured 1.7x on a 1B shape, 2.1x on 3B), on the
    host or spread over the GPUs. streaming, the largest of its three phases (plus the libraries' fixed overhead):
    the embedding (a cast one while it is read, then beside the calibration hidden states at the layer boundary
    it computes), a decoder layer (its weights and Quark's quantized copy, the next layer read ahead) with the
    boundary and an output shard, or a matrix under a shard copied through at the end. bench/memory_scaling.py,
    bench/scale_vs_peers.py and bench/large_boundary.py compare them with measured peaks.
    """
    dtype_bytes = DTYPE_BYTES[recipe.model.dtype]
    base = model.total_params * dtype_bytes
    in_memory = int(base * IN_MEMORY_FACTOR)
    calibration_tokens = recipe.calibration.samples * recipe.calibration.max_seq_len
    # Each batch's output replaces its input as it is computed: one copy of the boundary (+ one batch). The resume
    # save writes it from its own memory (rundir.atomic_save_tensors): no second copy to count.
    boundary = calibration_tokens * model.hidden_size * dtype_bytes
    # A decoder layer while Quark quantizes it (its weights, float32 temporaries and the quantized copy: ~4x), or
    # the embedding matrix while it is read (the shard's mapped pages and the copy: 2x). Measured, see below.
    one_layer = max(4 * model.largest_block_params, 2 * model.embedding_params) * dtype_bytes
    shard = min(STREAMING_SHARD_BYTES, base)  # the shard writer holds an output shard until it is written
    embedding = model.embedding_params * dtype_bytes
    stored = model.embedding_params * DTYPE_BYTES.get(model.checkpoint_dtype, dtype_bytes)  # as the shards hold it
    # Streaming on the CPU, the largest of three phases. safetensors maps the shards: a tensor read but not yet
    # touched costs nothing. The embedding: in the checkpoint's dtype it stays mapped and embedding the calibration
    # tokens touches their rows alone, so the first boundary is all; cast, the matrix is read whole (its mapped
    # pages and the cast copy), then the copy is held beside the boundary it computes. The layers: the boundary,
    # the layer being quantized with Quark's quantized copy and the next one read ahead (3x), and one shard (the
    # one being written; the one filling is small by then). The end: tensors copied through (embeddings, an
    # excluded lm_head) that fill a shard were copied in the kernel from the start (quantize/copy_through.py: never
    # in this process's memory); a smaller matrix is read while the last shard is written, beside the last
    # boundary. Measured (issue #26): the 14B shape 3.21-3.31 GiB (planned 3.34: the layers), the wide-2layers
    # shape's 3.1 GiB float32 boundary through `run` 5.41 GiB (planned 5.42: the cast embedding beside it).
    if model.checkpoint_dtype == recipe.model.dtype:
        embedding_phase = boundary
    else:
        embedding_phase = embedding + max(stored, boundary)
    end_phase = boundary + stored if stored < STREAMING_SHARD_BYTES else 0
    streaming_host = LIBRARY_OVERHEAD_BYTES + max(embedding_phase, end_phase,
                                                  boundary + 3 * model.largest_block_params * dtype_bytes + shard)
    # data_free, the larger of its two phases. Linears: three groups of weights (one quantized, two read ahead;
    # Quark's float32 copies are of cache-sized row blocks only) and three output files (one filling, one
    # queued, one being written). The embedding matrix (copied, not quantized: one tensor, not cut): it and its
    # cast, with one group read ahead and one file being written. Counted as a sum, the two phases gave 6.70 GiB
    # for the 14B shape's measured 3.25 (bench/scale_vs_peers.py); as the larger, 3.05.
    group, part = min(DATA_FREE_GROUP_BYTES, base), min(DATA_FREE_PART_BYTES, base)
    cast = 1 if model.checkpoint_dtype == recipe.model.dtype else 2  # else the matrix as read, and cast
    data_free = LIBRARY_OVERHEAD_BYTES + max(3 * group + 3 * part, cast * embedding + group + part)
    if device == "cpu":
        return {
            "in_memory": {"host": in_memory + LIBRARY_OVERHEAD_BYTES, "device": 0},
            "streaming": {"host": streaming_host, "device": 0},
            "data_free": {"host": data_free, "device": 0},
        }
    # On an accelerator the weights and hidden states live there; the host stages one layer read from the shards.
    return {
        "in_memory": {"host": LIBRARY_OVERHEAD_BYTES + one_layer // 2, "device": in_memory},
        "streaming": {"host": LIBRARY_OVERHEAD_BYTES + one_layer // 2 + shard, "device": one_layer + boundary},
        "data_free": {"host": data_free, "device": 0},  # quantized on the CPU: the weights alone decide the export
    }


def choose_mode(recipe: Recipe, peaks: dict[str, dict[str, int]], budget: int, device: str,
                device_budget: int | None, fused_tensor: str | None = None) -> tuple[str, str]:
    """(mode, why): the recipe's mode; for auto data_free when no calibration is needed and the checkpoint stores
    each linear's weight on its own (fused_tensor: one that does not), else streaming unless in-memory is known
    to fit.

    device_budget: the accelerators' memory in all (None: not known, e.g. planning without the GPUs)."""
    gib = 2**30
    requested = recipe.quantization.mode
    if requested != "auto":
        return requested, "as the recipe asks"
    if data_free_refusal(recipe.quantization) is None and fused_tensor is None:
        return "data_free", ("no calibration needed (no static activation scale, algorithm or kv_cache): "
                             "checkpoint shards quantized one after the other, byte-identical to in_memory")
    host, on_device = peaks["in_memory"]["host"], peaks["in_memory"]["device"]
    why_stream = None
    if host > budget:
        why_stream = f"in-memory host peak {host / gib:.1f} GiB > budget {budget / gib:.1f} GiB"
    elif device != "cpu" and device_budget is None:
        why_stream = (f"in-memory needs {on_device / gib:.1f} GiB of accelerator memory and how much there is "
                      "is not known here (resources.device_memory_gb unset, no GPU seen)")
    elif device != "cpu" and on_device > device_budget:
        why_stream = f"in-memory accelerator peak {on_device / gib:.1f} GiB > accelerator memory {device_budget / gib:.1f} GiB"
    if why_stream is None:
        return "in_memory", f"in-memory peak {max(host, on_device) / gib:.1f} GiB fits (host budget {budget / gib:.1f} GiB)"
    refusal = streaming_refusal(recipe.quantization.algorithm)
    if refusal is not None:
        return "in_memory", f"auto: {why_stream}, but {refusal}; trying in_memory anyway"
    return "streaming", why_stream


def quantize_mode(recipe: Recipe, config_path: Path, device: str) -> tuple[str, str]:
    """(mode, why) for the quantize stage of a run on `device`: what `plan` would print."""
    result = make_plan(recipe, config_path, device=device)
    return result.mode, result.mode_reason


def accelerator_budget(recipe: Recipe, seen) -> int | None:
    """Bytes of accelerator memory the in-memory mode may spread over: the recipe's per-device limits
    (one value: times the GPUs seen, at least one), else the memory of the GPUs torch sees."""
    limits = recipe.resources.device_memory_gb
    if isinstance(limits, dict):
        return int(sum(limits.values()) * 2**30)
    if limits is not None:
        return int(limits * max(seen.count, 1) * 2**30)
    return sum(seen.memory_bytes) or None


def make_plan(recipe: Recipe, config_path: Path, *, device: str | None = None, host_budget: int | None = None,
              device_budget: int | None = None) -> Plan:
    """device: the torch device type the quantize stage will use ("cpu"/"cuda"); by default the recipe's
    resources.device (auto: what torch sees on this machine)."""

    model = meta_model(config_path, recipe.model.trust_remote_code)
    linear = model.linear
    layer_schemes = layers.assign_schemes(recipe, list(linear))
    dtype_bytes = DTYPE_BYTES[recipe.model.dtype]
    base_size = model.total_params * dtype_bytes
    export_size = base_size
    for name, scheme in layer_schemes.items():
        if scheme is not None:
            shape = linear[name]
            export_size += _quantized_bytes(get_scheme(scheme), shape) - shape[0] * shape[-1] * dtype_bytes
    stages = STAGES if recipe.publish is not None else STAGES[:-1]
    if device is None:  # cuda/rocm recipes are planned for their GPUs even on a machine without one
        requested = recipe.resources.device
        device = "cuda" if requested in ("cuda", "rocm") or (
            requested == "auto" and devices.accelerators().kind is not None) else "cpu"
    peaks = quantize_peaks(recipe, model, device)
    budget = host_budget if host_budget is not None else devices.host_memory_budget_bytes(recipe)
    if device_budget is None and device != "cpu":
        device_budget = accelerator_budget(recipe, devices.accelerators())
    mode, mode_reason = choose_mode(recipe, peaks, budget, device, device_budget,
                                    checks.fused_checkpoint_tensor(config_path.parent))
    return Plan(
        stages=stages,
        layer_schemes=layer_schemes,
        base_size_bytes=base_size,
        export_size_bytes=export_size,
        quantize_peak_bytes=peaks[mode]["host"],
        engines={engine: compat.can_serve(recipe, engine, list(linear)) for engine in compat.ENGINES},
        installed_engine=compat.installed_vllm_engine(),
        device=device,
        mode=mode,
        mode_reason=mode_reason,
        quantize_peaks=peaks,
        host_budget_bytes=budget,
        moe=_moe_summary(recipe, model, layer_schemes) if model.experts else None,
    )


def _moe_summary(recipe: Recipe, model: MetaModel, layer_schemes: dict[str, str | None]) -> dict:
    """What an MoE plan says of the experts and the routers (kept unless quantization.keep_routers is false)."""
    experts = [name for name in layer_schemes if ".experts." in name]
    routers = layers.select(list(layer_schemes), [moe.ROUTER_PATTERN])
    return {
        "experts_per_layer": model.experts,
        "expert_schemes": dict(Counter(layer_schemes[name] or "kept in model dtype" for name in experts)),
        "routers": len(routers),
        "routers_kept": sum(layer_schemes[name] is None for name in routers),
        "keep_routers": recipe.quantization.keep_routers,
    }


def find_model_config(recipe: Recipe, explicit: Path | None) -> Path | None:
    """config.json to plan from: --model-config, the local folder, a prepared/cached copy, or for a
    Hub model the config shipped under recipes/model-configs/ (index.json maps Hub ids to files)."""
    if explicit is not None:
        return explicit
    spec = recipe.model
    if spec.kind != "hub":
        model_dir = checks.local_model_dir(recipe)
        candidate = model_dir / "config.json" if model_dir is not None else None
    else:
        try:
            from huggingface_hub import hf_hub_download

            candidate = Path(hf_hub_download(spec.source, "config.json", revision=spec.revision, local_files_only=True))
        except Exception:  # not in the local HF cache: a shipped copy, if any
            candidate = shipped_config(spec.source)
    return candidate if candidate is not None and candidate.is_file() else None


def shipped_config(hub_id: str) -> Path | None:
    index = SHIPPED_CONFIGS / "index.json"
    if not index.is_file():
        return None
    relative = json.loads(index.read_text()).get(hub_id)
    return SHIPPED_CONFIGS / relative if relative else None


def summary(plan: Plan) -> dict:
    """A JSON-able summary (for --json and tests)."""
    return {
        "stages": list(plan.stages),
        "layers": plan.layer_schemes,
        "layer_counts": dict(plan.counts),
        "base_size_bytes": plan.base_size_bytes,
        "export_size_bytes": plan.export_size_bytes,
        "export_size_ratio": round(plan.export_size_bytes / plan.base_size_bytes, 4),
        "quantize_peak_bytes": plan.quantize_peak_bytes,
        "quantize_device": plan.device,
        "quantize_mode": plan.mode,
        "quantize_mode_reason": plan.mode_reason,
        "quantize_peaks_bytes": plan.quantize_peaks,
        "host_memory_budget_bytes": plan.host_budget_bytes,
        "engines": {name: vars(entry) for name, entry in plan.engines.items()},
        "installed_engine": plan.installed_engine,
        "moe": plan.moe,
    }


def to_json(plan: Plan) -> str:
    return json.dumps(summary(plan), indent=2)
