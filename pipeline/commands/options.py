"""Options shared by several commands, and the checks that every option value passes while parsing.

A `Check` (model/settings.py) is an argparse `type`: it converts the text and refuses a value out of range, an empty
string, a missing or unreadable input, or an output location that cannot be written, so that a bad
value is one line naming the option (pipeline/cli.py) before any model is loaded.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cqil.model.errors import CqilError
from cqil.model.fsutil import check_output_dir, read_json
from cqil.model.settings import (  # noqa: F401 - the checks every command uses, declared in the ground
    NON_NEGATIVE,
    NON_NEGATIVE_NUMBER,
    OUTPUT_FILE,
    POSITIVE,
    POSITIVE_NUMBER,
    TEXT,
    Check,
    at_least,
    number,
    one_of,
    option_path,
    setting,
)
from cqil.pipeline.data import DEFAULT_SEQ_LEN, read_text
from cqil.pipeline.settings import add_flags
from cqil.pipeline.sources import check_model_spec


def _existing(kind: str, hint: str = "") -> Callable[[str, str], Path]:
    def convert(text: str, option: str) -> Path:
        path = option_path(text, option)
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
    path = _existing("file")(text, option)
    if not isinstance(read_json(path, f"{option} file", ""), dict):
        raise CqilError(f"{option} '{text}' must hold a JSON object")
    return path


JSON_FILE = Check(_json_file, "a JSON file", named=True)


def _text_source(text: str, option: str) -> str:
    """A --data/--eval-data value: readable UTF-8 text of a supported kind (pipeline/data.py)."""
    option_path(text, option)
    try:
        read_text(text)
    except CqilError as exc:
        raise CqilError(f"{option}: {exc}") from None
    return text


TEXT_SOURCE = Check(_text_source, "a text source", named=True)


def _model(text: str, option: str) -> str:
    """--model: a directory with a supported config and weights, or a .gguf file (converted later)."""
    option_path(text, option)
    if text != "default":
        check_model_spec(text)  # its messages name the model path
    return text


MODEL = Check(_model, "a model", named=True)


def output_dir(is_ours: Callable[[Path], bool] | None = None) -> Check:
    """A folder the command writes as a whole (fsutil.check_output_dir)."""
    def convert(text: str, option: str) -> Path:
        path = option_path(text, option)
        check_output_dir(path, option, is_ours)
        return path
    return Check(convert, "a folder", named=True)


OUTPUT_DIR = output_dir()


# -- option groups shared by several commands -----------------------------------------------------------

def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=MODEL, help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct)")


def add_plan_options(parser: argparse.ArgumentParser) -> None:
    from cqil.pipeline.plan_choice import PlanChoice  # it imports this module: its fields use the checks above

    group = parser.add_argument_group("plan (one of; a merged CQIL checkpoint carries its own)")
    add_flags(group, PlanChoice, only=PLAN_FLAGS)


PLAN_FLAGS = ("plan", "uniform", "groups", "bypass")  # what every command with a plan offers (`cqil plan` more)


@dataclass(frozen=True)
class DataSettings:
    """The text a command reads and how it is cut (the options of every command that reads text; the build's
    [data] and [analyze] sections)."""

    data: str | None = setting(None, ".txt, directory of .txt, or .jsonl (default: pydoc_data.topics)",
                               check=TEXT_SOURCE, unset="")
    eval_data: str | None = setting(None, "held-out text used whole (default: last 10%% of --data)",
                                    check=TEXT_SOURCE, unset="")
    seq_len: int = setting(DEFAULT_SEQ_LEN, "tokens per chunk (default %(default)s)", check=at_least(2))
    batch_size: int = setting(4, "chunks per batch (default %(default)s)", check=POSITIVE)
    max_chunks: int | None = setting(None, "use at most this many chunks", check=POSITIVE, unset=0)


def _mix_sources(text: str, option: str) -> str:
    """--mix: comma-separated text sources, each readable (pipeline/data.py); '' for none."""
    from cqil.pipeline.data import mix_sources

    for source in mix_sources(text):
        _text_source(source, option)
    return text


@dataclass(frozen=True)
class TrainingMix:
    """Recovery's training text of more than one kind: the training chunks plus chunks of other texts (`cqil
    finetune`'s flags, the build's [data] keys; pipeline/data.py:mixed_training). Held-out texts stay unseen."""

    mix: str | None = setting(None, "more training texts of other kinds, comma-separated: named texts (e.g. "
                              "fortunes) or files (default: none)", check=Check(_mix_sources, "text sources", named=True),
                              unset="")
    mix_fraction: float = setting(0.5, "share of the training chunks taken from --mix (default %(default)s)",
                                  check=number(lambda v: 0 <= v < 1, "must be in [0, 1)"))


def add_data_options(parser: argparse.ArgumentParser, batch_size: int = 4) -> None:
    add_flags(parser, DataSettings, defaults={"batch_size": batch_size})


def limit_chunks(chunks, max_chunks: int | None):
    return chunks if max_chunks is None else chunks[:max_chunks]
