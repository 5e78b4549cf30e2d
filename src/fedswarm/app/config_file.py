"""`--config FILE.toml`: a command's settings from a TOML file, flags overriding; `fedswarm config show|doc`.

The file's keys are the command's own options, named as the flags are (`--seq-len`: `seq_len`), so nothing
here lists a setting: the parsers (built from fedswarm.settings) are the one definition. Tables:

    [run]          the run's settings (RunConfig): read by `fedswarm coordinator` and `fedswarm sim`
    [coordinator]  `fedswarm coordinator`'s own options (listen, state_dir, tls_cert, ...)
    [client]       `fedswarm client`'s options
    [sim]          `fedswarm sim`'s own options (clients, data, hosts, ...)

One file can hold every table; each command reads its own and ignores the others'."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import tomllib
from typing import Any

from fedswarm.errors import BadInput
from fedswarm.run_config import RunConfig

READS = {"coordinator": ("run", "coordinator"), "client": ("client",), "sim": ("run", "sim")}
TABLES = ("run", "coordinator", "client", "sim")
_NOT_OPTIONS = {"help", "config"}


class ConfigError(BadInput):
    """A config file that cannot be used; the message names the file and the key."""


def run_setting_names(command: str) -> set[str]:
    """The dests `command` reads from [run] (the RunConfig fields; none for the client, which gets the run's)."""
    if "run" not in READS[command]:
        return set()
    return {f.name for f in dataclasses.fields(RunConfig) if "help" in f.metadata}


def key_of(action: argparse.Action) -> str:
    long = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
    return long.lstrip("-").replace("-", "_")


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's options by config key (help and --config left out)."""
    return {key_of(a): a for a in parser._actions if a.option_strings and a.dest not in _NOT_OPTIONS}


def read(path: str) -> dict[str, dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path} is a folder: pass a TOML file (e.g. run.toml)") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path}: not a TOML file (byte {err.start} is not UTF-8 text)") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config {path}: not valid TOML: {err}") from None
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    for name, table in data.items():
        if name not in TABLES or not isinstance(table, dict):
            raise ConfigError(f"{path}: {name!r} at the top level: put every key under one of the tables "
                              + ", ".join(f"[{t}]" for t in TABLES))
    return data


def _checked(where: str, action: argparse.Action, value: Any) -> Any:
    """`value` as the option would have parsed it; ConfigError naming `where` if it cannot be."""
    if action.nargs == 0:   # a switch (--hosts)
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: expected true or false")
        return value
    kind = action.type or str
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}.get(kind, lambda v: isinstance(v, (str, int, float)))
    if not ok(value):
        names = {int: "an integer", float: "a number", str: "a string"}
        raise ConfigError(f"{where} = {value!r}: expected {names.get(kind, 'a value')}, "
                          f"got {type(value).__name__}")
    value = kind(value)
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where} = {value!r}: choose one of {', '.join(map(str, action.choices))}")
    return value


def values_from(path: str, command: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The file's values for `command` (parser dest -> value); ConfigError on an unknown key or a wrong type."""
    data, opts, run_names = read(path), options(parser), run_setting_names(command)
    values = {}
    for table in READS[command]:
        for key, value in data.get(table, {}).items():
            where = f"{path}: [{table}] {key}"
            action = opts.get(key)
            in_run = action is not None and action.dest in run_names
            if action is None or in_run != (table == "run"):
                allowed = [k for k, a in opts.items() if (a.dest in run_names) == (table == "run")]
                near = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {near[0]}?)" if near else ""
                if action is not None:
                    hint = (" is a run setting: put it under [run]" if in_run else
                            f" is not a run setting: put it under [{command}]")
                    raise ConfigError(f"{where}{hint}")
                raise ConfigError(f"{where}: not a setting of `fedswarm {command}`{hint}; "
                                  f"see `fedswarm {command} --help`")
            values[action.dest] = _checked(where, action, value)
    return values


def apply(parser: argparse.ArgumentParser, command: str, path: str) -> None:
    """Make the file's values `parser`'s defaults, so flags given on the command line still win."""
    values = values_from(path, command, parser)
    for action in parser._actions:
        if action.dest in values:
            action.required = False   # given by the file
    parser.set_defaults(**values)


def config_path(argv: list[str]) -> str | None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    return pre.parse_known_args(argv)[0].config


# ---- fedswarm config show / doc -------------------------------------------------------------------------------

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))   # a JSON string is a TOML basic string


def show(command: str, parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The effective settings (defaults, then --config, then flags) as a TOML file `--config` reads back."""
    run_names = run_setting_names(command)
    tables: dict[str, list[str]] = {t: [] for t in READS[command]}
    for key, action in options(parser).items():
        table = "run" if action.dest in run_names else command
        value = getattr(args, action.dest)
        tables[table].append(f"# {key} = (not set)" if value is None else f"{key} = {_toml_value(value)}")
    lines = [f"# fedswarm {command}: effective settings (defaults < --config < flags)"]
    for table, rows in tables.items():
        lines += ["", f"[{table}]", *rows]
    return "\n".join(lines) + "\n"


def doc(parsers: dict[str, argparse.ArgumentParser]) -> str:
    """docs/SETTINGS.md: every option of every configurable command, from the parsers themselves."""
    out = ["# Settings", "",
           "Generated by `fedswarm config doc` from the commands' own definitions; do not edit by hand.", "",
           "Every option is a flag (`--seq-len 64`) and a key of a `--config FILE.toml` table (`seq_len = 64`).",
           "Flags override the file. `[run]` holds the run's settings (read by `coordinator` and `sim`); each",
           "command's own options go under a table named after it. `fedswarm config show COMMAND --config FILE`",
           "prints the effective settings.", ""]
    seen_run = False
    for command, parser in parsers.items():
        run_names = run_setting_names(command)
        for table in READS[command]:
            if table == "run" and seen_run:
                continue
            seen_run |= table == "run"
            title = "the run's settings (coordinator and sim)" if table == "run" else f"`fedswarm {command}`"
            out += [f"## [{table}]: {title}", "", "| key | flag | default | what it sets |", "|---|---|---|---|"]
            for key, action in options(parser).items():
                if (action.dest in run_names) != (table == "run"):
                    continue
                choices = f" ({' / '.join(map(str, action.choices))})" if action.choices else ""
                text = (action.help or "").replace("|", "\\|").replace("%(default)s", str(action.default))
                default = "not set" if action.default is None else _toml_value(action.default)
                out.append(f"| `{key}` | `{action.option_strings[-1]}` | `{default}` | {text}{choices} |")
            out.append("")
        if "run" in READS[command] and command != "coordinator" and "coordinator" in parsers:
            base = options(parsers["coordinator"])
            own = [f"`{k} = {_toml_value(a.default)}`" for k, a in options(parser).items()
                   if a.dest in run_names and k in base and a.default != base[k].default]
            if own:
                out += [f"`fedswarm {command}` has its own default for: {', '.join(own)}.", ""]
    return "\n".join(out)
