"""Data-free quantization: checkpoint shards in, quantized shards out, no calibration and no forward pass.

For schemes with no static activation scale (weights quantized from themselves, activations at run time),
nothing but the weights decides the export. So each input shard's linear weights are read, quantized by
Quark's own code and written; every other tensor is copied through in the model dtype. Quark's code is its
file-to-file quantizer where that writes what its exporter does (`fast_weight_config`), else its module path
(ModelQuantizer on plain nn.Linear modules holding the weights, freeze, ModelPostProcessor: what
`export_safetensors` runs in memory). The export is byte-identical to the in-memory one (tests/test_data_free.py).

A pipeline of three: a reader thread reads the next group of tensors while the main thread quantizes one
(its weights' row blocks on one thread per core, `_block_workers`) and a writer thread writes the last
finished file. Each input shard is a resume unit: its output files and their sha256 are recorded in the run's
state folder, which the runner removes once the export is committed; after a kill, finished shards are linked
back in, not redone.

The model skeleton is built on the meta device (no weights) only to resolve the recipe's patterns and to let
Quark write `quantization_config` exactly as it does in memory.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import queue
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from quantize_pipeline.formats.quark_config import quark_layer_configs
from quantize_pipeline.formats.safetensors_header import read_header
from quantize_pipeline.quantize import moe
from quantize_pipeline.quantize.export import finish_export
from quantize_pipeline.quantize.freeze import count_frozen, weights_fake_quantized_on_freeze
from quantize_pipeline.quantize.quantize import peak_rss_mb, resolve_config, write_summary
from quantize_pipeline.quantize.stream_state import state_key
from quantize_pipeline.quantize.streaming import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointReader,
    exported_tensors,
    fault_in,
    quantization_config_dict,
)
from quantize_pipeline.quantize.weight_observers import observer_without_token_count, use_uncounted_observers
from quantize_pipeline.recipe.plan import DATA_FREE_GROUP_BYTES, DATA_FREE_PART_BYTES
from quantize_pipeline.recipe.schema import Recipe
from quantize_pipeline.run.rundir import atomic_write_json, read_json, sha256_file
from quantize_pipeline.run.stage_record import StageRecord, records_to_json

# Weights quantized per Quark call: large enough that Quark's per-call set-up is small beside the work,
# small enough that a group, the two read ahead and Quark's copies stay near a GiB. Output files are cut at
# MAX_PART_BYTES (one filling, one queued, one being written). plan.quantize_peaks counts both.
GROUP_BYTES = DATA_FREE_GROUP_BYTES
MAX_PART_BYTES = DATA_FREE_PART_BYTES
STATE_FILE = "data-free.json"
# Elements per Quark file-to-file call within one weight (see _quantize_fast): ~4 MiB of float32, cache-sized.
CHUNK_ELEMENTS = 1 << 20


def static_activation_layer(quark_config) -> str | None:
    """The first layer config of Quark's with a static (calibrated) input or output scale, or None.
    Quark's own `is_all_dynamic` says no for a mix of weight-only and dynamic layers, which need no data either."""
    for name, layer in quark_layer_configs(quark_config):
        for specs in (layer.input_tensors, layer.output_tensors):
            for spec in specs if isinstance(specs, list) else [specs]:
                if spec is not None and not spec.is_dynamic:
                    return name
    return None


def checkpoint_refusal(model_dir: Path, linear_names: list[str]) -> str | None:
    """Why the checkpoint's layout does not suit shard-by-shard quantization (a linear without its own 2-D
    `.weight` tensor, e.g. experts fused in 3-D parameters), or None."""
    reader = CheckpointReader(model_dir)
    for name in linear_names:
        if f"{name}.weight" not in reader.weight_map:
            return f"{name} has no {name}.weight of its own in the checkpoint"
    return None


def _container(modules: dict):
    """One module whose named_modules() name each of `modules` by its key, as in the full model."""
    import torch

    root = torch.nn.Module()
    for path, module in modules.items():
        parent = root
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, module)
    return root


def _weights_only(quark_config):
    """The config with its (dynamic: checked before) activation specs dropped: they store nothing in the export,
    and Quark asks for calibration data whenever weight-only and dynamic layers are mixed. In place."""
    for _, layer in quark_layer_configs(quark_config):
        layer.input_tensors = layer.output_tensors = None
    return quark_config


