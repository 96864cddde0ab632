"""Command-line flags: derived from the signatures they set, so a constructor parameter is the whole change.

`flag_parser` makes flat flags from classes with jsonargparse: the parameter's name, its type hint (which checks
the value), its default (shown in `--help`) and its docstring `Args:` line (the help); `**kwargs` passed on to a
base class are followed into it. Yes/no flags take `--cache`, `--no_cache` or `--cache true|false`, every flag
takes hyphens (`--max-epochs`), `--config FILE` loads flags from YAML and `--print_config` prints them. A usage
error is one line on stderr naming the flag, exit code 2. `Parser` is plain argparse with the same one-line
errors, for the small scripts (predict, export, ...).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args

import jsonargparse
import yaml

Accelerator = Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"]
Precision = Literal["auto", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "64-true", "64"]
ACCELERATORS = get_args(Accelerator)
PRECISIONS = get_args(Precision)


class UsageError(Exception):
    """A problem with the user's flags, paths or data layout: reported as one line, exit code 2."""


def one_line(message: str) -> str:
    """A parser's (often multi-line) complaint as one line: `argument --flag: what is wrong, given value`."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    key = re.match(r'Parser key "([^"]+)":\s*(.*)$', lines[0]) if lines else None
    if key is None:
        return " ".join(lines) or "invalid arguments"
    noise = ("For further", "Subtypes:", "Errors:", "- ", "Given value type:")
    detail = [key.group(2), *(line for line in lines[1:] if not line.startswith(noise))]
    return f"argument --{key.group(1)}: " + "; ".join(line for line in detail if line)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, and whose --help shows every default."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


class FlagParser(jsonargparse.ArgumentParser):
    """jsonargparse's parser (flags from signatures and docstrings) with yes/no switches and one-line errors."""

    def add_argument(self, *args: Any, **kwargs: Any) -> Any:
        # jsonargparse copies this method into its argument groups, where the class arguments land
        if kwargs.get("type") is bool:  # --cache, --no_cache, --cache true|false
            kwargs.pop("type")
            kwargs.update(action=jsonargparse.ActionYesNo, nargs="?")
        return super().add_argument(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:  # type: ignore[override]
        print(f"{self.prog}: error: {one_line(message)} (see --help)", file=sys.stderr)
        sys.exit(2)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def import_class(path: str) -> type:
    """`package.module.Class` (or `module:Class`), importable from the working directory."""
    module_name, _, name = path.replace(":", ".").rpartition(".")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # scripts/ is on the path, the user's own modules are here
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise UsageError(f"cannot import {path!r} ({error}); give module.Class, importable from here") from None


def flag_parser(prog: str, description: str, classes: dict[type, set[str]]) -> FlagParser:
    """Flat flags from the constructors of `classes`, each mapped to the parameter names it leaves out; a name
    an earlier class added is not added again (one flag sets every constructor that takes it)."""
    parser = FlagParser(prog=prog, description=description)
    parser.add_argument("--config", action=jsonargparse.ActionConfigFile, help="YAML file of flags, e.g. a run's")
    added: set[str] = set()
    for cls, skip in classes.items():
        added.update(parser.add_class_arguments(cls, nested_key=None, skip=skip | added))
    return parser


@functools.cache
def parameters(cls: type) -> frozenset[str]:
    """The keyword names `cls(...)` takes, through `**kwargs` passed on to its base classes."""
    return frozenset(jsonargparse.ArgumentParser().add_class_arguments(cls, nested_key=None, fail_untyped=False))


def kwargs_for(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The flags that `cls`'s constructor takes."""
    return {key: value for key, value in values.items() if key in parameters(cls)}


def parse_flags(parser: FlagParser, argv: Sequence[str]) -> dict[str, Any]:
    """The flags as a flat dict of builtin values, as the parser writes them to a config file (so they can
    become hyperparameters that `torch.load(weights_only=True)` reads); `--max-epochs` reads as `--max_epochs`."""
    argv = [re.sub(r"^--[^=]+", lambda m: "--" + m[0][2:].replace("-", "_"), arg) for arg in argv]
    return yaml.safe_load(parser.dump(parser.parse_args(argv), skip_unset=False))
