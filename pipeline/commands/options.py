"""Options shared by several commands, and the checks that every option value passes while parsing.

A `Check` is an argparse `type`: it converts the text and refuses a value out of range, an empty
string, a missing or unreadable input, or an output location that cannot be written, so that a bad
value is one line naming the option (pipeline/cli.py) before any model is loaded.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cqil.model.errors import CqilError


class Check:
    """Convert an option's text with `convert`, then test it; a failure is a ValueError saying why."""

    def __init__(self, convert: Callable[..., Any], kind: str, test: Callable[[Any], bool] | None = None,
                 reason: str = "", named: bool = False):
        self.convert, self.kind, self.test, self.reason = convert, kind, test, reason
        self.named = named  # convert(text, option) raises a CqilError whose message names the option

    def __call__(self, text: str, option: str = "the option") -> Any:
        try:
            value = self.convert(text, option) if self.named else self.convert(text)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"is not {self.kind}") from exc
        if self.test is not None and not self.test(value):
            raise ValueError(self.reason)
        return value

    def __repr__(self) -> str:  # argparse shows it in some messages
        return self.kind


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def at_least(low: int) -> Check:
    return Check(int, "an integer", lambda v: v >= low, f"must be at least {low}")


def number(test: Callable[[float], bool], reason: str) -> Check:
    return Check(_finite, "a number", test, reason)


POSITIVE = at_least(1)
NON_NEGATIVE = at_least(0)
POSITIVE_NUMBER = number(lambda v: v > 0, "must be positive")
NON_NEGATIVE_NUMBER = number(lambda v: v >= 0, "must be 0 or more")
def _utf8_text(text: str, option: str) -> str:
    """Command-line text; bytes that are not UTF-8 reach Python as lone surrogates (PEP 383): refuse them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = ord(text[exc.start]) - 0xDC00 if 0xDC80 <= ord(text[exc.start]) <= 0xDCFF else ord(text[exc.start])
        raise CqilError(f"{option} is not valid UTF-8 (byte {byte:#04x} at character {exc.start}): "
                        "pass UTF-8 text") from None
    return text


TEXT = Check(_utf8_text, "text", lambda v: v.strip() != "", "must not be empty", named=True)


def _path(text: str, option: str) -> Path:
    if not text.strip():
        raise CqilError(f"{option} is empty: name a file or folder, or leave the option out for its default")
    return Path(text).expanduser()


def _existing(kind: str, hint: str = "") -> Callable[[str, str], Path]:
    def convert(text: str, option: str) -> Path:
        path = _path(text, option)
        if not path.exists():
            raise CqilError(f"{option} '{text}' does not exist{': ' + hint if hint else ''}")
        if kind == "file" and not path.is_file():
            raise CqilError(f"{option} '{text}' is a folder: give a file")
        if kind == "folder" and not path.is_dir():
            raise CqilError(f"{option} '{text}' is a file: give a folder")
        return path
    return convert


def input_file(hint: str = "") -> Check:
    """An existing file; `hint` says how to make one."""
    return Check(_existing("file", hint), "a file", named=True)


INPUT_FILE = input_file()
INPUT_FOLDER = Check(_existing("folder"), "a folder", named=True)
INPUT_PATH = Check(_existing("path"), "a file or folder", named=True)


def _json_file(text: str, option: str) -> Path:
    from cqil.model.fsutil import read_json

    path = _existing("file")(text, option)
    if not isinstance(read_json(path, f"{option} file", ""), dict):
        raise CqilError(f"{option} '{text}' must hold a JSON object")
    return path


JSON_FILE = Check(_json_file, "a JSON file", named=True)


def _text_source(text: str, option: str) -> str:
    """A --data/--eval-data value: readable UTF-8 text of a supported kind (pipeline/data.py)."""
    from cqil.pipeline.data import read_text

    _path(text, option)
    try:
        read_text(text)
    except CqilError as exc:
        raise CqilError(f"{option}: {exc}") from None
    return text


TEXT_SOURCE = Check(_text_source, "a text source", named=True)


def _model(text: str, option: str) -> str:
    """--model: a directory with a supported config and weights, or a .gguf file (converted later)."""
    from cqil.pipeline.sources import check_model_spec

    _path(text, option)
    if text != "default":
        check_model_spec(text)  # its messages name the model path
    return text


MODEL = Check(_model, "a model", named=True)


def output_dir(is_ours: Callable[[Path], bool] | None = None) -> Check:
    """A folder the command writes as a whole (fsutil.check_output_dir)."""
    def convert(text: str, option: str) -> Path:
        from cqil.model.fsutil import check_output_dir

        path = _path(text, option)
        check_output_dir(path, option, is_ours)
        return path
    return Check(convert, "a folder", named=True)


def _output_file(text: str, option: str) -> Path:
    from cqil.model.fsutil import check_output_file

    path = _path(text, option)
    check_output_file(path, option)
    return path


OUTPUT_DIR = output_dir()
OUTPUT_FILE = Check(_output_file, "a file", named=True)


# -- option groups shared by several commands -----------------------------------------------------------

def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=MODEL, help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct)")


def add_plan_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("plan (one of; a merged CQIL checkpoint carries its own)")
    group.add_argument("--plan", type=JSON_FILE, help="plan.json, or an official CQIL config with cqil_layers")
    group.add_argument("--uniform", type=TEXT, metavar="S:E:P", help="groups of P layers in [S, E), as in the paper")
    group.add_argument("--groups", type=TEXT, metavar="A-B,...", help="explicit parallel groups, e.g. 15-16,17-18")
    group.add_argument("--bypass", type=NON_NEGATIVE, default=None, metavar="D",
                       help="bypass distance d (default 0; with --plan, the plan's own)")


def add_data_options(parser: argparse.ArgumentParser, batch_size: int = 4) -> None:
    from cqil.pipeline.data import DEFAULT_SEQ_LEN

    parser.add_argument("--data", type=TEXT_SOURCE, help=".txt, directory of .txt, or .jsonl (default: pydoc_data.topics)")
    parser.add_argument("--eval-data", type=TEXT_SOURCE, help="held-out text used whole (default: last 10%% of --data)")
    parser.add_argument("--seq-len", type=at_least(2), default=DEFAULT_SEQ_LEN,
                        help="tokens per chunk (default %(default)s)")
    parser.add_argument("--batch-size", type=POSITIVE, default=batch_size, help="chunks per batch (default %(default)s)")
    parser.add_argument("--max-chunks", type=POSITIVE, default=None, help="use at most this many chunks")


def limit_chunks(chunks, max_chunks: int | None):
    return chunks if max_chunks is None else chunks[:max_chunks]
