"""Text for calibration, training and evaluation, cut into token chunks by one fixed convention.

A text source is tokenized as one stream with no special tokens added and cut into consecutive
`seq_len` chunks, the remainder dropped. `--data` is split deterministically: the last 10% of its
chunks are held out. `--eval-data` is held out whole. The default text is the Python reference
documentation shipped in every CPython (`pydoc_data.topics`), joined in sorted topic order.

A second held-out text of another kind tells whether what recovery learned on the first carries
over: by default the Jargon File (`jargon-file`), English prose on hacker culture, in the public
domain and shipped as plain text by the Debian package jargon-text (scripts/env.sh installs it).

Recovery can train on a mix of kinds (`mixed_training`): the training chunks plus chunks of other texts,
by default `fortunes`, the English prose and verse collections of the Debian package fortunes (quotations
from literature, politics, law, medicine, humorists...). Its collections about computers, Linux, Perl
or programming are left out: they quote the Jargon File, the second held-out text, and a 10-word
overlap check finds none of the chosen collections in either held-out text (tests/pipeline/test_mix.py).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cqil.model.errors import CqilError

if TYPE_CHECKING:  # torch is imported where chunks are made, so `cqil --help` stays quick
    import torch

HELD_OUT_FRACTION = 0.1
DEFAULT_SEQ_LEN = 256
DEFAULT_TEXT_NAME = "pydoc_data.topics"


def default_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


JARGON_FILE = Path("/usr/share/doc/jargon-text/jargon.txt.gz")


def jargon_file_text(path: Path = JARGON_FILE) -> str:
    """The Jargon File 4.4.7 from its first glossary entry on (the table of contents before it is a list
    of headwords, not prose), without its three-space indent."""
    if not path.is_file():
        raise CqilError(f"the Jargon File is not installed ({path} is missing): run `apt-get install jargon-text` "
                        "(scripts/env.sh does), or choose another text with data.second_eval")
    text = gzip.decompress(path.read_bytes()).decode("utf-8")
    start = text.find("\n   :")
    if start < 0:
        raise CqilError(f"{path} has no glossary entries: is it the Jargon File?")
    return "\n".join(line.removeprefix("   ") for line in text[start + 1:].splitlines())


FORTUNES_DIR = Path("/usr/share/games/fortunes")
# The collections of English prose and verse, in this order; not computers, linux, perl, tao, zippy, startrek...
# (they quote the Jargon File or programs), nor those with a 10-word passage in common with a held-out text.
FORTUNE_COLLECTIONS = ("literature", "people", "humorists", "love", "men-women", "politics", "education",
                       "miscellaneous", "food", "pets", "sports", "law", "medicine", "platitudes", "fortunes")


def fortunes_text(directory: Path = FORTUNES_DIR) -> str:
    """The FORTUNE_COLLECTIONS of the Debian package fortunes: every entry (the `%` lines between them
    are separators, not text), entries a blank line apart."""
    missing = [name for name in FORTUNE_COLLECTIONS if not (directory / name).is_file()]
    if missing:
        raise CqilError(f"the fortunes collections are not installed ({directory / missing[0]} is missing): run "
                        "`apt-get install fortunes` (scripts/env.sh does), or choose another mix with data.mix")
    entries = []
    for name in FORTUNE_COLLECTIONS:
        text = (directory / name).read_text(encoding="utf-8", errors="replace")
        entries += [entry.strip("\n") for entry in text.split("\n%\n") if entry.strip("%\n ")]
    return "\n\n".join(entries)


NAMED_TEXTS = {DEFAULT_TEXT_NAME: default_text, "jargon-file": jargon_file_text, "fortunes": fortunes_text}


def read_text(source: str | Path | None) -> str:
    """Text of a .txt file, a directory of .txt files (sorted), a .jsonl with a 'text' field, a name
    from NAMED_TEXTS, or the default."""
    if source is None:
        return default_text()
    if str(source) in NAMED_TEXTS:
        return NAMED_TEXTS[str(source)]()
    path = Path(source).expanduser()
    if not path.exists():
        raise CqilError(f"text source '{source}' does not exist: pass a .txt file, a directory of them, a .jsonl, "
                        f"or one of {', '.join(NAMED_TEXTS)}")
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise CqilError(f"directory '{source}' holds no .txt files")
        return "\n\n".join(_utf8(f) for f in files)
    if path.suffix == ".jsonl":
        return "\n\n".join(_jsonl_texts(path))
    if path.suffix == ".txt":
        return _utf8(path)
    raise CqilError(f"text source '{source}' is neither .txt, .jsonl nor a directory")


def _utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CqilError(f"'{path}' is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}): "
                        "convert it to UTF-8") from None


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CqilError(f"{path}:{number} is not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CqilError(f"{path}:{number} has no string field 'text'")
        texts.append(record["text"])
    return texts


def chunk_tokens(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    """[n_chunks, seq_len] int64: the whole text as one token stream, cut consecutively."""
    if seq_len < 2:
        raise CqilError(f"--seq-len {seq_len} is too short: use at least 2 (default {DEFAULT_SEQ_LEN})")
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    count = len(ids) // seq_len
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


@dataclass
class TextSplit:
    train: torch.Tensor  # calibration / training chunks
    held_out: torch.Tensor
    source: str

    def describe(self) -> str:
        seq = self.held_out.shape[1] if self.held_out.numel() else 0
        return (f"{self.source}: {len(self.train)} training and {len(self.held_out)} held-out "
                f"chunks of {seq} tokens")


def split_chunks(chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Last 10% of chunks (at least one) held out; the rest for training/calibration."""
    held = max(1, round(len(chunks) * HELD_OUT_FRACTION))
    return chunks[:-held], chunks[-held:]


