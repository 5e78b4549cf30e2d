"""One definition of each setting: its flag, its TOML key, its default in `--help` and in docs/SETTINGS.md.

A settings dataclass declares each field with `opt(default, help, ...)`; `add_arguments` derives the flags,
`from_args` reads them back and `to_argv` writes them for a child process (the sims start a coordinator), so
no list of flags is kept by hand. `--config FILE.toml` (see `fedswarm.app.config_file`) fills the same options.
Light on purpose: `fedswarm status` and `fedswarm config` import this without torch."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, Iterable

def opt(default: Any, help: str, *, choices: Iterable[str] | Callable[[], Iterable[str]] | None = None,  # noqa: A002
        flag: str | None = None, metavar: str | None = None, required: bool = False) -> Any:
    """A dataclass field that is also a command-line option (`--name-with-dashes` unless `flag` says); a bool
    field is a switch (off by default); a `required` one must be given (by a flag or a config file)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "flag": flag,
                                                         "metavar": metavar, "required": required})


@dataclasses.dataclass(frozen=True)
class Setting:
    """One option as the CLI, the config file and the docs see it."""

    name: str          # the dataclass field
    flag: str          # "--seq-len"
    type: type         # int, float, str
    default: Any
    help: str
    choices: tuple[str, ...] | None
    metavar: str | None
    required: bool = False

    @property
    def key(self) -> str:
        """The config file's key: the flag without dashes, `_` for `-` (--seq-len: seq_len)."""
        return self.flag.lstrip("-").replace("-", "_")


def settings_of(cls: type) -> list[Setting]:
    """The options a settings dataclass declares, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))   # float | None: float
        choices = f.metadata["choices"]
        if callable(choices):
            choices = choices()
        out.append(Setting(f.name, f.metadata["flag"] or "--" + f.name.replace("_", "-"), kind, f.default,
                           f.metadata["help"], tuple(choices) if choices is not None else None, f.metadata["metavar"],
                           f.metadata.get("required", False)))
    return out


def add_arguments(p: argparse.ArgumentParser, cls: type, *, exclude: Iterable[str] = (),
                  defaults: dict[str, Any] | None = None, prefix: str = "") -> None:
    """Add `cls`'s options to `p` (dest: `prefix` + the field name, so two classes' fields of one name stay
    apart); `defaults` replaces some of their defaults."""
    defaults, skip = defaults or {}, set(exclude)
    for s in settings_of(cls):
        if s.name in skip:
            continue
        default = defaults.get(s.name, s.default)
        if s.type is bool:
            p.add_argument(s.flag, dest=prefix + s.name, action="store_true", default=default, help=s.help)
            continue
        p.add_argument(s.flag, dest=prefix + s.name, type=s.type, default=default, help=s.help,
                       choices=list(s.choices) if s.choices else None, metavar=s.metavar, required=s.required)


def from_args(cls: type, args: argparse.Namespace, *, prefix: str = "", **overrides: Any):
    """An instance of `cls` from the options `add_arguments` added (fields it did not add keep their default)."""
    values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls) if hasattr(args, prefix + f.name)}
    return cls(**{**values, **overrides})


def to_argv(cls: type, args: argparse.Namespace, *, exclude: Iterable[str] = ()) -> list[str]:
    """The flags that pass `args`' values of `cls`'s options on to another fedswarm process (None: left out)."""
    skip, argv = set(exclude), []
    for s in settings_of(cls):
        value = getattr(args, s.name, None)
        if s.name in skip or value is None or value is False:
            continue
        argv += [s.flag] if value is True else [s.flag, str(value)]
    return argv
