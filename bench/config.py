"""Sweep configurations from a TOML file: ``shadowbench latency --config sweep.toml``.

The file holds the command's flags as keys, either at the top level or in a table named after the
command (``[latency]``, ``[kernels]``, ...), so one file can configure several commands. Keys are the
long flag names with ``-`` or ``_`` (``batch-rule`` or ``batch_rule``); a list is a comma-separated
value (``sparsity = [0.3, 0.5, 0.7]``), ``true`` turns a switch on. Flags given on the command line
win over the file. An unknown key, or a value of the wrong type, is an error that names the file,
the key and what the command accepts. Example (``benchmarks/sweep-opt.toml``)::

    [latency]
    models = ["opt-1.3b", "opt-13b"]
    modes = ["dense", "static", "shadowllm"]
    sparsity = [0.5, 0.7]
    gen = [128]
    out = "runs/latency.jsonl"
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _flags(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long option name without dashes -> action, for every option of a sub-command but --config."""
    out = {}
    for action in sub._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and opt != "--config":
                out[opt[2:]] = action
    return out


def load_config(path: str | Path, command: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the tomli package (a dependency there)
        import tomli as tomllib  # type: ignore[no-redef]

    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--config: {str(path)!r} is not a file")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SystemExit(f"--config: {path} is not valid TOML: {err}") from None
    tables = {k for k, v in data.items() if isinstance(v, dict)}
    if command in tables:
        return data[command]
    if tables:
        raise SystemExit(f"--config: {path} has tables {sorted(tables)} but none for {command!r}")
    return data


def config_argv(sub: argparse.ArgumentParser, command: str, path: str | Path) -> list[str]:
    """The flags a config file stands for, as command-line words (they go before the real flags)."""
    flags = _flags(sub)
    argv: list[str] = []
    for key, value in load_config(path, command).items():
        name = str(key).replace("_", "-")
        action = flags.get(name)
        if action is None:
            raise SystemExit(f"--config: {path}: unknown key {key!r} for `shadowbench {command}`; "
                             f"known: {', '.join(sorted(flags))}")
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise SystemExit(f"--config: {path}: {key} is a switch; expected true or false, got {value!r}")
            if value == isinstance(action, argparse._StoreTrueAction):
                argv.append(f"--{name}")
            continue
        if isinstance(value, (dict, bool)):
            raise SystemExit(f"--config: {path}: {key} expects a value or a list, got {value!r}")
        text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
        argv += [f"--{name}", text]
    return argv


def expand(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with the flags of its ``--config`` file inserted after the command name."""
    choices = parser._subparsers._group_actions[0].choices
    words = list(argv)
    i = next((j for j, w in enumerate(words) if w in choices), None)
    if i is None:
        return words
    path = None
    for j, w in enumerate(words[i + 1:], start=i + 1):
        if w == "--config" and j + 1 < len(words):
            path = words[j + 1]
        elif w.startswith("--config="):
            path = w.split("=", 1)[1]
    if path is None:
        return words
    return words[: i + 1] + config_argv(choices[words[i]], words[i], path) + words[i + 1:]
