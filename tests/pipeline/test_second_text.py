"""The second held-out text (data.second_eval): the Jargon File from Debian's jargon-text, sampled evenly."""

from __future__ import annotations

import gzip

import pytest
import torch
from cqil.model.errors import CqilError
from cqil.pipeline.data import JARGON_FILE, chunk_tokens, jargon_file_text, read_text, spread_chunks


def test_the_jargon_file_loads_as_prose_without_its_table_of_contents(tokenizer):
    text = read_text("jargon-file")
    assert text == jargon_file_text()
    raw = gzip.decompress(JARGON_FILE.read_bytes()).decode("utf-8")
    assert len(text) > 1_000_000 and text.startswith(":(TM):")
    assert ":Godwin's Law: prov." in text and "   :Godwin's Law:" in raw  # the entries, unindented
    headwords = "   1TBS\n\n   2\n\n   404\n"  # the table of contents: a list of the headwords
    assert headwords in raw and headwords.replace("   ", "") not in text
    chunks = chunk_tokens(tokenizer, text[:20_000], 64)
    assert chunks.shape[1] == 64 and len(chunks) > 10


def test_a_missing_jargon_file_names_the_package(tmp_path):
    with pytest.raises(CqilError, match="apt-get install jargon-text"):
        jargon_file_text(tmp_path / "jargon.txt.gz")
    with pytest.raises(CqilError, match="jargon-file"):
        read_text(tmp_path / "nothing.txt")  # the error lists the named texts


def test_spread_chunks_samples_the_whole_text_evenly():
    chunks = torch.arange(100)[:, None].repeat(1, 3)
    picked = spread_chunks(chunks, 5)[:, 0].tolist()
    assert picked == [0, 25, 50, 74, 99]  # round(i * 99 / 4)
    assert torch.equal(spread_chunks(chunks[:4], 5), chunks[:4])
