"""The transformers engine: Quark exports load through Quark's emulation; any scheme, slow.
Runs on the recipe's `resources.device` as resolved here (cpu, or cuda on GPU machines)."""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from quantize_pipeline.engines.base import Generation
from quantize_pipeline.engines.settings import EngineOptions
from quantize_pipeline.engines.transformers_serves import TRANSFORMERS_SERVES
from quantize_pipeline.formats.quark_config import quark_stages
from quantize_pipeline.quantize.moe import IMPORT_RENAMES, is_moe_config, live_quantization_config

LM_EVAL_BATCH_SIZE = 8


class TransformersEngine:
    name = "transformers"
    serves = TRANSFORMERS_SERVES  # any Quark export, through Quark's emulation (engines/transformers_serves.py)

    def __init__(self, model_dir: str, options: EngineOptions):
        started = time.perf_counter()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.import_s = time.perf_counter() - started
        started = time.perf_counter()
        self.options = options
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = self._load_model(AutoModelForCausalLM, model_dir, getattr(torch, options.dtype)).eval()
        self.load_s = time.perf_counter() - started
        self._lm = None

    def _load_model(self, auto_class, model_dir: str, dtype):
        if needs_quark_importer(model_dir):
            from quark.torch import import_model_from_safetensors
            from quark.torch.utils.llm.model_preparation import create_model_skeleton

            skeleton = create_model_skeleton(model_dir=model_dir)
            model_type = skeleton.config.model_type
            if model_type not in IMPORT_RENAMES:
                return import_model_from_safetensors(skeleton, model_dir).to(self.options.device).to(dtype)
            # An export named as the checkpoint (quantize_pipeline/quantize/moe.py): Quark's importer maps the tensor names back
            # through the model's conversion mapping, and reads a config whose layer names are the modules'.
            skeleton._checkpoint_conversion_mapping = IMPORT_RENAMES[model_type]
            with tempfile.TemporaryDirectory(prefix="qp-import-") as view:
                for path in Path(model_dir).iterdir():
                    (Path(view) / path.name).symlink_to(path.resolve())
                config = json.loads((Path(model_dir) / "config.json").read_text())
                config["quantization_config"] = live_quantization_config(model_type, config["quantization_config"])
                (Path(view) / "config.json").unlink()
                (Path(view) / "config.json").write_text(json.dumps(config))
                model = import_model_from_safetensors(skeleton, view)
            return model.to(self.options.device).to(dtype)
        return auto_class.from_pretrained(model_dir, dtype=dtype).to(self.options.device)


    def generate(self, prompts: list[str], max_new_tokens: int) -> list[Generation]:
        import torch

        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"  # batched greedy generation of prompts of different lengths
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        batch = tokenizer(prompts, return_tensors="pt", padding=True).to(self.options.device)
        with torch.no_grad():
            output = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)
        results = []
        for row in output[:, batch["input_ids"].shape[1]:]:
            tokens = [token for token in row.tolist() if token != tokenizer.pad_token_id]
            results.append(Generation(tokenizer.decode(tokens, skip_special_tokens=True), len(tokens)))
        return results

    def lm_eval_model(self):
        if self._lm is None:
            from lm_eval.models.huggingface import HFLM

            self._lm = HFLM(pretrained=self.model, tokenizer=self.tokenizer, device=self.options.device,
                            batch_size=LM_EVAL_BATCH_SIZE, max_length=self.options.max_model_len)
        return self._lm

    def top_logprobs(self, token_ids: list[list[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        top_ids, top_logprobs = [], []
        for ids in token_ids:
            with torch.no_grad():
                logits = self.model(torch.tensor([ids], device=self.model.device)).logits[0, :-1]
            top = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
            top_ids.append(top.indices.cpu().numpy())
            top_logprobs.append(top.values.cpu().numpy())
        return np.concatenate(top_ids).astype(np.int64), np.concatenate(top_logprobs).astype(np.float32)

    def completion_perplexities(self, pairs: list[list[str]]) -> list[float]:
        import torch

        perplexities = []
        for prompt, completion in pairs:
            start = len(self.tokenizer(prompt)["input_ids"])
            ids = self.tokenizer(prompt + completion, return_tensors="pt")["input_ids"].to(self.model.device)
            if ids.shape[1] <= start:
                perplexities.append(float("inf"))
                continue
            with torch.no_grad():
                logprobs = torch.log_softmax(self.model(ids).logits[0, :-1].float(), dim=-1)
            targets = ids[0, 1:]
            token_logprobs = logprobs[torch.arange(len(targets), device=ids.device), targets][start - 1:]
            perplexities.append(math.exp(-token_logprobs.mean().item()))
        return perplexities

    def device_memory_used_mb(self) -> float | None:
        if self.options.device == "cpu":
            return None
        import torch

        return torch.cuda.max_memory_allocated(self.options.device) / 2**20


def needs_quark_importer(model_dir: str) -> bool:
    """A Quark export transformers' own Quark loader cannot run, loaded by Quark's importer instead:
    - scales that are themselves quantized (NVFP4: `weight_scale_2`, `input_scale_2`): transformers maps only one
      scale per tensor (quantizer_quark.CHECKPOINT_KEYS), so such a model loads with NaN outputs (measured);
    - MoE models: transformers fuses the per-expert tensors back into 3-D parameters, packed INT4 codes too, and its
      grouped matmul refuses integers (measured on the synthetic Qwen3-MoE, int4_fp8 experts); Quark's importer
      unfuses the experts into one quantized linear each, as the quantize stage did (quantize_pipeline/quantize/moe.py)."""
    config_path = Path(model_dir) / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "quark":
        return False
    if is_moe_config(config):
        return True
    layer_configs = [quantization.get("global_quant_config") or {}, *(quantization.get("layer_quant_config") or {}).values()]
    return any(quark_stages((config or {}).get(tensor))[1] is not None
               for config in layer_configs for tensor in ("weight", "input_tensors"))
