"""Text sources, the chunking convention and the held-out split."""

from __future__ import annotations

import json

import pytest
import torch
from cqil.model.errors import CqilError
from cqil.pipeline.data import (
    chunk_tokens,
    default_text,
    load_split,
    read_text,
    split_chunks,
)


def test_chunks_are_one_stream_cut_consecutively(tokenizer):
    text = default_text()[:5000]
    chunks = chunk_tokens(tokenizer, text, 64)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert chunks.shape == (len(ids) // 64, 64)
    assert chunks.flatten().tolist() == ids[: chunks.numel()]  # remainder dropped, nothing added
    assert tokenizer.bos_token_id not in chunks[:, 0].tolist()


def test_split_holds_out_the_last_tenth():
    chunks = torch.arange(50 * 4).view(50, 4)
    train, held = split_chunks(chunks)
    assert len(held) == 5 and len(train) == 45
    assert torch.equal(held, chunks[45:]) and torch.equal(train, chunks[:45])
    train, held = split_chunks(chunks[:3])
    assert len(held) == 1 and len(train) == 2


def test_default_text_is_deterministic_and_large():
    text = default_text()
    assert text == default_text() and len(text) > 300_000


def test_sources_txt_dir_jsonl(tmp_path, tokenizer):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("second file")
    (tmp_path / "d" / "a.txt").write_text("first file")
    assert read_text(tmp_path / "d") == "first file\n\nsecond file"
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert read_text(tmp_path / "t.jsonl") == "one\n\ntwo"
    (tmp_path / "t.txt").write_text("plain")
    assert read_text(tmp_path / "t.txt") == "plain"


def test_eval_data_is_held_out_whole(tmp_path, tokenizer):
    (tmp_path / "train.txt").write_text(default_text()[:20000])
    (tmp_path / "eval.txt").write_text(default_text()[-8000:])
    split = load_split(tokenizer, tmp_path / "train.txt", tmp_path / "eval.txt", seq_len=32)
    assert torch.equal(split.held_out, chunk_tokens(tokenizer, default_text()[-8000:], 32))
    assert torch.equal(split.train, chunk_tokens(tokenizer, default_text()[:20000], 32))


@pytest.mark.parametrize("content,message", [
    ('{"text": "ok"}\nnot json\n', r"t.jsonl:2 is not valid JSON"),
    ('{"body": "x"}\n', r"t.jsonl:1 has no string field 'text'"),
])
def test_bad_jsonl(tmp_path, content, message):
    (tmp_path / "t.jsonl").write_text(content)
    with pytest.raises(CqilError, match=message):
        read_text(tmp_path / "t.jsonl")


def test_text_source_errors(tmp_path, tokenizer):
    with pytest.raises(CqilError, match="does not exist"):
        read_text(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CqilError, match="holds no .txt files"):
        read_text(tmp_path / "empty")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CqilError, match="neither .txt, .jsonl"):
        read_text(tmp_path / "x.csv")
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(CqilError, match="at least 2"):
        load_split(tokenizer, tmp_path / "short.txt", seq_len=64)
    with pytest.raises(CqilError, match="too short"):
        chunk_tokens(tokenizer, "abc", 1)
