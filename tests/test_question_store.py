"""The per-question base-outcome store: rounds and runs never evaluate a base question twice."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from quantize_pipeline.evaluate.question_store import QuestionStore, store_path

OPTIONS = {"enforce_eager": False, "dtype": "bfloat16", "engine": "vllm"}


def test_key_is_the_baseline_key_without_the_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("QP_CACHE_DIR", str(tmp_path))
    path = store_path("ab" * 32, "arc_easy", "0.11.0", OPTIONS)
    assert path == tmp_path / "baselines" / ("ab" * 16) / "v1-questions-arc_easy-bfloat16-vllm-0.11.0-compiled.json"
    assert store_path("ab" * 32, "arc_easy", "0.11.0", {**OPTIONS, "enforce_eager": True}) != path
    assert store_path("cd" * 32, "arc_easy", "0.11.0", OPTIONS) != path


def test_rounds_only_ask_for_new_questions(tmp_path):
    store = QuestionStore(tmp_path / "store.json")
    assert store.missing(range(4)) == [0, 1, 2, 3]
    assert store.add([[0, 1], [1, 0], [2, 1]]) == 3
    assert store.missing(range(5)) == [3, 4]  # the next round evaluates only these
    store.add([[3, 0], [4, 1]])
    assert store.lookup([4, 0]) == [[4, 1], [0, 1]]
    assert QuestionStore(tmp_path / "store.json").outcomes() == {0: 1, 1: 0, 2: 1, 3: 0, 4: 1}  # survives a new process


def test_a_stored_answer_is_never_replaced_and_perplexity_pairs_round_trip(tmp_path):
    store = QuestionStore(tmp_path / "store.json")
    store.add([[7, 1]])
    store.add([[7, 0], [8, [-120.5, 40]]])
    assert store.outcomes() == {7: 1, 8: [-120.5, 40]}
    assert json.loads((tmp_path / "store.json").read_text()) == {"7": 1, "8": [-120.5, 40]}


def _add_range(path: str, start: int) -> None:
    QuestionStore(Path(path)).add([[doc_id, 1] for doc_id in range(start, start + 50)])


def test_concurrent_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "store.json")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_add_range, args=(path, start)) for start in (0, 50, 100, 150)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert sorted(QuestionStore(tmp_path / "store.json").outcomes()) == list(range(200))
