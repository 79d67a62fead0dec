"""The engines' one vocabulary: what loads a model in a child (`EngineName`) and what serves on a machine
kind (`Build`, the compatibility table's columns). Code outside engines/ compares against these members,
never against a spelled-out name."""

from __future__ import annotations

from enum import StrEnum


class EngineName(StrEnum):
    """What loads a model: a run's engine, a baseline column's, or none (a run refused before serving)."""

    VLLM = "vllm"
    TRANSFORMERS = "transformers"
    BITSANDBYTES_INT8 = "bitsandbytes-int8"  # baseline columns only: the base model quantized on load
    BITSANDBYTES_NF4 = "bitsandbytes-nf4"
    NONE = "none"


class Build(StrEnum):
    """What serves a scheme on a machine kind: a vLLM build, or transformers (Quark's emulation)."""

    VLLM_CUDA = "vllm-cuda"
    VLLM_ROCM = "vllm-rocm"
    VLLM_CPU = "vllm-cpu"
    TRANSFORMERS = "transformers"
