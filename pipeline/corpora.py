"""Shipped text (under calibration/) and user text files, read as paragraphs."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import InputError

SHIPPED_TEXT_DIR = Path(__file__).resolve().parent.parent / "calibration"
SHIPPED_FILES = {
    "wikipedia": "wikipedia-calibration.jsonl",
    "wikipedia-heldout": "wikipedia-heldout.jsonl",
}


def resolve_text_source(source: str) -> Path:
    """A shipped corpus name or a file path -> the file to read."""
    path = SHIPPED_TEXT_DIR / SHIPPED_FILES[source] if source in SHIPPED_FILES else Path(source)
    if not path.is_file():
        raise InputError(f"{path}: text file not found")
    return path


def read_texts(path: Path, text_field: str = "text") -> list[str]:
    """Paragraphs of a .jsonl (one object per line, `text_field`) or .txt (blank-line separated) file."""
    if path.suffix == ".jsonl":
        texts = []
        for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{line_number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise InputError(f"{path}:{line_number}: no string field '{text_field}'")
            texts.append(row[text_field])
    else:
        texts = [block.strip() for block in path.read_text(encoding="utf-8").split("\n\n")]
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise InputError(f"{path}: no text found")
    return texts