def fast_weight_config(quark_config, live_name: str):
    """The layer's weight config where Quark's file-to-file quantizer (`_single_stage_quantize_weight`, ~10x
    faster than the module path) writes the bytes its in-memory exporter does, else None. Compared tensor by
    tensor here: equal for per-channel FP8 and the OCP MX block formats; symmetric per-channel INT8 lacks only
    the all-zero zero point the exporter adds; INT4/UINT4 per group differ (packing order, scale layout, zero
    points): those take the module path. tests/test_data_free.py holds every family to the in-memory bytes."""
    from fnmatch import fnmatch

    if quark_config.layer_type_quant_config:
        return None
    layer = next((config for pattern, config in quark_config.layer_quant_config.items() if fnmatch(live_name, pattern)),
                 quark_config.global_quant_config)
    weight = layer.weight
    if weight is None or isinstance(weight, list) or layer.bias is not None:
        return None
    dtype, qscheme = weight.dtype.value, weight.qscheme.value
    if (weight.scale_format == "e8m0" and qscheme == "per_group") or (dtype == "fp8_e4m3" and qscheme == "per_channel"):
        return weight
    if dtype == "int8" and qscheme == "per_channel" and weight.symmetric:
        return weight
    return None


def _rows_independent(spec, weight) -> bool:
    """Whether each row of the weight is quantized from itself alone (per-channel over output rows, or groups
    along the input dimension): then Quark may take the rows in blocks and give the same bytes."""
    if weight.dim() != 2:
        return False
    axis, qscheme = spec.ch_axis, spec.qscheme.value
    return (qscheme == "per_channel" and axis == 0) or (qscheme == "per_group" and axis in (1, -1))


def _quantize_fast(live_name: str, weight, spec, model_type: str, dtype, chunk_elements: int = CHUNK_ELEMENTS,
                   workers: ThreadPoolExecutor | None = None) -> dict:
    """One linear by Quark's file-to-file quantizer, plus what its in-memory exporter adds (INT8's zero point).
    Rows go through in blocks of about chunk_elements where the scheme allows (`_rows_independent`): Quark's
    kernel makes several float32/int32 passes over what it is given, and a block that fits the CPU's cache
    takes them ~2.8x faster than a whole 70M-element weight (measured on a 14B MLP weight, AVX2 EPYC);
    the bytes are the same (tests/test_data_free_blocks.py). `workers`: blocks quantized in parallel."""
    import torch
    from quark.torch.quantization.file2file_quantization import _single_stage_quantize_weight

    weight = weight.to(dtype)
    spec = copy.copy(spec)
    spec.observer_cls = observer_without_token_count(spec.observer_cls)
    rows = max(1, chunk_elements // max(1, weight.shape[-1])) if _rows_independent(spec, weight) else weight.shape[0]

    def quantize_block(block) -> dict:
        out: dict = {}
        _single_stage_quantize_weight(block, f"{live_name}.weight", live_name, spec, out, "")
        return out

    blocks = list((workers.map if workers is not None else map)(quantize_block, weight.split(rows)))
    out = blocks[0] if len(blocks) == 1 else {name: torch.cat([block[name] for block in blocks]) for name in blocks[0]}
    del blocks
    scale = f"{live_name}.weight_scale"
    if spec.scale_format != "e8m0" and spec.scale_type.value == "float":  # the exporter keeps the model dtype
        out[scale] = out[scale].to(dtype)
    if spec.dtype.value == "int8":
        out[f"{live_name}.weight_zero_point"] = torch.zeros_like(out[f"{live_name}.weight_scale"], dtype=torch.int8)
    return {moe.checkpoint_name(model_type, name): tensor.contiguous() for name, tensor in out.items()}


@contextlib.contextmanager
def _block_workers():
    """One Python thread per core, each running torch on one thread, for the fast path's row blocks. torch's
    own threads wait for each other at every operation: with the reader and writer threads also on the cores,
    those waits made the quantizing ~3x slower (a 40-weight shard with a reader alongside, 2-core AVX2 EPYC:
    20.9 s on torch's two threads, 8.2 s on two Python threads of one torch thread each; 6.3 and 5.3 s alone)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="data-free-block") as workers:
            yield workers
    finally:
        torch.set_num_threads(threads)


def _quantize_linears(weights: dict, quark_config, model_type: str, dtype) -> tuple[dict, int]:
    """{live module name: (weight, bias or None)} -> (exported tensors by checkpoint name, frozen quantizers)."""
    tensors: dict = {}
    slow = {}
    fast = {}
    for name, (weight, bias) in weights.items():
        spec = fast_weight_config(quark_config, name) if bias is None else None
        if spec is None:
            slow[name] = (weight, bias)
        else:
            fast[name] = (weight, spec)
    if fast:
        with _block_workers() as workers:
            for name, (weight, spec) in fast.items():
                tensors |= _quantize_fast(name, weight, spec, model_type, dtype, workers=workers)
    frozen = len(fast)  # one weight quantizer each (the module path freezes the same)
    if slow:
        module_tensors, module_frozen = _quantize_modules(slow, quark_config, model_type, dtype)
        tensors |= module_tensors
        frozen += module_frozen
    return tensors, frozen


def _quantize_modules(weights: dict, quark_config, model_type: str, dtype) -> tuple[dict, int]:
    """Quark's module path: ModelQuantizer, freeze, ModelPostProcessor on plain nn.Linear modules."""
    import torch
    from quark.torch import ModelQuantizer

    modules = {}
    for name, (weight, bias) in weights.items():
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=dtype)
        linear.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
        if bias is not None:
            linear.bias = torch.nn.Parameter(bias.to(dtype), requires_grad=False)
        modules[name] = linear
    container = _container(modules)
    quark_config = copy.deepcopy(quark_config)  # Quark narrows the exclude list to the modules it is given
    quantizer = ModelQuantizer(_weights_only(quark_config))
    use_uncounted_observers(quark_config)
    container = quantizer.quantize_model(container, None)
    container = ModelQuantizer.freeze(container, quantize=weights_fake_quantized_on_freeze(quark_config))
    frozen = count_frozen(container)
    _, tensors = exported_tensors(container, quark_config, model_type)
    return tensors, frozen


