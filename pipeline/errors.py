"""The few errors a user can act on. Each maps to a documented exit code.

Exit codes: 0 pass, 1 crash (a stage failed unexpectedly), 2 bad input
(recipe, file, option), 3 the export failed a check (verify or gate) and
nothing was published.
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


class RecipeError(PipelineError):
    """The recipe (or a file it names) is malformed: `path: field: what is allowed`."""

    exit_code = 2

    def __init__(self, path: str, field: str, message: str):
        location = f"{path}: {field}: " if field else f"{path}: "
        super().__init__(location + message)
        self.path = path
        self.field = field


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
