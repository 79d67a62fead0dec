"""Engine options: built from the recipe, typed, and passed to vLLM / lm-eval unchanged (no GPU needed)."""

from __future__ import annotations

import dataclasses

import pytest

from quantize_pipeline import engines
from quantize_pipeline.engines import settings as engine
from quantize_pipeline.engines.settings import EngineOptions
from quantize_pipeline.recipe.schema import Recipe
from tests.conftest import DEFAULT_RECIPE


def _recipe(**evaluation) -> Recipe:
    import yaml

    data = yaml.safe_load(DEFAULT_RECIPE.read_text())
    data["evaluation"] = {**data.get("evaluation", {}), **evaluation}
    return Recipe.model_validate(data)


MULTI_GPU = dict(tensor_parallel_size=4, pipeline_parallel_size=2, distributed_executor_backend="ray")


def test_multi_gpu_settings_reach_vllm_llm_kwargs_unchanged():
    options = engine.engine_options(_recipe(**MULTI_GPU), quantized=True)
    kwargs = engine.llm_kwargs("/models/x", options)
    assert kwargs["tensor_parallel_size"] == 4
    assert kwargs["pipeline_parallel_size"] == 2
    assert kwargs["distributed_executor_backend"] == "ray"
    assert "data_parallel_size" not in kwargs  # lm-eval's setting: it starts the replicas, not vllm.LLM


def _lm_eval_vllm_init_arguments():
    """VLLM.__init__'s arguments, read from lm-eval's source (importing it imports vLLM: seconds)."""
    import ast
    import importlib.util

    source = importlib.util.find_spec("lm_eval.models.vllm_causallms").origin
    tree = ast.parse(open(source, encoding="utf-8").read())
    vllm_class = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "VLLM")
    init = next(node for node in vllm_class.body if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    return {argument.arg for argument in init.args.args}, init.args.kwarg is not None


def test_multi_gpu_settings_reach_lm_eval_vllm_model_args_unchanged():
    options = engine.engine_options(_recipe(**MULTI_GPU), quantized=True)
    args = engine.lm_eval_vllm_args("/models/x", options)
    assert args["pretrained"] == "/models/x" and "model" not in args
    assert args["data_parallel_size"] == 1 and args["tensor_parallel_size"] == 4
    # lm-eval passes what it does not name itself to vllm.LLM unchanged (VLLM.__init__'s **kwargs).
    assert args["pipeline_parallel_size"] == 2 and args["distributed_executor_backend"] == "ray"
    named, passes_the_rest = _lm_eval_vllm_init_arguments()
    assert {"data_parallel_size", "tensor_parallel_size", "pretrained", "batch_size"} <= named and passes_the_rest
    assert not {"pipeline_parallel_size", "distributed_executor_backend", "max_logprobs"} & named


def test_sleep_mode_reaches_vllm_only_when_asked():
    """enable_sleep_mode is one of vllm.LLM's engine arguments that lm-eval passes through (not its own), and is
    set only for an engine child that may sleep (evaluate.EngineChildren on an accelerator)."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    options = engine.engine_options(_recipe(**MULTI_GPU), quantized=True)
    assert "enable_sleep_mode" not in engine.lm_eval_vllm_args("/models/x", options)
    assert engine.lm_eval_vllm_args("/models/x", options, sleep_mode=True)["enable_sleep_mode"] is True
    named, passes_the_rest = _lm_eval_vllm_init_arguments()
    assert "enable_sleep_mode" not in named and passes_the_rest
    assert "enable_sleep_mode" in {field.name for field in dataclasses.fields(EngineArgs)}


def test_more_than_one_data_parallel_replica_is_refused_with_the_reason(write_recipe):
    """lm-eval's replicas keep no model for serve's generations and the divergence: a second full copy of the
    model would compete for the same GPUs' memory, so the recipe refuses the setting (one line, the field)."""
    from quantize_pipeline.errors import RecipeError
    from quantize_pipeline.recipe.schema import load_recipe

    text = DEFAULT_RECIPE.read_text().replace("evaluation:\n", "evaluation:\n  data_parallel_size: 2\n", 1)
    with pytest.raises(RecipeError, match=r"evaluation\.data_parallel_size: .*2: only 1 is supported: lm-eval's "
                                          r"data-parallel replicas keep no model"):
        load_recipe(write_recipe(text))
    assert engine.engine_options(_recipe(data_parallel_size=1), quantized=True).data_parallel_size == 1


def test_defaults_are_one_device_and_vllm_chooses_its_executor():
    options = engine.engine_options(_recipe(), quantized=False)
    assert (options.tensor_parallel_size, options.pipeline_parallel_size, options.data_parallel_size) == (1, 1, 1)
    assert options.distributed_executor_backend is None and options.device == "cpu"
    assert options.kv_cache_dtype is None  # the base model never gets the export's KV-cache scheme


def test_transformers_device_is_the_resolved_resources_device():
    """resources.device (resolved by runner.check_engine) places the transformers engine: one device setting."""
    assert engine.engine_options(_recipe(), quantized=True, engine_name="transformers", device="cuda").device == "cuda"


def test_options_survive_the_child_hop_and_a_missing_field_fails_where_it_is_read():
    options = engine.engine_options(_recipe(**MULTI_GPU), quantized=True)
    assert EngineOptions.from_json(options.to_json()) == options
    partial = options.to_json()
    del partial["pipeline_parallel_size"]
    with pytest.raises(TypeError, match="pipeline_parallel_size"):
        EngineOptions.from_json(partial)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.dtype = "float32"


def test_every_registered_engine_is_loadable_by_name_and_has_a_version():
    for name, (target, _) in engines.ENGINES.items():
        module_name, class_name = target.split(":")
        module = __import__(module_name, fromlist=[class_name])
        assert getattr(module, class_name).name == name
        assert engines.version(name)
