"""The base model's outcome on each question, cached per question across rounds and runs.

Sequential evaluation asks for 200, then 500, then 1,000 questions; other recipes on the
same base ask for other limits. A cache keyed by limit (evaluate's whole-task baseline)
would evaluate the first 200 base questions again for every larger limit; this store is
keyed like that cache minus the limit, with one entry per lm-eval doc_id, so a base
question is evaluated once per (base model content, task, dtype, engine, engine version,
compile mode) and never again.

One JSON file per key: {"doc_id": value, ...} (value: 0/1 for accuracy, [loglik, words]
for perplexity documents). Writes merge under a file lock and land by atomic rename, so
two runs adding questions at once lose nothing and a reader never sees half a file.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from quantize_pipeline.recipe.models import cache_root
from quantize_pipeline.run.rundir import atomic_write_json

STORE_VERSION = "v1"


def store_path(base_digest: str, task: str, engine_version: str, options: dict) -> Path:
    """Where the per-question outcomes of this base model and engine set-up live (no limit in the key)."""
    mode = "eager" if options["enforce_eager"] else "compiled"
    key = f"{STORE_VERSION}-questions-{task}-{options['dtype']}-{options['engine']}-{engine_version}-{mode}"
    return cache_root() / "baselines" / base_digest[:32] / f"{key}.json"


class QuestionStore:
    """Per-question base outcomes for one (base model, task, engine set-up)."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def for_base(cls, base_digest: str, task: str, engine_version: str, options: dict) -> "QuestionStore":
        return cls(store_path(base_digest, task, engine_version, options))

    def outcomes(self) -> dict[int, object]:
        """{doc_id: value} of every question stored so far."""
        if not self.path.is_file():
            return {}
        return {int(doc_id): value for doc_id, value in json.loads(self.path.read_text()).items()}

    def missing(self, doc_ids: Iterable[int]) -> list[int]:
        """The doc_ids (in the order given) whose base outcome still has to be evaluated."""
        known = self.outcomes()
        return [doc_id for doc_id in doc_ids if doc_id not in known]

    def lookup(self, doc_ids: Iterable[int]) -> list[list]:
        """[[doc_id, value], ...] for the doc_ids given, as evaluate's per_doc lists them; KeyError if one is missing."""
        known = self.outcomes()
        return [[doc_id, known[doc_id]] for doc_id in doc_ids]

    def add(self, per_doc: Iterable[tuple[int, object] | list]) -> int:
        """Merge [[doc_id, value], ...] into the store; returns how many questions it now holds.

        A doc_id already stored keeps its first value: the base model and engine set-up are
        the key, so a different value means nondeterminism, and the gate must pair every
        round with the same base answers.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            merged = self.outcomes()
            for doc_id, value in per_doc:
                merged.setdefault(int(doc_id), value)
            atomic_write_json(self.path, {str(doc_id): merged[doc_id] for doc_id in sorted(merged)})
        return len(merged)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path.with_name(self.path.name + ".lock"), "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released by the OS if this process dies
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
