"""Streaming quantization: one decoder layer in memory at a time, with Quark's own pieces.

The model is a skeleton on the meta device. The calibration tokens are embedded with the
embedding weights alone; then, for each decoder layer in order, its weights are read from the
shards (`safe_open`), Quark's ModelQuantizer quantizes a container that holds just that layer
under its full-model name (so exclude/`layers:` patterns and Quark's config apply unchanged),
Quark freezes it and converts it to the exported tensors (ModelPostProcessor: the code
`export_safetensors` runs), the tensors go to the shard writer and the layer is freed. What is copied
through unchanged (embeddings, an excluded lm_head) goes file to file in the kernel meanwhile (copy_through.py).

Static activation scales: Quark's in-memory calibration runs with fake quantization disabled
(`ModelQuantizer._do_calibration`), so layer i observes the *float* outputs of layers 0..i-1.
The outputs each layer's container computes during its own calibration pass are those float
outputs, in batch order, so they are what the next layer is calibrated on: streaming equals in-memory.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from quantize_pipeline.formats.safetensors_header import read_header_and_data_start
from quantize_pipeline.quantize import fp8_row_blocks, moe
from quantize_pipeline.quantize.copy_through import write_copied_shard
from quantize_pipeline.quantize.export import finish_export
from quantize_pipeline.quantize.forward_batches import forward_batches
from quantize_pipeline.quantize.freeze import count_frozen, weights_fake_quantized_on_freeze
from quantize_pipeline.quantize.quantize import peak_rss_mb, resolve_config, say_uncalibrated, write_summary
from quantize_pipeline.quantize.stream_state import LayerState, state_key
from quantize_pipeline.quantize.weight_observers import use_uncounted_observers
from quantize_pipeline.recipe.plan import STREAMING_SHARD_BYTES
from quantize_pipeline.recipe.schema import Recipe
from quantize_pipeline.run.stage_record import StageRecord, records_to_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The writer holds one shard in memory before writing it (safetensors writes a file in one go), so
# streaming shards are small: 1 GiB (save_pretrained's default is 50 GB). Models under it get the
# in-memory layout exactly (one model.safetensors); larger ones more, smaller shards with the index.
# plan's memory estimate counts the same constant.
MAX_SHARD_BYTES = STREAMING_SHARD_BYTES


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class CheckpointReader:
    """Tensors of a safetensors checkpoint (one file or sharded with an index), read lazily by name."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        self.model_dir = model_dir
        index = model_dir / INDEX_FILE
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (model_dir / SINGLE_FILE).is_file():
            with safe_open(model_dir / SINGLE_FILE, framework="pt") as handle:
                self.weight_map = {name: SINGLE_FILE for name in handle.keys()}
        else:
            raise FileNotFoundError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")

    def names(self, prefix: str = "") -> list[str]:
        return [name for name in self.weight_map if name.startswith(prefix)]

    def sizes(self, names: list[str]) -> dict[str, int]:
        """Each tensor's bytes as its shard stores them (from the headers: nothing is read)."""
        wanted, sizes = set(names), {}
        for file_name in sorted({self.weight_map[name] for name in wanted}):
            header, _ = read_header_and_data_start(self.model_dir / file_name)
            sizes |= {name: entry["data_offsets"][1] - entry["data_offsets"][0]
                      for name, entry in header.items() if name in wanted}
        return sizes

    def read(self, names: list[str]) -> dict:
        from safetensors import safe_open

        tensors = {}
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        for file_name, file_names in by_file.items():
            with safe_open(self.model_dir / file_name, framework="pt") as handle:
                for name in file_names:
                    tensors[name] = handle.get_tensor(name)
        return tensors


