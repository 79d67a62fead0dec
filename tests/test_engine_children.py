"""EngineChildren (quantize_pipeline/evaluate/evaluate.py): each model's engine child starts once per run when
both fit beside each other (the gate's rounds alternate between the export and the base), and one at a time
when not. Real child processes (run/worker.Session) with a stand-in job: vLLM's start is tested end to end."""

from __future__ import annotations

import dataclasses

import pytest

from quantize_pipeline.engines import memory
from quantize_pipeline.engines.settings import EngineOptions
from quantize_pipeline.evaluate.evaluate import EngineChildren

OPTIONS = EngineOptions(engine="vllm", dtype="bfloat16", max_model_len=2048, enforce_eager=True, tensor_parallel_size=1,
                        pipeline_parallel_size=1, distributed_executor_backend=None, data_parallel_size=1, device="cpu",
                        kv_cache_dtype=None, int4_weights_without_zero_points=False, offline=True)


def _model(tmp_path, name: str, size: int = 1000):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * size)
    return folder


def _alternate(tmp_path, options: EngineOptions, keep_both: bool = True, children_out: list | None = None,
               **job) -> tuple[list[int], list[dict]]:
    """export, base, base, export, export, base (the cold order of serve, the base's figures and two more rounds):
    the child pid of each call, and the engine starts. job: the stand-in's sleep_fails / wake_fails."""
    models = {"quantized": _model(tmp_path, "export"), "base": _model(tmp_path, "base")}
    pids = []
    with EngineChildren(tmp_path / "logs", None, keep_both=keep_both,
                        jobs_module="tests.worker_targets") as children:
        for value, role in enumerate(["quantized", "base", "base", "quantized", "quantized", "base"]):
            result, _ = children.call(role, "engine_job", {"model_dir": str(models[role]),
                                                           "engine_options": options.to_json(), "value": value, **job},
                                      log_name=f"{role}.log", stage="evaluate")
            pids.append(result["pid"])
        if children_out is not None:
            children_out.append(children)
        return pids, children.starts


def test_on_the_cpu_each_model_starts_once_when_both_fit(tmp_path):
    pids, starts = _alternate(tmp_path, OPTIONS)
    assert len(set(pids)) == 2 and pids[0] == pids[3] == pids[4] and pids[1] == pids[2] == pids[5]
    assert [start["role"] for start in starts] == [str(tmp_path / "export"), str(tmp_path / "base")]


def test_when_the_second_model_does_not_fit_the_first_child_is_closed_and_starts_again(tmp_path, monkeypatch):
    # More memory than any host has free: the export's child closes before the base's starts, each time.
    monkeypatch.setattr(memory, "ENGINE_PROCESS_BYTES", 2**62)
    pids, starts = _alternate(tmp_path, OPTIONS)
    assert pids[1] == pids[2] and pids[3] == pids[4] and len(set(pids)) == 4
    assert len(starts) == 4


def test_with_one_round_planned_the_first_child_is_closed_when_the_second_starts(tmp_path):
    # keep_both=False: the gate plans one round, so the export's child is not called after the base's.
    pids, starts = _alternate(tmp_path, OPTIONS, keep_both=False)
    assert len(set(pids)) == 4 and len(starts) == 4


def test_keep_both_follows_the_gates_round_schedule(tmp_path):
    from quantize_pipeline.evaluate.evaluate import _round_schedule
    from quantize_pipeline.recipe.schema import load_recipe
    from tests.ci_recipes import ci_sized
    from tests.conftest import DEFAULT_RECIPE

    assert len(_round_schedule(load_recipe(DEFAULT_RECIPE))) == 3  # 200, 500, then ARC-Easy's 570
    one_look = tmp_path / "one-look.yaml"
    one_look.write_text(ci_sized(DEFAULT_RECIPE.read_text()))  # the tests' recipes: max_limit = limit
    assert len(_round_schedule(load_recipe(one_look))) == 1


