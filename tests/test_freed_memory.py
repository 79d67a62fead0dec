"""Streaming returns freed heap pages after each layer without starting a process (issue #26: ctypes.util's
find_library ran `ldconfig -p` once a layer, a forked copy of the run that RSS samples of its tree counted twice)."""

from __future__ import annotations

import subprocess

import pytest

from quantize_pipeline.quantize import streaming


def test_returning_freed_memory_starts_no_process(monkeypatch):
    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started: {args[1:2]}")

    streaming._libc.cache_clear()
    streaming._malloc_trim.cache_clear()
    monkeypatch.setattr(subprocess.Popen, "__init__", no_process)
    streaming._return_freed_memory()
    streaming._return_freed_memory()
    streaming.fault_in({})


def test_glibc_malloc_trim_is_found():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    streaming._malloc_trim.cache_clear()
    assert streaming._malloc_trim() is not None
