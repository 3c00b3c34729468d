"""Settings written once: how a settings dataclass field is spelled and checked.

A field declared with `setting(...)` carries its help, its command-line flags (the first is today's
spelling, the others old ones that keep working), its `Check`, and its TOML key; pipeline/settings.py
makes a command's flags, a build TOML section with its defaults, and a `--ranks` worker's argv from it.
The checks live here, in the ground, so that the engines' settings can declare them too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cqil.model.errors import CqilError
from cqil.model.fsutil import check_output_file

METADATA_KEY = "cqil.setting"


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


def one_of(*choices: str) -> Check:
    return Check(str, "text", lambda v: v in choices, f"must be one of {', '.join(choices)}")


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


def option_path(text: str, option: str) -> Path:
    """A path option's text as a Path; an empty one is refused (it would name the current folder)."""
    if not text.strip():
        raise CqilError(f"{option} is empty: name a file or folder, or leave the option out for its default")
    return Path(text).expanduser()


def _output_file(text: str, option: str) -> Path:
    path = option_path(text, option)
    check_output_file(path, option)
    return path


OUTPUT_FILE = Check(_output_file, "a file", named=True)  # a file the command writes (fsutil.check_output_file)


@dataclass(frozen=True)
class Setting:
    """One field's spellings and check. `flags` empty: not on the command line; `toml` None: not in a build
    section. `unset` is the TOML value that stands for None (TOML has no null). `check` None: an on/off switch."""

    help: str
    flags: tuple[str, ...]
    check: Check | None
    toml: str | None
    toml_aliases: tuple[str, ...] = ()
    unset: Any = None
    metavar: str | None = None
    many: bool = False  # a repeatable option (`--prompt A --prompt B`); the value is a tuple

    def to_text(self, value: Any) -> str:
        """The value as the command line spells it (the inverse of `check`)."""
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def setting(default: Any = dataclasses.MISSING, help: str = "", *, flags: tuple[str, ...] | None = None,
            check: Check | None = None, toml: str | None | bool = True, toml_aliases: tuple[str, ...] = (),
            unset: Any = None, metavar: str | None = None, many: bool = False) -> Any:
    """A dataclass field with its spellings: `flags` default to `--field-name` (pass `()` for none, or today's
    spelling first and old ones after it), `toml` to `field_name` (False: not in a build section)."""
    meta = {"help": help, "check": check, "toml_aliases": toml_aliases, "unset": unset, "metavar": metavar,
            "flags": flags, "toml": toml, "many": many}
    return dataclasses.field(default=default, metadata={METADATA_KEY: meta})


def spelling(field: dataclasses.Field) -> Setting | None:
    """The field's `Setting` (its flags and TOML key filled in from its name where not given), or None."""
    meta = field.metadata.get(METADATA_KEY)
    if meta is None:
        return None
    flags = meta["flags"]
    if flags is None:
        flags = (f"--{field.name.replace('_', '-')}",)
    toml = meta["toml"]
    if toml is True:
        toml = field.name
    elif toml is False:
        toml = None
    return Setting(meta["help"], tuple(flags), meta["check"], toml, tuple(meta["toml_aliases"]), meta["unset"],
                   meta["metavar"], meta["many"])


def spelled_fields(cls: type) -> list[tuple[dataclasses.Field, Setting]]:
    """The fields of settings class `cls` declared with `setting(...)`, in order."""
    return [(field, spell) for field in dataclasses.fields(cls) if (spell := spelling(field)) is not None]


def check_value(spell: Setting, value: Any, name: str) -> Any:
    """A value from a TOML file or `--set` through the field's check; the message names `name` (the key)."""
    if spell.unset is not None and value == spell.unset:
        return None
    if spell.check is None:
        if not isinstance(value, bool):
            raise CqilError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise CqilError(f"{name} is not {spell.check.kind}, got {value!r}")
    try:
        return spell.check(value if isinstance(value, str) else repr(value), name)
    except ValueError as exc:
        raise CqilError(f"{name} {exc} (got {value!r})") from None


def check_fields(settings: Any) -> None:
    """Run every field's check (not those that touch files) on the values of a settings object made in code,
    so a direct caller gets the CLI's message; a dataclass calls this from `__post_init__`."""
    for field, spell in spelled_fields(type(settings)):
        value = getattr(settings, field.name)
        if value is None or spell.check is None or spell.check.named or spell.many or isinstance(value, tuple):
            continue
        name = spell.flags[0] if spell.flags else field.name
        try:
            spell.check(value if isinstance(value, str) else repr(value), name)
        except ValueError as exc:
            raise CqilError(f"{name} {value!r} {exc}") from None