def test_on_an_accelerator_each_model_starts_once_the_other_sleeping(tmp_path, monkeypatch):
    """The stand-in engine fails if two are awake on the accelerator at once: each call finds the other asleep."""
    monkeypatch.setenv("QP_TEST_AWAKE_DIR", str(tmp_path))
    held: list = []
    pids, starts = _alternate(tmp_path, dataclasses.replace(OPTIONS, device="cuda"), children_out=held)
    assert len(set(pids)) == 2 and pids[0] == pids[3] == pids[4] and pids[1] == pids[2] == pids[5]
    assert len(starts) == 2 and all(start["sleep_mode"] for start in starts)  # built to sleep (may_sleep)
    # the export sleeps for the base's first call, the base for the export's, the export again for the base's
    assert [entry["role"] for entry in held[0].sleeps] == ["quantized", "base", "quantized"]


def test_on_an_accelerator_a_child_that_cannot_sleep_is_closed(tmp_path, monkeypatch):
    monkeypatch.setenv("QP_TEST_AWAKE_DIR", str(tmp_path))
    pids, starts = _alternate(tmp_path, dataclasses.replace(OPTIONS, device="cuda"), sleep_fails=True)
    assert len(set(pids)) == 4 and len(starts) == 4  # every switch: the other closed, as without sleep mode


def test_on_an_accelerator_a_child_that_fails_to_wake_is_started_again(tmp_path, monkeypatch):
    monkeypatch.setenv("QP_TEST_AWAKE_DIR", str(tmp_path))
    pids, starts = _alternate(tmp_path, dataclasses.replace(OPTIONS, device="cuda"), wake_fails=True)
    # calls 4 and 6 find their model's child asleep; its wake fails, so a fresh child takes the call
    assert pids[1] == pids[2] and pids[3] == pids[4] and len(set(pids)) == 4 and len(starts) == 4


def test_on_an_accelerator_a_start_that_fails_beside_a_sleeping_engine_is_retried_alone(tmp_path, monkeypatch):
    """What a sleeping vLLM keeps on the device (CUDA context, graphs) can leave too little for the other model's
    start: the sleeping child is closed and the start retried, as without sleep mode."""
    monkeypatch.setenv("QP_TEST_AWAKE_DIR", str(tmp_path))
    held: list = []
    pids, starts = _alternate(tmp_path, dataclasses.replace(OPTIONS, device="cuda"), children_out=held,
                              start_fails_beside_a_sleeper=True)
    # the base's first start fails beside the sleeping export and runs alone; so does the export's second start
    assert pids[1] == pids[2] and pids[3] == pids[4] and len(set(pids)) == 4 and len(starts) == 4
    assert [entry["role"] for entry in held[0].sleeps] == ["quantized", "base", "quantized"]


def test_on_an_accelerator_without_host_memory_for_the_sleeping_weights_one_child_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setenv("QP_TEST_AWAKE_DIR", str(tmp_path))
    monkeypatch.setattr(memory, "HEADROOM_BYTES", 2**62)
    pids, starts = _alternate(tmp_path, dataclasses.replace(OPTIONS, device="cuda"))
    assert len(set(pids)) == 4 and len(starts) == 4


def test_on_an_accelerator_with_one_round_planned_nothing_sleeps(tmp_path, monkeypatch):
    monkeypatch.setenv("QP_TEST_AWAKE_DIR", str(tmp_path))
    held: list = []
    pids, starts = _alternate(tmp_path, dataclasses.replace(OPTIONS, device="cuda"), keep_both=False,
                              children_out=held)
    assert len(set(pids)) == 4 and not any(start["sleep_mode"] for start in starts) and held[0].sleeps == []


@pytest.mark.parametrize("dtype, factor", [("bfloat16", 1), ("float32", 2)])
def test_an_engine_childs_memory_counts_its_weights_kv_cache_and_process(tmp_path, monkeypatch, dtype, factor):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    model = _model(tmp_path, "m", size=5 * 2**20)
    need = memory.engine_child_bytes(model, dataclasses.replace(OPTIONS, dtype=dtype))
    assert need == factor * 5 * 2**20 + 3 * 2**30 + memory.ENGINE_PROCESS_BYTES
