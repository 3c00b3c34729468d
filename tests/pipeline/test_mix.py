"""Recovery on a mix of texts (data.mix, data.mix_fraction; `cqil finetune --mix`): which chunks it trains on,
that they are always the same, and that the held-out texts stay out of them."""

from __future__ import annotations

import json
import re

import pytest
import torch
from cqil.model.errors import CqilError
from cqil.pipeline.cli import main
from cqil.pipeline.data import (
    FORTUNE_COLLECTIONS,
    FORTUNES_DIR,
    check_mix,
    chunk_tokens,
    default_text,
    fortunes_text,
    jargon_file_text,
    load_split,
    mixed_training,
    read_text,
)

from tests.helpers import build_args

SEQ = 32


def word_runs(text: str, n: int = 10) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@pytest.fixture
def mix_file(tmp_path):
    path = tmp_path / "mix.txt"
    path.write_text(" ".join(f"line {i} of another kind of text." for i in range(400)))
    return path


def test_the_mix_adds_its_share_spread_over_the_whole_text_and_is_always_the_same(tokenizer, mix_file):
    split = load_split(tokenizer, seq_len=SEQ)
    train = split.train[:30]
    mixed = mixed_training(tokenizer, train, str(mix_file), 0.25)
    assert torch.equal(mixed, mixed_training(tokenizer, train, str(mix_file), 0.25))
    assert torch.equal(mixed[:30], train)
    assert len(mixed) == 40  # 10 of 40 = 0.25
    own = chunk_tokens(tokenizer, mix_file.read_text(), SEQ)
    rows = [next(i for i in range(len(own)) if torch.equal(own[i], row)) for row in mixed[30:]]
    assert rows[0] == 0 and rows[-1] == len(own) - 1 and rows == sorted(set(rows))  # first to last, no repeats
    assert torch.equal(mixed_training(tokenizer, train, None, 0.25), train)
    assert torch.equal(mixed_training(tokenizer, train, str(mix_file), 0.0), train)
    two = mixed_training(tokenizer, train, f"{mix_file},{mix_file}", 0.5)  # 30 more, 15 from each
    assert len(two) == 60 and torch.equal(two[30:45], two[45:])


def test_held_out_chunks_are_never_trained_on(tokenizer):
    split = load_split(tokenizer, seq_len=SEQ)
    mixed = mixed_training(tokenizer, split.train, "fortunes", 0.5)
    assert len(mixed) == 2 * len(split.train)
    held = {tuple(row.tolist()) for row in split.held_out}
    assert not held & {tuple(row.tolist()) for row in mixed}


def test_the_fortunes_share_no_passage_with_either_held_out_text():
    """No 10-word run of the mix is in the training text's held-out end (its last 12 %: the held-out 10 % of
    the tokens with a margin) or anywhere in the Jargon File."""
    mix = word_runs(fortunes_text())
    text = default_text()
    assert not mix & word_runs(text[int(len(text) * 0.88):])
    assert not mix & word_runs(jargon_file_text())
    assert word_runs((FORTUNES_DIR / "computers").read_text(errors="replace")) & word_runs(jargon_file_text())  # why left out


def test_the_fortunes_are_their_entries_without_separators(tmp_path):
    text = read_text("fortunes")
    assert len(text) > 500_000 and "\n%\n" not in text and not text.startswith("%")
    first = (FORTUNES_DIR / FORTUNE_COLLECTIONS[0]).read_text().split("\n%\n")[0]
    assert text.startswith(first.strip("\n") + "\n\n")
    with pytest.raises(CqilError, match="apt-get install fortunes"):
        fortunes_text(tmp_path)


@pytest.mark.parametrize("mix, data, eval_data, second", [
    ("fortunes,jargon-file", None, None, "jargon-file"),  # the second held-out text
    ("pydoc_data.topics", None, None, None),  # the training text whose last 10 % is held out
    ("b.txt", "a.txt", "b.txt", None),  # the held-out text
])
def test_a_mix_naming_a_held_out_text_is_refused(mix, data, eval_data, second):
    with pytest.raises(CqilError, match="which is the"):
        check_mix(mix, data, eval_data, second)


def test_a_mix_may_repeat_a_training_text_that_holds_nothing_out():
    check_mix("a.txt", "a.txt", "b.txt", "jargon-file")


def test_the_build_refuses_a_mix_with_a_held_out_text_in_one_line(tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("llama")
    capsys.readouterr()
    assert main(build_args(model, tmp_path / "b", "--set", "data.mix=fortunes,jargon-file")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'jargon-file', which is the second held-out text" in err[0]
    assert not (tmp_path / "b" / "recover").exists()


def test_finetune_trains_on_the_mix(tiny_model_dir, tokenizer, mix_file, tmp_path):
    model = str(tiny_model_dir("llama"))
    out = tmp_path / "adapter"
    assert main(["finetune", "--model", model, "--uniform", "1:5:2", "--bypass", "1", "--steps", "1", "--rank", "2",
                 "--seq-len", str(SEQ), "--max-chunks", "12", "--mix", str(mix_file), "--mix-fraction", "0.5",
                 "--eval-every", "0", "--eval-chunks", "1", "--out", str(out)]) == 0
    assert json.loads((out / "training_run.json").read_text())["train_chunks"] == 24
