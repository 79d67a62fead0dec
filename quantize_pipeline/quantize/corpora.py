"""Shipped text (under calibration/) and user text files, read as paragraphs."""

from __future__ import annotations

import json
from pathlib import Path

from quantize_pipeline.errors import InputError

SHIPPED_TEXT_DIR = Path(__file__).resolve().parents[1] / "shipped" / "calibration"  # package data: ships in the wheel
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
    if path.suffix == ".parquet":
        import pyarrow.parquet

        table = pyarrow.parquet.read_table(path)
        if text_field not in table.column_names:
            raise InputError(f"{path}: no column '{text_field}' (columns: {', '.join(table.column_names)})")
        texts = [text for text in table.column(text_field).to_pylist() if isinstance(text, str)]
    elif path.suffix == ".jsonl":
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


def read_hub_dataset(dataset_id: str, subset: str | None, split: str, text_field: str) -> list[str]:
    """Texts of a Hub dataset split (needs network); one-line error otherwise."""
    try:
        import datasets

        rows = datasets.load_dataset(dataset_id, subset, split=split)
    except Exception as exc:  # datasets raises many types for "unreachable" and "no such split"
        raise InputError(f"calibration.source: cannot load hf:{dataset_id} split {split} ({type(exc).__name__})") from None
    if text_field not in rows.column_names:
        raise InputError(f"calibration.text_field: hf:{dataset_id} has no column '{text_field}'")
    return [text for text in rows[text_field] if isinstance(text, str) and text.strip()]