def load_split(tokenizer, data: str | Path | None = None, eval_data: str | Path | None = None,
               seq_len: int = DEFAULT_SEQ_LEN) -> TextSplit:
    """Chunks for training/calibration and held-out evaluation, by the convention above."""
    name = str(data) if data is not None else DEFAULT_TEXT_NAME
    chunks = chunk_tokens(tokenizer, read_text(data), seq_len)
    if eval_data is not None:
        held_out = chunk_tokens(tokenizer, read_text(eval_data), seq_len)
        train = chunks
        name = f"{name} + held-out {eval_data}"
    else:
        if len(chunks) < 2:
            raise CqilError(
                f"'{name}' gives {len(chunks)} chunk(s) of {seq_len} tokens: it needs at least 2 to hold "
                "some out; give more text, a shorter --seq-len, or --eval-data"
            )
        train, held_out = split_chunks(chunks)
    if len(held_out) == 0:
        raise CqilError(f"'{eval_data}' is shorter than one chunk of {seq_len} tokens")
    return TextSplit(train=train, held_out=held_out, source=name)


def spread_chunks(chunks: torch.Tensor, count: int) -> torch.Tensor:
    """`count` chunks spaced evenly from the first to the last (all of them when there are fewer), so that
    a short evaluation samples the whole text rather than its beginning."""
    import torch

    if count >= len(chunks):
        return chunks
    return chunks[torch.linspace(0, len(chunks) - 1, count).round().long()]


def mix_sources(mix: str | None) -> list[str]:
    """`fortunes,extra.txt` -> ["fortunes", "extra.txt"]; None or "" -> []."""
    return [part.strip() for part in (mix or "").split(",") if part.strip()]


def check_mix(mix: str | None, data: str | None, eval_data: str | None, second_eval: str | None = None) -> None:
    """Refuse a mix that names a held-out text (the training text itself when its last 10 % is held out,
    `eval_data`, `second_eval`): training on it would make that evaluation meaningless."""
    held_out = {"the training text, whose last 10 % is held out": None if eval_data else (data or DEFAULT_TEXT_NAME),
                "the held-out text": eval_data, "the second held-out text": second_eval}
    for source in mix_sources(mix):
        for what, text in held_out.items():
            if text and source == str(text):
                raise CqilError(f"the training mix names '{source}', which is {what}: mix in other texts")


def mixed_training(tokenizer, train: torch.Tensor, mix: str | None, fraction: float) -> torch.Tensor:
    """The training chunks followed by chunks of the `mix` texts, which make up `fraction` of the result.

    Each mix text gets an equal share of those chunks, spread evenly over the whole text (all of it when it
    is shorter), so the result is a pure function of the texts and the two settings. The held-out chunks
    are not touched: they come from the training text's last 10 % or from other texts, never from the mix.
    """
    import torch

    sources = mix_sources(mix)
    if not sources or fraction == 0:
        return train
    seq_len = train.shape[1]
    wanted = round(len(train) * fraction / (1 - fraction))
    shares = [wanted // len(sources) + (i < wanted % len(sources)) for i in range(len(sources))]
    pieces = [train]
    for source, share in zip(sources, shares):
        chunks = chunk_tokens(tokenizer, read_text(source), seq_len)
        if len(chunks) == 0:
            raise CqilError(f"the training mix text '{source}' is shorter than one chunk of {seq_len} tokens")
        pieces.append(spread_chunks(chunks, share))
    return torch.cat(pieces)
