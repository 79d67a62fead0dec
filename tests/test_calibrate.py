"""calibrate on real files with a real (tiny) tokenizer; the shipped corpus split never overlaps."""

from __future__ import annotations

import json

import pyarrow
import pyarrow.parquet
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from quantize_pipeline.errors import InputError
from quantize_pipeline.quantize.calibrate import calibrate, load_token_batches
from quantize_pipeline.quantize.corpora import SHIPPED_TEXT_DIR, read_texts
from quantize_pipeline.recipe.schema import Recipe

PARAGRAPHS = [f"Paragraph number {i} talks about rivers, mountains and the sea near town {i}. " * 2 for i in range(40)]


@pytest.fixture
def model_dir(tmp_path):
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(PARAGRAPHS, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    folder = tmp_path / "model"
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def _recipe(source: str, **calibration) -> Recipe:
    return Recipe.model_validate({
        "name": "t", "model": {"source": "builtin:smollm2-135m-instruct"},
        "quantization": {"scheme": "int8_per_channel"}, "calibration": {"source": source, **calibration},
    })


def _write_sources(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"body": text}) + "\n" for text in PARAGRAPHS))
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(PARAGRAPHS))
    parquet = tmp_path / "c.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"body": PARAGRAPHS}), parquet)
    return jsonl, txt, parquet


def test_every_file_kind_gives_the_same_tokens(tmp_path, model_dir):
    hashes = set()
    for path in _write_sources(tmp_path):
        out = tmp_path / f"out-{path.suffix[1:]}"
        out.mkdir()
        summary = calibrate(_recipe(str(path), samples=8, max_seq_len=16, text_field="body"), model_dir, out)
        batches = load_token_batches(out)
        assert summary["samples"] == len(batches) == 8
        assert all(len(ids) == 16 for ids in batches)  # truncated to max_seq_len
        hashes.add(summary["tokens_sha256"])
    assert len(hashes) == 1


def test_seed_decides_the_sample(tmp_path, model_dir):
    jsonl, _, _ = _write_sources(tmp_path)
    digests = []
    for index, seed in enumerate((0, 0, 1)):
        out = tmp_path / f"out{index}"
        out.mkdir()
        digests.append(calibrate(_recipe(str(jsonl), samples=8, seed=seed, text_field="body"), model_dir, out)["tokens_sha256"])
    assert digests[0] == digests[1] != digests[2]


def test_missing_text_field_is_one_line(tmp_path):
    jsonl, _, parquet = _write_sources(tmp_path)
    with pytest.raises(InputError, match=r"c.jsonl:1: no string field 'text'"):
        read_texts(jsonl, "text")
    with pytest.raises(InputError, match="no column 'text'"):
        read_texts(parquet, "text")


def test_shipped_calibration_and_heldout_text_never_overlap():
    calibration = set(read_texts(SHIPPED_TEXT_DIR / "wikipedia-calibration.jsonl"))
    heldout = set(read_texts(SHIPPED_TEXT_DIR / "wikipedia-heldout.jsonl"))
    assert len(calibration) > 500 and len(heldout) > 100
    assert not calibration & heldout