class ShardWriter:
    """Writes tensors into safetensors shards as they come, then names them as save_pretrained does.

    A full shard is written on a thread behind the caller (one at a time: the next full shard waits for it), so
    quantization goes on while the disk takes the last shard: at most two shards are held, one filling, one
    being written."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0
        self.write_s = 0.0  # the writer thread's seconds (overlapped with the caller's work)
        self.wait_s = 0.0  # the caller's seconds waiting for the previous shard's write
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._writing: Future | None = None
        self._copying: list[Future] = []  # shards copied through in the kernel (copy_through), on a thread of their own
        self._copier: ThreadPoolExecutor | None = None  # that thread, started by the first copy_through

    def add(self, tensors: dict) -> None:
        for name, tensor in sorted(tensors.items()):  # by name: the same shards whether fresh or resumed
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.max_shard_bytes:
                self.flush()
            self.pending[name] = tensor.detach().to("cpu").contiguous()
            self.pending_bytes += size
            self.total_bytes += size

    def copy_through(self, reader: CheckpointReader, sizes: dict[str, int]) -> None:
        """The tensors named in `sizes` (name: bytes, CheckpointReader.sizes) as the checkpoint stores them, byte for
        byte, in shards of their own (at most max_shard_bytes, a larger tensor alone) numbered before the shards
        added after this call; copied in the kernel (quantize/copy_through.py) on a thread beside the writer's, so
        the caller goes on at once."""
        if self._copier is None:
            self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy-through")
        groups: list[list[str]] = []
        group_bytes = 0
        for name in sorted(sizes):
            if not groups or group_bytes + sizes[name] > self.max_shard_bytes:
                groups.append([])
                group_bytes = 0
            groups[-1].append(name)
            group_bytes += sizes[name]
        for group in groups:
            file_name = f"part-{len(self.shards):05d}.safetensors.tmp"
            self.shards.append((file_name, group))
            self.total_bytes += sum(sizes[name] for name in group)
            sources = {name: reader.model_dir / reader.weight_map[name] for name in group}
            self._copying.append(self._copier.submit(write_copied_shard, sources, self.out_dir / file_name))

    def flush(self) -> None:
        if not self.pending:
            return
        file_name = f"part-{len(self.shards):05d}.safetensors.tmp"
        self._wait()
        self._writing = self._thread.submit(self._write, self.pending, self.out_dir / file_name)
        self.shards.append((file_name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0  # the writer thread holds the only reference now

    def _write(self, tensors: dict, path: Path) -> None:
        from safetensors.torch import save_file

        started = time.perf_counter()
        save_file(tensors, str(path), metadata={"format": "pt"})
        self.write_s += time.perf_counter() - started

    def _wait(self) -> None:
        """Until the shard being written is on disk (its error, if any, raised here)."""
        if self._writing is not None:
            started = time.perf_counter()
            writing, self._writing = self._writing, None
            writing.result()
            self.wait_s += time.perf_counter() - started

    def close(self) -> list[str]:
        """Final names: model.safetensors, or model-0000i-of-0000n.safetensors with the index."""
        self.flush()
        self._wait()
        self._thread.shutdown()
        started = time.perf_counter()
        for copying in self._copying:
            copying.result()  # its error, if any, raised here
        if self._copier is not None:
            self._copier.shutdown()
        self.wait_s += time.perf_counter() - started
        if len(self.shards) == 1:
            os.replace(self.out_dir / self.shards[0][0], self.out_dir / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map, files = {}, []
        for number, (temporary, names) in enumerate(self.shards, start=1):
            final = f"model-{number:05d}-of-{len(self.shards):05d}.safetensors"
            os.replace(self.out_dir / temporary, self.out_dir / final)
            weight_map.update({name: final for name in names})
            files.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return files


def _named_container(path: str, module):
    """A module whose named_modules() name `module` (and its children) `path`, as in the full model."""
    import torch

    class LayerContainer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # Calibration batches ({"hidden_states": ..., **kwargs}); each batch's output replaces its input
            # as soon as it is computed, so a layer boundary's hidden states are held once, not twice.
            self.batches: list[dict] = []
            self.seen = 0
            parent = self
            *parents, leaf = path.split(".")
            for part in parents:
                child = torch.nn.ModuleDict()
                parent.add_module(part, child)
                parent = child
            parent.add_module(leaf, module)

        def forward(self, hidden_states, **kwargs):
            output = module(hidden_states, **kwargs)
            output = output[0] if isinstance(output, tuple) else output
            # Float outputs (Quark calibrates with fake quantization off), in batch order: the next layer's inputs.
            self.batches[self.seen]["hidden_states"] = output
            self.seen += 1
            return output

    return LayerContainer()


def _return_freed_memory() -> None:
    """Give the heap pages freed with a layer back to the OS (glibc's malloc_trim). Why: glibc raises its mmap
    threshold after large frees, so the next layer's tensors come from the heap, and freed heap memory stays
    in the process: without this, RSS grew by about two layers' size per layer (measured on a 1B shape)."""
    if (malloc_trim := _malloc_trim()) is not None:
        malloc_trim(0)


@functools.cache
def _libc():
    """The C library, from the libraries this process has loaded, once. Why not ctypes.util.find_library("c"): it
    runs `ldconfig -p` in a subprocess, and did so once a layer: a forked copy of this process that a sample of
    the process tree's RSS could catch and count twice (the 14B fp8 streaming row's peak read 4.0-4.7 GiB in some
    sittings, 3.1-3.3 GiB in the others)."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim; None without it (not glibc)."""
    return getattr(_libc(), "malloc_trim", None)


def _read_module(reader: CheckpointReader, prefix: str) -> dict:
    """The checkpoint's tensors named `prefix.*`."""
    return reader.read(reader.names(prefix + "."))


def _read_module_into_memory(reader: CheckpointReader, prefix: str) -> dict:
    """The checkpoint's tensors named `prefix.*`, their bytes in memory (the read-ahead thread's work)."""
    tensors = _read_module(reader, prefix)
    fault_in(tensors)
    return tensors


MADV_POPULATE_READ = 22  # madvise(2), Linux 5.14+: fault a range in now, reading it from its file


def fault_in(tensors: dict, advice: int = MADV_POPULATE_READ) -> None:
    """Read the pages of tensors that map their file into memory now. Why: safetensors maps the checkpoint, so a
    tensor's bytes come from the disk when first touched: without this, in the calibration forward on the main
    thread, not on the read-ahead thread (14b-4layers, page cache dropped: calibrate 6.5 s warm, 9.7 s cold).
    One madvise per tensor; where the kernel lacks MADV_POPULATE_READ, one byte per page is touched instead."""
    import ctypes
    import mmap

    import torch

    libc = _libc()
    page = mmap.PAGESIZE
    for tensor in tensors.values():
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() == 0:
            continue
        start = tensor.data_ptr() // page * page
        length = tensor.data_ptr() + tensor.numel() * tensor.element_size() - start
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), advice) != 0:
            tensor.view(-1).view(torch.uint8)[::page].sum()