class ShardPlan:
    """What one input shard holds: groups of quantized linears (checkpoint names) and the tensors copied through."""

    def __init__(self, file_name: str, groups: list[list[str]], copied: list[list[str]]):
        self.file_name, self.groups, self.copied = file_name, groups, copied  # copied: tensor names in chunks


def shard_plans(reader: CheckpointReader, quantized: set[str]) -> list[ShardPlan]:
    """Per input file (in file-name order): linears in groups of about GROUP_BYTES, the rest copied."""
    by_file: dict[str, list[str]] = {}
    for name, file_name in reader.weight_map.items():
        by_file.setdefault(file_name, []).append(name)
    plans = []
    for file_name in sorted(by_file):
        header = read_header(reader.model_dir / file_name)
        names = sorted(by_file[file_name])
        linears = [name.removesuffix(".weight") for name in names
                   if name.endswith(".weight") and name.removesuffix(".weight") in quantized]
        owned = {f"{linear}.{part}" for linear in linears for part in ("weight", "bias")}
        plans.append(ShardPlan(file_name, _chunks(linears, lambda linear: _nbytes(header[f"{linear}.weight"])),
                               _chunks([name for name in names if name not in owned],
                                       lambda name: _nbytes(header[name]))))
    return plans


def _nbytes(info: dict) -> int:
    return info["data_offsets"][1] - info["data_offsets"][0]


def _chunks(items: list[str], size_of) -> list[list[str]]:
    """Consecutive items in lists of about GROUP_BYTES (one larger item alone): what is read and held at once."""
    chunks, chunk, size = [], [], 0
    for item in items:
        nbytes = size_of(item)
        if chunk and size + nbytes > GROUP_BYTES:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(item)
        size += nbytes
    if chunk:
        chunks.append(chunk)
    return chunks


class ShardState:
    """Finished input shards (their output files and sha256) in the run's state folder, keyed by the recipe."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.path = folder, folder / STATE_FILE
        folder.mkdir(parents=True, exist_ok=True)
        saved = read_json(self.path) if self.path.is_file() else {}
        self.record = saved if saved.get("key") == key else {"key": key, "shards": {}}

    def finished(self, file_name: str) -> list[str] | None:
        """The shard's output files if every one is there and verifies, else None (redo it)."""
        parts = self.record["shards"].get(file_name)
        if parts is None:
            return None
        for part in parts:
            path = self.folder / part["file"]
            if not path.is_file() or sha256_file(path) != part["sha256"]:
                return None
        return [part["file"] for part in parts]

    def done(self, file_name: str, parts: list[str]) -> None:
        self.record["shards"][file_name] = [{"file": part, "sha256": sha256_file(self.folder / part)} for part in parts]
        atomic_write_json(self.path, self.record)


def _shard_done(state: ShardState, plan: ShardPlan, parts: list[str]) -> None:
    """The writer wrote the shard's last file: record it for a resume, then say so."""
    state.done(plan.file_name, parts)
    print(f"shard {plan.file_name} quantized and written ({len(plan.groups)} groups of linears), "
          f"peak RSS {peak_rss_mb():.0f} MiB", flush=True)


