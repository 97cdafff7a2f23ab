"""The run scripts' flags: dataclass fields as flags (Hugging Face's HfArgumentParser), a `--config` YAML that
supplies defaults, and flags that override it; bad input is one line (`lorpa.errors.InputError`)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from ..cli import raise_input_error
from ..errors import InputError


def _read_yaml(path: str) -> dict:
    config_path = Path(path)
    if not config_path.is_file():
        raise InputError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise InputError(f"config file {path} is not valid YAML{where}: {problem}") from error
    if not isinstance(values, dict):
        raise InputError(f"config file {path} must hold a mapping of flag names to values")
    return values


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when its help text does not already speak of one, and never `None`."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def _help_group(dtype):
    """A subclass that only gives the dataclass's flags a titled group in --help (HfArgumentParser reads
    `_argument_group_name`); the values are still parsed into `dtype` itself."""
    title = getattr(dtype, "_argument_group_name", None)
    if title is None:
        title = f"{dtype.__name__} (transformers' Trainer flags; see the transformers documentation)"
    return type(dtype.__name__, (dtype,), {"_argument_group_name": title})


def build_parser(dataclass_types, description: str | None = None, defaults=None) -> HfArgumentParser:
    """The parser of a run script: `--config` first in --help, then the project's flag groups, then the Trainer's."""
    in_help_order = sorted(dataclass_types, key=lambda t: (t.__module__.startswith("transformers"),
                                                           not getattr(t, "_help_first", False)))
    parser = HfArgumentParser(
        [_help_group(t) for t in in_help_order], description=description, formatter_class=HelpFormatter,
        usage="%(prog)s [--config FILE.yaml] [--flag value ...]   (flags override the config; -h lists them)",
    )
    parser.error = raise_input_error  # argparse would print the whole (very long) usage first
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="YAML file of flag values; flags given here override it")
    parser.set_defaults(**(defaults or {}))
    return parser


def parse_args(dataclass_types, argv: list[str] | None = None, description: str | None = None, defaults=None):
    """Parse dataclass arguments where `--config FILE.yaml` supplies defaults and flags override them.

    Every YAML key must be a flag of the script; an unknown key is an error that names it. A flag of a group that a
    dataclass declares exclusive (`_one_of`: one budget, say) replaces the config's value of every flag of its
    group, so a budget given on the command line never meets the config's. Every number must be finite.
    `defaults` replaces dataclass defaults (YAML and flags still override them).
    Returns one instance per dataclass type, then the config path (or None).
    """
    parser = build_parser(dataclass_types, description, defaults)
    # A config file can supply any flag, so nothing is required on the command line; checked below instead.
    required = [action for action in parser._actions if action.required]
    for action in required:
        action.required = False
    argv = sys.argv[1:] if argv is None else list(argv)
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--config", default=None)
    config_path = pre_parser.parse_known_args(argv)[0].config
    if config_path is not None:
        values = _read_yaml(config_path)
        actions = {action.dest: action for action in parser._actions}
        unknown = sorted(set(values) - set(actions) - {"config"})
        if unknown:
            raise InputError(f"unknown key(s) in {config_path}: {', '.join(unknown)}")
        given = {action.dest for action in parser._actions for option in action.option_strings
                 if any(arg == option or arg.startswith(option + "=") for arg in argv)}
        for group in (group for dtype in dataclass_types for group in getattr(dtype, "_one_of", ())):
            replaced = sorted(key for key in set(group) & set(values) - given if values[key] is not None)
            if given & set(group) and replaced:
                print(f"--{', --'.join(sorted(given & set(group)))} replaces {config_path}'s "
                      f"{', '.join(f'{key}: {values.pop(key)}' for key in replaced)}")
        for key, value in values.items():
            if actions[key].nargs in ("+", "*") and not isinstance(value, list):
                value = [value]  # `lora_target_modules: all-linear` means the list the flag would give
            actions[key].default = value
    namespace, remaining = parser.parse_known_args(argv)
    if remaining:
        raise InputError(f"unrecognized argument(s): {' '.join(remaining)}")
    for key, value in vars(namespace).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"--{key} must be a finite number, got {value}")
    missing = [action.option_strings[0] for action in required if getattr(namespace, action.dest) is None]
    if missing:
        raise InputError(f"missing {', '.join(missing)}: give it on the command line or in the --config file")
    outputs = []
    for dtype in dataclass_types:
        keys = {f.name for f in dataclasses.fields(dtype) if f.init}
        try:
            outputs.append(dtype(**{k: v for k, v in vars(namespace).items() if k in keys}))
        except ValueError as error:
            raise InputError(str(error).strip().splitlines()[0]) from error
    return (*outputs, config_path)
