"""The few errors a user can act on. Each maps to a documented exit code.

Exit codes: 0 pass, 1 crash (a stage failed unexpectedly), 2 bad input
(recipe, file, option), 3 the export failed a check (verify or gate) and
nothing was published, 4 the gate could not decide (a rule's interval straddles
its threshold; nothing was published).
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class: one line for the user, an exit code for CI."""

    exit_code = 1

    def __init__(self, message: str, *, stage: str | None = None):
        super().__init__(message)
        self.stage = stage
        self.run_dir = None  # set by the runner once a run directory exists

    def one_line(self) -> str:
        text = " ".join(str(self).split())
        return f"[{self.stage}] {text}" if self.stage else text

    def to_json(self) -> dict:
        """What crosses the child-process hop (quantize_pipeline/run/worker.py): enough to raise the same error again."""
        return {"type": type(self).__name__, "message": str(self)}

    @staticmethod
    def from_json(data: dict, *, stage: str) -> PipelineError:
        """The error a child raised, raised again in the parent with the parent's stage (exit code kept).
        An unknown type (a newer child?) is a StageError: it still fails the stage."""
        error_type = ERROR_TYPES.get(data.get("type"), StageError)
        return error_type._rebuilt(data, stage)

    @classmethod
    def _rebuilt(cls, data: dict, stage: str) -> PipelineError:
        return cls(data["message"], stage=stage)


class RecipeError(PipelineError):
    """The recipe (or a file it names) is malformed: `path: field: what is allowed`."""

    exit_code = 2

    def __init__(self, path: str, field: str, message: str, *, stage: str | None = None):
        location = f"{path}: {field}: " if field else f"{path}: "
        super().__init__(location + message, stage=stage)
        self.path = path
        self.field = field
        self.reason = message

    def to_json(self) -> dict:
        return {**super().to_json(), "path": self.path, "field": self.field, "reason": self.reason}

    @classmethod
    def _rebuilt(cls, data: dict, stage: str) -> PipelineError:
        return cls(data["path"], data["field"], data["reason"], stage=stage)


class EngineRefused(RecipeError):
    """The engine the recipe asks for cannot serve its scheme on this machine (a RecipeError: exit 2)."""


class InputError(PipelineError):
    """A bad command-line input or a missing file outside the recipe."""

    exit_code = 2


class StageError(PipelineError):
    """A stage crashed; its log holds the details."""

    exit_code = 1


class VerifyFailed(PipelineError):
    """The exported tensors or config do not match what the recipe asked for."""

    exit_code = 3


class GateFailed(PipelineError):
    """At least one gate rule failed; nothing was published."""

    exit_code = 3


class GateInconclusive(PipelineError):
    """No rule failed, but at least one interval straddles its threshold: more evidence is needed."""

    exit_code = 4


ERROR_TYPES: dict[str, type[PipelineError]] = {
    error_type.__name__: error_type
    for error_type in (PipelineError, RecipeError, InputError, StageError, VerifyFailed, GateFailed, GateInconclusive)
}
