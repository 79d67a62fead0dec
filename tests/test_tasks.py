"""The shipped offline tasks: registered, their data files present, loadable by lm-eval, and scorable."""

from __future__ import annotations

import pytest

from quantize_pipeline.evaluate import lm_eval_tasks
from quantize_pipeline.recipe.schema import SHIPPED_TASKS

MULTIPLE_CHOICE = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq")
# (questions in the shipped validation split, choices per question: chance = 1 / choices)
SPLITS = {"arc_easy": 570, "arc_challenge": 299, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "boolq": 3270}


def test_every_recipe_task_is_shipped_with_its_data():
    assert set(SHIPPED_TASKS) == set(MULTIPLE_CHOICE)
    for name in SHIPPED_TASKS:
        config = lm_eval_tasks.task_config(name)
        assert config["task"] == lm_eval_tasks.lm_eval_name(name)
        assert lm_eval_tasks.gated_metric(name) == "acc"
        assert all(path.endswith(".arrow") for path in config["dataset_kwargs"]["data_files"].values())


@pytest.fixture(scope="module")
def built_tasks(tmp_path_factory):
    """lm-eval's tasks built offline from the shipped configs, in one get_task_dict call: each call indexes
    lm-eval's whole task registry (~8 s here), so six calls cost six times that for the same check."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        from lm_eval.tasks import get_task_dict

        yield get_task_dict([lm_eval_tasks.task_config(name) for name in MULTIPLE_CHOICE])


@pytest.mark.slow
@pytest.mark.parametrize("name", MULTIPLE_CHOICE)
def test_lm_eval_builds_each_task_offline(name, built_tasks):
    task = built_tasks[lm_eval_tasks.lm_eval_name(name)]
    docs = task.validation_docs()
    assert len(docs) == SPLITS[name]
    choices = task.doc_to_choice(docs[0])
    assert len(choices) >= 2 and all(isinstance(choice, str) and choice for choice in choices)
    target = task.doc_to_target(docs[0])
    if name == "winogrande":  # partial scoring: the gold index comes from doc_to_text, the target is the tail
        assert task.doc_to_text(docs[0]) in (0, 1) and isinstance(target, str) and target
    else:
        assert 0 <= int(target) < len(choices)


@pytest.mark.slow
def test_new_tasks_score_the_base_model_per_question(tmp_path):
    """One vLLM start, 10-30 questions of each new task: per-question 0/1 outcomes, and the tiny model
    beats chance where it clearly should (PIQA 2 choices, HellaSwag 4). The only CI run of these four tasks'
    lm-eval configs through an engine (the gated runs ask ARC-Easy); sized for that, not for the accuracies."""
    from quantize_pipeline.engines import settings as engine
    from quantize_pipeline.recipe.schema import Recipe
    from quantize_pipeline.run.runner import resolve_base_model
    from quantize_pipeline.run.worker import call_isolated

    recipe = Recipe.model_validate({"name": "t", "model": {"source": "builtin:smollm2-135m-instruct"},
                                    "quantization": {"scheme": "int8_per_channel"},
                                    "evaluation": {"enforce_eager": True}})
    model_dir = resolve_base_model(recipe, tmp_path / "prepare.log", lambda line: None)
    tasks = {"piqa": 30, "hellaswag": 30, "winogrande": 10, "boolq": 10}  # accuracy asserted on the first two only
    result, _ = call_isolated(
        "quantize_pipeline.evaluate.evaluate:round_job",
        {"model_dir": str(model_dir), "tasks": tasks, "role": "base",
         "engine_options": engine.engine_options(recipe, quantized=False).to_json()},
        log_path=tmp_path / "evaluate.log", stage="evaluate",
    )
    for name, limit in tasks.items():
        per_doc = result["tasks"][name]["per_doc"]
        assert len(per_doc) == limit and {value for _, value in per_doc} <= {0, 1, 0.0, 1.0}, name
    accuracy = {name: result["tasks"][name]["metrics"]["acc"] for name in tasks}
    assert accuracy["piqa"] > 0.5 and accuracy["hellaswag"] > 0.25, accuracy
