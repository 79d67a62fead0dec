"""bitsandbytes through transformers: the base model quantized on load (LLM.int8() or NF4).

What the field ran before Quark/vLLM exports: a baseline column in the report, never the
engine of a gated export. The transformers engine with a BitsAndBytesConfig; bitsandbytes
runs on CPU (its torch/CPU backend) as on CUDA, so it is measured here, not assumed.
"""

from __future__ import annotations

from quantize_pipeline.engines.transformers import TransformersEngine


class _BitsAndBytesEngine(TransformersEngine):
    serves = None  # baseline columns only: loads the base model, serves no export

    def _quantization_config(self, dtype):
        raise NotImplementedError

    def _load_model(self, auto_class, model_dir: str, dtype):
        # device_map: bitsandbytes quantizes while loading, onto the device it will run on.
        return auto_class.from_pretrained(model_dir, dtype=dtype, quantization_config=self._quantization_config(dtype),
                                          device_map=self.options.device)


class Int8Engine(_BitsAndBytesEngine):
    name = "bitsandbytes-int8"

    def _quantization_config(self, dtype):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True)


class NF4Engine(_BitsAndBytesEngine):
    name = "bitsandbytes-nf4"

    def _quantization_config(self, dtype):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