def _materialize(module, prefix: str, reader: CheckpointReader, device: str, model_type: str = "",
                 tensors: dict | None = None) -> None:
    """Load `module`'s weights (named `prefix.*` in the checkpoint) from the shards onto `device`.
    model_type: an MoE checkpoint's per-expert names go to the unfused modules' names (moe.live_name).
    tensors: those weights already read (by the read-ahead thread); None: read them now."""
    from accelerate.utils import set_module_tensor_to_device

    if tensors is None:
        tensors = _read_module(reader, prefix)
    for name, tensor in tensors.items():
        set_module_tensor_to_device(module, moe.live_name(model_type, name)[len(prefix) + 1:], device, value=tensor)
    missing = [name for name, parameter in module.named_parameters() if parameter.device.type == "meta"]
    if missing:
        raise ValueError(f"{reader.model_dir}: no weights for {prefix}.{missing[0]} in the checkpoint")


@contextlib.contextmanager
def _gc_frozen():
    """What exists on entry (the libraries' objects, the skeleton) is never garbage: set aside, so that the full
    collection after each layer walks only what that layer made (on the 14B shape it took 0.27 s a layer before)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _buffers_to(model, device: str) -> None:
    """The computed (non-meta) buffers, e.g. the rotary embedding's inv_freq, onto the quantization device."""
    from accelerate.utils import set_module_tensor_to_device

    for name, buffer in list(model.named_buffers()):
        if buffer.device.type != "meta" and str(buffer.device) != device:
            set_module_tensor_to_device(model, name, device, value=buffer)


class _Captured(Exception):
    def __init__(self, hidden_states, kwargs):
        super().__init__("captured")
        self.hidden_states, self.kwargs = hidden_states, kwargs