def _link(source: Path, target: Path) -> None:
    """The state folder keeps its files until the export is committed: a hard link costs no copy."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or no hard links: a copy
        shutil.copyfile(source, target)


class _Writer(threading.Thread):
    """Writes finished output files (safetensors) behind the quantization, one at a time."""

    def __init__(self):
        super().__init__(daemon=True)
        self.jobs: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.seconds = 0.0

    def run(self) -> None:
        from safetensors.torch import save_file

        while (job := self.jobs.get()) is not None:
            tensors, path, finished = job
            if self.error is None:
                try:
                    started = time.perf_counter()
                    temporary = path.with_name(path.name + ".tmp")
                    save_file(tensors, str(temporary), metadata={"format": "pt"})
                    os.replace(temporary, path)
                    self.seconds += time.perf_counter() - started
                    if finished is not None:
                        finished()
                except BaseException as error:  # reported by the main thread
                    self.error = error
            del tensors

    def put(self, tensors: dict, path: Path, finished=None) -> None:
        if self.error is not None:
            raise self.error
        self.jobs.put((tensors, path, finished))

    def close(self) -> None:
        self.jobs.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def _read_ahead(reader: CheckpointReader, jobs: list[tuple[str, list[str]]], out: queue.Queue) -> None:
    """Reads each job's tensors in order into `out`: one waiting there and one being read, two groups ahead of the
    quantizer. Their pages are read here (fault_in), not on first touch by the quantizing threads, so what waits
    in `out` is in memory (plan counts the two)."""
    try:
        for kind, names in jobs:
            tensors = reader.read(names)
            fault_in(tensors)
            out.put((kind, names, tensors))
    except BaseException as error:
        out.put(("error", [], error))


def data_free_quantize(recipe: Recipe, model_dir: Path, out_dirs: dict, device: str = "cpu",
                       mode_reason: str = "quantization.mode: data_free", state_dir: Path | None = None) -> dict:
    """Quantize a checkpoint folder shard by shard into out_dirs["model"] (the records quantize_freeze_export
    returns). state_dir: where finished shards are kept for a resume; left in place (the caller removes it)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    started_all = time.perf_counter()
    dtype = getattr(torch, recipe.model.dtype)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=recipe.model.trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=recipe.model.trust_remote_code)
    model_type = config.model_type
    unfused = moe.unfuse_experts(model)
    resolved = resolve_config(recipe, model)
    if (static := static_activation_layer(resolved.quark_config)) is not None:  # recipe.data_free_refusal missed it
        raise ValueError(f"data_free: Quark's config has a static activation scale ({static}); use streaming or in_memory")
    quantization_config = moe.checkpoint_quantization_config(
        model_type, quantization_config_dict(resolved.quark_config, model))
    del model
    excluded = set(resolved.excluded)
    live_by_checkpoint = {resolved.checkpoint_name(name): name for name in resolved.linear_names if name not in excluded}
    reader = CheckpointReader(model_dir)
    if (problem := checkpoint_refusal(model_dir, list(live_by_checkpoint))) is not None:
        raise ValueError(f"data_free: {problem}; use streaming or in_memory")
    plans = shard_plans(reader, set(live_by_checkpoint))

    # Without a state folder (no resume asked) the files are made beside the export and moved in.
    work_dir = Path(state_dir) if state_dir is not None else Path(tempfile.mkdtemp(
        prefix=".data-free.", suffix=".tmp", dir=Path(out_dirs["model"]).parent))
    sections = {name: recipe.model_dump(mode="json")[name] for name in ("model", "quantization")}
    state = ShardState(work_dir, state_key(sections, model_dir, [], device))
    quantize_s = read_wait_s = 0.0
    frozen = resumed = 0
    parts: list[str] = []  # output files in order
    jobs: list[tuple[str, list[str]]] = []
    pending: list[ShardPlan] = []
    for plan in plans:
        finished = state.finished(plan.file_name)
        if finished is not None:
            parts.extend(finished)
            resumed += 1
            continue
        pending.append(plan)
        jobs.extend(("group", [name for linear in group for name in (f"{linear}.weight", f"{linear}.bias")
                               if name in reader.weight_map]) for group in plan.groups)
        jobs.extend(("copy", chunk) for chunk in plan.copied)
    if resumed:
        print(f"resuming: {resumed}/{len(plans)} input shards finished and verified", flush=True)
    tensors_queue: queue.Queue = queue.Queue(maxsize=1)  # see _read_ahead
    reader_thread = threading.Thread(target=_read_ahead, args=(reader, jobs, tensors_queue), daemon=True)
    reader_thread.start()
    writer = _Writer()
    writer.start()
    try:
        for plan in pending:
            shard_parts: list[str] = []
            output: dict = {}
            output_bytes = 0

            def flush(last: bool) -> None:
                nonlocal output, output_bytes
                if not output:
                    return
                part = f"part-{plan.file_name.removesuffix('.safetensors')}-{len(shard_parts):03d}.safetensors"
                shard_parts.append(part)
                done = (lambda plan=plan, names=list(shard_parts): _shard_done(state, plan, names)) if last else None
                writer.put(output, work_dir / part, done)
                output, output_bytes = {}, 0

            for _ in range(len(plan.groups) + len(plan.copied)):
                started = time.perf_counter()
                kind, names, tensors = tensors_queue.get()
                read_wait_s += time.perf_counter() - started
                if kind == "error":
                    raise tensors
                started = time.perf_counter()
                if kind == "group":
                    linears = sorted({name.rsplit(".", 1)[0] for name in names})
                    weights = {live_by_checkpoint[linear]: (tensors[f"{linear}.weight"], tensors.get(f"{linear}.bias"))
                               for linear in linears}
                    quantized, count = _quantize_linears(weights, resolved.quark_config, model_type, dtype)
                    frozen += count
                else:
                    quantized = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor
                                 for name, tensor in tensors.items()}
                del tensors
                quantize_s += time.perf_counter() - started
                for name, tensor in sorted(quantized.items()):
                    size = tensor.numel() * tensor.element_size()
                    if output and output_bytes + size > MAX_PART_BYTES:
                        flush(last=False)
                    output[name] = tensor
                    output_bytes += size
            if not output and not shard_parts:  # a shard with nothing to write (cannot happen for a real checkpoint)
                state.done(plan.file_name, [])
            flush(last=True)
            parts.extend(shard_parts)
    finally:
        writer.close()
        reader_thread.join(timeout=5)  # blocked on a full queue only when the quantizer failed: not waited for

    started = time.perf_counter()
    model_out = Path(out_dirs["model"])
    files = _place(parts, work_dir, model_out)
    if state_dir is None:
        shutil.rmtree(work_dir)
    config.quantization_config = quantization_config
    config.dtype = dtype
    config.save_pretrained(model_out)
    place_s = time.perf_counter() - started

    records: dict[str, StageRecord] = {}
    summary = write_summary(recipe, resolved, 0, Path(out_dirs["quantize"]),
                            extra={"mode": "data_free", "mode_reason": mode_reason, "device": device,
                                   "input_shards": len(plans), "resumed_input_shards": resumed,
                                   "calibrated_activations": False, "unfused_expert_modules": unfused,
                                   "read_wait_s": round(read_wait_s, 3), "write_s": round(writer.seconds, 3),
                                   "experts_without_calibration_tokens": moe.uncalibrated_record([])})
    records["quantize"] = StageRecord(summary=summary, wall_s=quantize_s, peak_rss_mb=peak_rss_mb())
    frozen_summary = {"frozen_quantizers": frozen}
    (Path(out_dirs["freeze"]) / "freeze.json").write_text(json.dumps(frozen_summary, indent=2) + "\n")
    records["freeze"] = StageRecord(summary=frozen_summary, wall_s=0.0, peak_rss_mb=peak_rss_mb())
    export_summary = finish_export(recipe, model_dir, model_out)
    export_summary["shards"] = files
    records["export"] = StageRecord(summary=export_summary, wall_s=writer.seconds + place_s, peak_rss_mb=peak_rss_mb())
    records["quantize"].total_wall_s = time.perf_counter() - started_all
    return records_to_json(records)


def _place(parts: list[str], work_dir: Path, model_out: Path) -> list[str]:
    """The output files under save_pretrained's names (model.safetensors, or numbered with the index)."""
    if len(parts) == 1:
        _link(work_dir / parts[0], model_out / SINGLE_FILE)
        return [SINGLE_FILE]
    weight_map, files, total = {}, [], 0
    for number, part in enumerate(parts, start=1):
        final = f"model-{number:05d}-of-{len(parts):05d}.safetensors"
        _link(work_dir / part, model_out / final)
        header = read_header(model_out / final)
        for name, info in header.items():
            if name != "__metadata__":
                weight_map[name] = final
                total += info["data_offsets"][1] - info["data_offsets"][0]
        files.append(final)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (model_out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files
