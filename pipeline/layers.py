"""Layer-name patterns, as in llm-compressor's `ignore`: names, globs, `re:` regexes."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable


def matches(name: str, pattern: str) -> bool:
    """True when a module name is selected by a pattern.

    - `re:REGEX`: REGEX matched from the start of the name (llm-compressor's rule);
    - a glob with * ? [ ]: matched against the whole name;
    - a plain name: equal to the name or to its last dotted parts
      (`gate` selects `model.layers.0.mlp.gate`).
    """
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if any(char in pattern for char in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def select(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """Names selected by any of the patterns, in their original order."""
    patterns = list(patterns)
    return [name for name in names if any(matches(name, pattern) for pattern in patterns)]