def _decoder_layers(model, num_layers: int) -> tuple[str, object]:
    """(name, ModuleList) of the decoder layers: the ModuleList with one entry per hidden layer."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return name, module
    raise ValueError(f"no list of {num_layers} decoder layers in {type(model).__name__}")


def _first_layer_inputs(model, layer_list, batches: list, device: str) -> tuple[list, list]:
    """Hidden states and keyword arguments (rotary embeddings, mask) the model gives decoder layer 0,
    per batch, as in a full forward: the model runs with a stand-in layer 0 that stops it there."""
    import torch

    class Catcher(torch.nn.Module):
        def forward(self, hidden_states, **kwargs):
            raise _Captured(hidden_states, kwargs)

    first, layer_list[0] = layer_list[0], Catcher()
    hidden, arguments = [], []
    try:
        for ids in batches:
            try:
                model.base_model(input_ids=ids.to(device))
            except _Captured as captured:
                kwargs = dict(captured.kwargs)
                # The cache the model made for this call: layers would fill it; nothing reads it back.
                kwargs.update(past_key_values=None, use_cache=False)
                hidden.append(captured.hidden_states)
                arguments.append(kwargs)
    finally:
        layer_list[0] = first
    return hidden, arguments


def _needs_activations(quantizer) -> bool:
    """Whether Quark runs a calibration forward pass for this config (else it observes weights only)."""
    verifier = quantizer.config_verifier
    return not (verifier.is_all_dynamic or verifier.is_weight_only
                or (verifier.is_act_dynamic and not verifier.is_act_contain_scale_per_tensor))


def _exporter_config(quark_config):
    """The JsonExporterConfig export_safetensors builds for this QConfig."""
    from quark.torch.export.config.config import JsonExporterConfig

    kv_cache_group = (getattr(quark_config, "kv_cache_group", [])
                      if getattr(quark_config, "kv_cache_quant_config", {}) else [])
    return JsonExporterConfig(weight_format="real_quantized", pack_method="reorder", kv_cache_group=kv_cache_group,
                              min_kv_scale=getattr(quark_config, "min_kv_scale", 0.0))


def quantization_config_dict(quark_config, model) -> dict:
    """config.json's `quantization_config`, by Quark's own exporter (the in-memory export's code).

    Quark rewrites the config's exclude patterns to the module names they match in the model it
    quantizes (`setup_config_per_layer`); here that runs once on the whole (meta) skeleton, as in memory.
    """
    import copy

    from quark.torch.export.api import QuarkSafetensorsExporter
    from quark.torch.quantization.model_transformation import setup_config_per_layer

    quark_config = copy.deepcopy(quark_config)
    setup_config_per_layer(quark_config, dict(model.named_modules(remove_duplicate=False)), {})
    exporter = QuarkSafetensorsExporter(model=None, output_dir=Path("."), custom_mode="quark",
                                        weight_format="real_quantized", pack_method="reorder")
    return exporter._prepare_quantization_config(quark_config, _exporter_config(quark_config))


class StreamTotals:
    """Seconds per stage summed over the layers, and the frozen quantizers (freeze.json's count)."""

    def __init__(self):
        self.quantize = self.freeze = self.export = 0.0
        self.state_save = 0.0  # writing finished layers and boundary hidden states for a resume
        self.read_wait = 0.0  # waiting for a layer's weights from the read-ahead thread
        self.calibrate = 0.0  # Quark's quantize_model on a layer: calibration forward passes and observers
        self.collect = 0.0  # freeing each finished layer (gc of Quark's reference cycles, malloc_trim)
        self.frozen_quantizers = 0
        self.uncalibrated_experts: list[dict] = []  # MoE experts no calibration token reached (quantize_pipeline/quantize/moe.py)


def exported_tensors(container, quark_config, model_type: str = "") -> tuple[object, dict]:
    """Quark's exporter on a frozen module (ModelPostProcessor, as `export_safetensors` runs it): the processed
    module and its tensors by checkpoint name, as copies that own their storage."""
    from quark.torch.export.main_export.model_post_process import ModelPostProcessor
    from quark.torch.export.utils import _fix_state_dict_key_on_save

    processor = ModelPostProcessor(container, _exporter_config(quark_config), custom_mode="quark",
                                   output_quant=quark_config.global_quant_config.output_tensors is not None,
                                   quantization_config=quark_config)
    processor.merge_scale()
    with fp8_row_blocks.row_blocks():  # Quark's real quantization of the weights: the same bytes, faster
        processed = processor.get_processed_model()
    # Copies of the small ones: kept as Quark made them, the 14B shape's streaming RSS between layers rose from ~1.3
    # to ~4 GiB (measured, issue #26: heap pages pinned among freed temporaries).
    return processed, {moe.checkpoint_name(model_type, _fix_state_dict_key_on_save(name)[0]): _owned(tensor)
                       for name, tensor in processed.state_dict().items()}


def _owned(tensor):
    """`tensor` with storage of its own: itself where it has it and is past glibc's largest mmap threshold (32 MiB:
    its own mapping, returned to the OS when freed: nothing to pin), else a copy. The big ones are the quantized
    weights the row blocks write (fp8_row_blocks.py): not copied, 0.05 s a 14B layer less."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes >= 32 * 2**20 and tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == nbytes:
        return tensor.detach()
    return tensor.detach().clone()


def _quantize_group(path: str, module, quark_config, inputs: list | None, arguments: list | None,
                    times: StreamTotals, model_type: str = "") -> tuple[dict, list | None, list[dict]]:
    """Quantize, freeze and convert one module (named `path` in the full model) with Quark.

    Returns (exported tensors by checkpoint name, its float outputs on `inputs` or None, the MoE experts in it
    that no calibration token reached)."""
    import copy

    import torch
    from quark.torch import ModelQuantizer

    container = _named_container(path, module)
    # A copy per layer: Quark narrows the config's exclude list to the modules of the model it is given.
    quark_config = copy.deepcopy(quark_config)
    quantizer = ModelQuantizer(quark_config)
    # Weights not counted as calibration tokens (a full pass over each); activations counted only for MoE experts.
    use_uncounted_observers(quark_config, activations=not moe.has_experts(module))
    started = time.perf_counter()
    data = None
    if inputs is not None:
        data = [{"hidden_states": hidden, **kwargs} for hidden, kwargs in zip(inputs, arguments)]
        inputs.clear()  # the batches hold the only reference: replaced by the outputs one by one
        container.batches = data
    calibrating = time.perf_counter()
    with torch.no_grad():
        container = quantizer.quantize_model(container, data)
    times.calibrate += time.perf_counter() - calibrating
    outputs = None
    if data is not None:
        if container.seen != len(data):  # one calibration pass, one forward per batch: what the hand-on relies on
            raise RuntimeError(f"{path}: Quark ran {container.seen} forward passes over {len(data)} calibration batches")
        outputs = [batch["hidden_states"] for batch in data]
        container.batches = []
    uncalibrated = moe.fill_uncalibrated_expert_scales(container, model_type)  # as in memory, layer by layer
    times.quantize += time.perf_counter() - started

    started = time.perf_counter()
    container = ModelQuantizer.freeze(container, quantize=weights_fake_quantized_on_freeze(quark_config))
    times.frozen_quantizers += count_frozen(container)
    times.freeze += time.perf_counter() - started

    started = time.perf_counter()
    processed, tensors = exported_tensors(container, quark_config, model_type)
    # The layer's own tensors dropped (moved to the meta device): whatever Quark keeps referring to (its quantizer
    # objects) no longer holds a layer's weights. Measured on a 1B shape: without this, RSS grew by ~170 MiB per layer.
    for done in (processed, container, module):
        done.to("meta")
    times.export += time.perf_counter() - started
    return tensors, outputs, uncalibrated


def stream_quantize(recipe: Recipe, model_dir: Path, token_batches: list[list[int]], out_dirs: dict,
                    device: str = "cpu", mode_reason: str = "quantization.mode: streaming",
                    state_dir: Path | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Quantize a checkpoint folder layer by layer into out_dirs["model"] (same records as quantize_freeze_export).

    out_dirs: {"quantize": ..., "freeze": ..., "model": ...} existing folders. No tokenizer is needed.
    state_dir: where finished layers are kept for a resume after a kill (quantize/stream_state.py); None: not kept. Left in
    place at the end: the caller removes it once it has committed the export.
    """
    import torch

    with torch.no_grad():
        return _stream_quantize(recipe, model_dir, token_batches, out_dirs, device, mode_reason, state_dir,
                                max_shard_bytes)


def _stream_quantize(recipe: Recipe, model_dir: Path, token_batches: list[list[int]], out_dirs: dict,
                     device: str, mode_reason: str, state_dir: Path | None, max_shard_bytes: int) -> dict:
    import torch
    from accelerate import init_empty_weights
    from quark.torch import ModelQuantizer
    from transformers import AutoConfig, AutoModelForCausalLM

    started_all = time.perf_counter()
    times = StreamTotals()
    dtype = getattr(torch, recipe.model.dtype)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=recipe.model.trust_remote_code)
    with init_empty_weights(include_buffers=False):  # buffers (rotary inv_freq) are computed, not loaded
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=recipe.model.trust_remote_code)
    model.eval()
    model_type = config.model_type
    unfused = moe.unfuse_experts(model)  # MoE: per-expert linears on the skeleton too, as in memory
    resolved = resolve_config(recipe, model)
    quark_config = resolved.quark_config
    # Before layers are freed; layer names as the checkpoint says them (quantize_pipeline/quantize/moe.py), as the tensors below.
    quantization_config = moe.checkpoint_quantization_config(model_type, quantization_config_dict(quark_config, model))
    reader = CheckpointReader(model_dir)
    writer = ShardWriter(Path(out_dirs["model"]), max_shard_bytes)
    layers_path, layer_list = _decoder_layers(model, config.num_hidden_layers)
    layer_prefixes = [f"{layers_path}.{index}" for index in range(len(layer_list))]

    tail = [name for name in resolved.linear_names if not name.startswith(layers_path + ".")]
    quantized_tail = [name for name in tail if name not in resolved.excluded]
    tied = bool(getattr(config, "tie_word_embeddings", False)) and "lm_head.weight" not in reader.weight_map
    if quantized_tail and (tied or quantized_tail != ["lm_head"]):
        raise ValueError(f"streaming quantizes decoder layers and an untied lm_head; not {quantized_tail}")

    # Everything else (embeddings, final norm, an excluded lm_head) is copied through unchanged;
    # a tied lm_head has no tensor of its own, as in save_pretrained's output.
    skeleton_names = set(model.state_dict())
    rest = [name for name in reader.weight_map if name in skeleton_names
            and not any(name.startswith(prefix + ".") for prefix in layer_prefixes + quantized_tail)]
    # Copied in the kernel from the start when they fill a shard (the 14B shape's embeddings and lm_head: 2.9 GB,
    # nothing in this process's memory); a smaller rest rides in the last shard, keeping a small model one file.
    rest_sizes = reader.sizes(rest)
    copied_in_kernel = sum(rest_sizes.values()) >= max_shard_bytes
    if copied_in_kernel:
        writer.copy_through(reader, rest_sizes)

    needs_activations = _needs_activations(ModelQuantizer(quark_config))
    passes = forward_batches(token_batches, quark_config)  # as in memory (quantize.py): the same bytes
    batches = [torch.tensor(samples, dtype=torch.long) for samples in passes]
    hidden = arguments = None
    started = time.perf_counter()
    if needs_activations:
        _buffers_to(model, device)
        embedding = model.get_input_embeddings()
        embedding_name = next(name for name, module in model.named_modules() if module is embedding)
        _materialize(embedding, embedding_name, reader, device)
        hidden, arguments = _first_layer_inputs(model, layer_list, batches, device)
        embedding.to("meta")
    times.quantize += time.perf_counter() - started

    state = None
    resumed = 0
    if state_dir is not None:
        sections = {name: recipe.model_dump(mode="json")[name] for name in ("model", "calibration", "quantization")}
        state = LayerState(Path(state_dir), state_key(sections, model_dir, passes, device))
        resumed = state.finished_layers(len(layer_prefixes), needs_hidden=needs_activations)
    if resumed:
        print(f"resuming after layer {resumed}/{len(layer_prefixes)}: its tensors and boundary verified", flush=True)
        for index in range(resumed):
            writer.add(state.load_tensors(index))
            times.frozen_quantizers += state.frozen_quantizers(index)
            times.uncalibrated_experts += state.uncalibrated_experts(index)
            layer_list[index] = torch.nn.Identity()
        if needs_activations:
            hidden = state.load_hidden(resumed - 1, device)

    # The next layer's weights are read on a thread while this one is calibrated and quantized (one layer ahead).
    with _gc_frozen(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-reader") as reading:
        ahead = (reading.submit(_read_module_into_memory, reader, layer_prefixes[resumed])
                 if resumed < len(layer_prefixes) else None)
        for index in range(resumed, len(layer_prefixes)):
            prefix, layer = layer_prefixes[index], layer_list[index]
            started = time.perf_counter()
            layer_tensors = ahead.result()
            times.read_wait += time.perf_counter() - started
            if index + 1 < len(layer_prefixes):
                ahead = reading.submit(_read_module_into_memory, reader, layer_prefixes[index + 1])
            _materialize(layer, prefix, reader, device, model_type, tensors=layer_tensors)
            del layer_tensors
            times.quantize += time.perf_counter() - started  # reading the layer's weights counts as quantize time
            frozen_before = times.frozen_quantizers
            tensors, hidden, uncalibrated = _quantize_group(prefix, layer, quark_config, hidden, arguments, times,
                                                            model_type)
            times.uncalibrated_experts += uncalibrated
            started = time.perf_counter()
            writer.add(tensors)
            times.export += time.perf_counter() - started
            if state is not None:
                started = time.perf_counter()
                state.save(index, tensors, hidden, times.frozen_quantizers - frozen_before, uncalibrated)
                times.state_save += time.perf_counter() - started
            layer_list[index] = torch.nn.Identity()  # frees the layer: the skeleton no longer holds it
            del layer, tensors
            started = time.perf_counter()
            gc.collect()  # Quark's quantized modules hold reference cycles: free them now, not at a later gen-2 pass
            _return_freed_memory()
            times.collect += time.perf_counter() - started
            print(f"layer {index + 1}/{len(layer_prefixes)} quantized, RSS {_rss_mb():.0f} MiB "
                  f"(peak {peak_rss_mb():.0f} MiB)", flush=True)

    if quantized_tail:  # an lm_head that is quantized: calibrated on the final norm's outputs
        norm = model.base_model.norm
        _materialize(norm, f"{model.base_model_prefix}.norm", reader, device)
        normed = [norm(state) for state in hidden] if hidden is not None else None
        _materialize(model.lm_head, "lm_head", reader, device)
        tensors, _, _ = _quantize_group("lm_head", model.lm_head, quark_config, normed,
                                        [{} for _ in normed] if normed is not None else None, times)
        writer.add(tensors)
    started = time.perf_counter()
    if not copied_in_kernel:
        for name in rest:
            writer.add(reader.read([name]))
    files = writer.close()
    config.quantization_config = quantization_config
    config.dtype = dtype
    config.save_pretrained(out_dirs["model"])
    times.export += time.perf_counter() - started

    records: dict[str, StageRecord] = {}
    summary = write_summary(recipe, resolved, len(batches), Path(out_dirs["quantize"]),
                            extra={"mode": "streaming", "mode_reason": mode_reason, "device": device,
                                   "decoder_layers": len(layer_prefixes), "calibrated_activations": needs_activations,
                                   "resumed_after_layer": resumed, "state_save_s": round(times.state_save, 3),
                                   # where a streaming run's time goes (issue #26's profile): summed over the layers
                                   "seconds": {"read_wait": round(times.read_wait, 3),
                                               "calibrate": round(times.calibrate, 3),
                                               "collect": round(times.collect, 3),
                                               "write": round(writer.write_s, 3),
                                               "write_wait": round(writer.wait_s, 3)},
                                   "unfused_expert_modules": unfused,
                                   "experts_without_calibration_tokens": moe.uncalibrated_record(times.uncalibrated_experts)})
    say_uncalibrated(times.uncalibrated_experts)
    records["quantize"] = StageRecord(summary=summary, wall_s=times.quantize, peak_rss_mb=peak_rss_mb())
    frozen = {"frozen_quantizers": times.frozen_quantizers}
    (Path(out_dirs["freeze"]) / "freeze.json").write_text(json.dumps(frozen, indent=2) + "\n")
    records["freeze"] = StageRecord(summary=frozen, wall_s=times.freeze, peak_rss_mb=peak_rss_mb())
    export_summary = finish_export(recipe, model_dir, Path(out_dirs["model"]))
    export_summary["shards"] = files
    records["export"] = StageRecord(summary=export_summary, wall_s=times.export, peak_rss_mb=peak_rss_mb())
    records["quantize"].total_wall_s = time.perf_counter() - started_all
    # The layer state stays: the caller removes it once the export is committed (a kill before the runner renames
    # the staged export into place then resumes from the last layer, not from layer 0).
    return records_to_json(records)
