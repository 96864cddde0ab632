"""Command-line flags: derived from the signatures they set, so a constructor parameter is the whole change.

`flag_parser` turns classes (the DataModule, `ImageClassifier`, the run's own options) and a few Trainer
arguments into flat flags: the name is the parameter's, the type hint checks the value, the default is
shown in `--help` and the `Args:` line of the docstring is the help (jsonargparse reads all three). A
name that several classes take (`seed`, `channels_last`) is one flag that sets all of them.
`--config FILE` loads flags from YAML (flags typed after it win); `--print_config` prints them.
Every usage error is one line on stderr naming the flag, exit code 2, no traceback.

`Parser` is plain argparse with the same one-line errors, for the small scripts (predict, export, ...).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import jsonargparse
import yaml

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = ("auto", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "64-true", "64")
BOOLEAN_WORDS = {"true", "false", "yes", "no", "null", "none", "1", "0", "on", "off"}


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
    """jsonargparse's parser (flags from signatures and docstrings) with one-line errors."""

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


def is_switch(annotation: Any) -> bool:
    """Whether a parameter is a yes/no flag (bool, or bool | None)."""
    return annotation is bool or (set(typing.get_args(annotation)) - {type(None)} == {bool})


def constructors(cls: type) -> list[Any]:
    """`cls.__init__` and, while it passes `**kwargs` on, its bases' (as jsonargparse follows them)."""
    found = []
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and klass is not object:
            found.append(klass.__init__)
            if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(klass.__init__).parameters.values()):
                break
    return found


def parameters(cls: type) -> set[str]:
    """The keyword names `cls(...)` takes, through `**kwargs` passed on to its base classes."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        name
        for init in constructors(cls)
        for name, p in inspect.signature(init).parameters.items()
        if p.kind in kinds and name != "self"
    }


def switches(classes: Iterable[type]) -> set[str]:
    """The yes/no flags among the constructors' parameters."""
    return {
        name
        for cls in classes
        for init in constructors(cls)
        for name, hint in typing.get_type_hints(init).items()
        if name != "return" and is_switch(hint)
    }


def normalize_argv(argv: Sequence[str], switch_names: set[str]) -> list[str]:
    """Accept the spellings people type: `--max-epochs` for `--max_epochs`, and for yes/no flags
    `--cache` / `--no-cache` beside jsonargparse's own `--cache true|false`."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if not arg.startswith("--") or arg == "--":
            out.append(arg)
            continue
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        negated = name.startswith("no_") and name[3:] in switch_names
        if negated:
            out.append(f"--{name[3:]}=false")
        elif name in switch_names and not eq:
            following = argv[i + 1].lower() if i + 1 < len(argv) else ""
            out.append(f"--{name}" if following in BOOLEAN_WORDS else f"--{name}=true")
        else:
            out.append(f"--{name}{eq}{value}")
    return out


def flag_parser(prog: str, description: str, classes: Sequence[type], skip: dict[type, set[str]]) -> FlagParser:
    """Flat flags from the constructors of `classes`, leaving out the names in `skip[cls]`; a name seen in
    an earlier class is not added again (one flag sets every constructor that takes it)."""
    parser = FlagParser(prog=prog, description=description)
    parser.add_argument("--config", action=jsonargparse.ActionConfigFile, help="YAML file of flags, e.g. a run's")
    seen: set[str] = set()
    for cls in classes:
        parser.add_class_arguments(cls, nested_key=None, skip=skip.get(cls, set()) | seen, sub_configs=False)
        seen |= parameters(cls)
    return parser


def plain(value: Any) -> Any:
    """Builtin types only (jsonargparse's restricted numbers are int / float subclasses), so the values can
    become hyperparameters that `torch.load(weights_only=True)` reads."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def parse_flags(parser: FlagParser, argv: Sequence[str], switch_names: set[str]) -> dict[str, Any]:
    """The flags as a flat dict of builtin values (without `config`)."""
    namespace = parser.parse_args(normalize_argv(argv, switch_names))
    values = namespace.as_dict()
    values.pop("config", None)
    values.pop("__path__", None)
    return {key: plain(value) for key, value in values.items()}


def kwargs_for(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The flags that `cls`'s constructor takes."""
    names = parameters(cls)
    return {key: value for key, value in values.items() if key in names}


def to_yaml(values: dict[str, Any]) -> str:
    """The resolved flags as YAML that `--config` reads back."""
    return yaml.safe_dump({key: plain(value) for key, value in values.items()}, sort_keys=False)
