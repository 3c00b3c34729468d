"""A settings dataclass made into command-line flags, a `--ranks` worker's argv, and a build TOML section.

The fields' spellings and checks are declared once with `model.settings.setting(...)` (torchtitan's
single config source: dataclasses behind both the CLI and the config files). From them:

- `add_flags` adds a command's argparse options (today's spelling and the old ones, the field's check
  as the argparse `type`, the dataclass default), `from_args` builds the settings from parsed options;
- `to_argv` writes settings back as argv that `add_flags` parses to the same settings (the worker);
- `toml_section` / `toml_keys` give a build section's defaults and its keys (old spellings included),
  whose values pipeline/build_config.py checks with the same checks, naming the TOML key
  (`bench.repeats must be at least 1`) rather than a flag.

An option still declared with `parser.add_argument` beside these keeps working: nothing here reads it.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from cqil.model.settings import Setting, spelled_fields


def _chosen(cls: type, only: Iterable[str] | None, skip: Iterable[str]) -> list[tuple[dataclasses.Field, Setting]]:
    only, skip = (None if only is None else set(only)), set(skip)
    return [(f, s) for f, s in spelled_fields(cls) if s.flags and (only is None or f.name in only) and f.name not in skip]


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
              only: Iterable[str] | None = None, skip: Iterable[str] = (),
              defaults: Mapping[str, Any] | None = None) -> None:
    """Add the options of `cls`'s fields (those in `only`, less `skip`); `defaults` replaces a field's default
    for this command. The option's dest is the field name; old spellings come first so that the error
    messages (pipeline/cli.py names `option_strings[-1]`) use today's."""
    for field, spell in _chosen(cls, only, skip):
        default = (defaults or {}).get(field.name, field.default)
        shown = spell.to_text(default) if isinstance(default, tuple) else "%(default)s"
        kwargs: dict[str, Any] = {"dest": field.name, "help": spell.help.replace("%(default)s", shown)}
        if spell.check is None:
            kwargs.update(action="store_true", default=bool(default) if default is not dataclasses.MISSING else False)
        else:
            kwargs.update(type=spell.check, metavar=spell.metavar)
            if spell.many:
                kwargs["action"] = "append"
            if default is dataclasses.MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = list(default) if spell.many and default is not None else default
        parser.add_argument(*spell.flags[1:], spell.flags[0], **kwargs)


def from_args(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """Settings of `cls` from parsed options: the fields the parser has, then `given`, then the defaults."""
    values = {}
    for field, spell in spelled_fields(cls):
        if field.name in given or not hasattr(args, field.name):
            continue
        value = getattr(args, field.name)
        values[field.name] = tuple(value) if spell.many and value is not None else value
    return cls(**values, **given)


def to_argv(settings: Any, *, only: Iterable[str] | None = None, skip: Iterable[str] = ()) -> list[str]:
    """The options that `add_flags(parser, type(settings))` parses back to these settings (None: left out)."""
    argv: list[str] = []
    for field, spell in _chosen(type(settings), only, skip):
        value, flag = getattr(settings, field.name), spell.flags[0]
        if spell.check is None:
            argv += [flag] if value else []
        elif spell.many and value is not None:
            for item in value:
                argv += [flag, str(item)]
        elif value is not None:
            argv += [flag, spell.to_text(value)]
    return argv


def toml_section(settings: Any) -> dict[str, Any]:
    """`settings` as a build TOML section: TOML keys, None as the field's `unset` value, tuples as text."""
    section = {}
    for field, spell in spelled_fields(type(settings)):
        if spell.toml is None:
            continue
        value = getattr(settings, field.name)
        if value is None:
            value = spell.unset
        elif isinstance(value, tuple) or hasattr(value, "__fspath__"):
            value = spell.to_text(value)
        section[spell.toml] = value
    return section


def toml_keys(cls: type) -> dict[str, Setting]:
    """Every TOML key of `cls`, old spellings included, with its field's Setting."""
    keys = {}
    for _, spell in spelled_fields(cls):
        if spell.toml is not None:
            keys.update({name: spell for name in (spell.toml, *spell.toml_aliases)})
    return keys
