"""Command-line flags: derived from the signatures they set, so a constructor parameter is the whole change.

`flag_parser` makes flat flags from classes with jsonargparse: the parameter's name, its type hint (which checks
the value), its default (shown in `--help`) and its docstring `Args:` line (the help); `**kwargs` passed on to a
base class are followed into it. Yes/no flags take `--cache`, `--no_cache` or `--cache true|false`, every flag
takes hyphens (`--max-epochs`), `--config FILE` loads flags from YAML and `--print_config` prints them. A usage
error is one line on stderr naming the flag, exit code 2. `Parser` is plain argparse with the same one-line
errors, for the small scripts (predict, export, ...). train.py's own: `RunOptions` and `TrainerOptions` (the
flags that are neither the DataModule's nor the model's), `parse_train_flags` and `check_flags`, which refuses what
no type hint can say (missing paths, unknown backbones, the combinations in `project.conflicts`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args

import jsonargparse
import lightning as L
import torch
import yaml
from jsonargparse import Namespace
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveInt
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import SaveConfigCallback

from project.conflicts import conflict
from project.data import ImageDataModule
from project.data.datamodule import HANDED_OVER
from project.data.streaming import METADATA, RECORD, is_streaming_source, is_url, join
from project.models.backbones import check_backbone
from project.models.classifier import Fraction


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


# ------------------------------------------------------------------------------------------------- train.py
DEFAULT_DATAMODULE = "project.data.ImageDataModule"
Accelerator = Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"]
Precision = Literal["auto", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "64-true", "64"]
ACCELERATORS, PRECISIONS = get_args(Accelerator), get_args(Precision)


@dataclass
class RunOptions:
    """What a run does besides the data, the model and the Trainer.

    Args:
        datamodule: the DataModule class, as module.Class importable from the working directory (e.g. your
            ImageDataModule subclass); its own constructor parameters become flags too
        precision: Lightning's precision; auto: bf16-mixed on GPUs that support it, else 32-true
        profiler: Lightning's profiler, its report written into the run folder
        ckpt_path: resume from a checkpoint file, or last: the newest checkpoint of the newest run
        feed_monitor: measure the data wait of every step and say whether data or model is the bottleneck
        freeze_backbone: train only the classification head; the feature extractor is frozen
        unfreeze_at_epoch: with freeze_backbone: unfreeze the feature extractor at this epoch (0-based)
        ema_decay: keep a moving average of the weights, this decay per step (below 1, e.g. 0.999), for
            validation, checkpoints, test, predict and export (0: off)
        early_stopping_patience: stop when val/acc has not improved for this many epochs (0: off)
    """

    datamodule: str = DEFAULT_DATAMODULE
    precision: Precision = "auto"
    profiler: Literal["none", "simple", "advanced", "pytorch"] = "none"
    ckpt_path: str | None = None
    feed_monitor: bool = True
    freeze_backbone: bool = False
    unfreeze_at_epoch: NonNegativeInt | None = None
    ema_decay: Fraction = 0.0
    early_stopping_patience: NonNegativeInt = 0


def resolve_precision(precision: str, accelerator: str) -> str:
    """`auto`: bf16 mixed precision where the GPU supports it (no loss scaling needed), else full fp32."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


@dataclass
class TrainerOptions:
    """The Trainer's arguments that train.py passes on as they are, with train.py's defaults. The types are
    narrower than the Trainer's own hints, which admit values Lightning rejects only once training starts.

    Args:
        accelerator: where to train; auto: a GPU when there is one, else the CPU
        devices: how many devices (or which: 0,1); auto: all of the accelerator's
        strategy: how the devices share the work: auto, ddp, ddp_spawn, fsdp, deepspeed, ...
        num_nodes: machines in a distributed run
        max_epochs: epochs to train
        deterministic: deterministic algorithms only (reproducible on a GPU, slower)
        default_root_dir: where lightning_logs/ (runs, checkpoints) goes
        limit_train_batches: training batches per epoch: a count, or a fraction of them all
        limit_val_batches: validation batches per epoch: a count, or a fraction of them all
        limit_test_batches: test batches: a count, or a fraction of them all
        fast_dev_run: a smoke test of this many batches of training, validation and test, writing no logs (0: off)
        log_every_n_steps: log the training metrics every this many steps
        accumulate_grad_batches: batches whose gradients add up to one optimizer step
        gradient_clip_val: clip the gradients' norm at this value (none: no clipping)
    """

    accelerator: Accelerator = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"
    num_nodes: PositiveInt = 1
    max_epochs: PositiveInt = 3
    deterministic: bool = False
    default_root_dir: str = "."
    # int, not NonNegativeInt, which reads 1.0 (all batches) from a config file as 1 (one batch);
    # check_flags refuses a negative count
    limit_train_batches: int | ClosedUnitInterval = 1.0
    limit_val_batches: int | ClosedUnitInterval = 1.0
    limit_test_batches: int | ClosedUnitInterval = 1.0
    fast_dev_run: NonNegativeInt = 0
    log_every_n_steps: PositiveInt = 10
    accumulate_grad_batches: PositiveInt = 1
    gradient_clip_val: NonNegativeFloat | None = None


NOT_FLAGS = {"collate_fn", *HANDED_OVER, "mean", "std"}  # callables, and the data's statistics


def train_parser(datamodule: type, classes: dict[type, set[str]]) -> FlagParser:
    """train.py's flags: the DataModule's, then those of `classes` (each mapped to the names it leaves out)."""
    return flag_parser(
        "train.py",
        "Train an image classifier (Lightning) on an image folder or a streaming dataset (optimize_data.py). "
        "Flags take hyphens too (--max-epochs), and yes/no flags take --cache, --no-cache or --cache true|false.",
        {datamodule: NOT_FLAGS, **classes},
    )


def load_datamodule_class(path: str) -> type:
    """The DataModule class at `path` (module.Class); the default needs no import from the working directory."""
    if path == DEFAULT_DATAMODULE:
        return ImageDataModule
    cls = import_class(path)
    if not (isinstance(cls, type) and issubclass(cls, L.LightningDataModule)):
        raise UsageError(f"--datamodule {path}: not a LightningDataModule subclass")
    return cls


def datamodule_class(argv: Sequence[str]) -> type:
    """The class `--datamodule` names, in argv or in the `--config` file (read before the parser exists,
    because the class decides which flags there are)."""
    path = DEFAULT_DATAMODULE
    for arg, following in zip(argv, [*argv[1:], None], strict=False):
        if arg.startswith("--datamodule="):
            path = arg.partition("=")[2]
        elif arg == "--datamodule" and following:
            path = following
        elif arg == "--config" and following and Path(following).is_file():
            with contextlib.suppress(yaml.YAMLError, AttributeError):
                path = (yaml.safe_load(Path(following).read_text()) or {}).get("datamodule", path)
    return load_datamodule_class(path)


def parse_train_flags(argv: Sequence[str], classes: dict[type, set[str]]) -> dict[str, Any]:
    """train.py's flags as a flat dict; exits 2 with one line on a flag the parser refuses."""
    values = parse_flags(train_parser(datamodule_class(argv), classes), argv)
    check_flags(values)
    return values


def check_flags(values: dict[str, Any]) -> None:
    """What no type hint can say: paths that must exist, names from registries, flags that need another."""
    data_dir, root = values.get("data_dir"), values["default_root_dir"]
    if data_dir is not None and not is_url(data_dir) and not Path(data_dir).is_dir():
        raise UsageError(f"argument --data_dir: no such folder {data_dir!r}")
    if data_dir is not None and (unfinished := unfinished_write(data_dir)):  # a killed optimize_data.py's
        raise UsageError(unfinished)
    if Path(root).exists() and not Path(root).is_dir():
        raise UsageError(f"argument --default_root_dir: {root!r} is a file, not a folder")
    try:
        check_backbone(values["backbone"])
    except ValueError as error:
        raise UsageError(f"argument --backbone: {error}") from None
    for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        if values[name] < 0:
            raise UsageError(f"argument --{name}: a count of batches or a fraction of them, got {values[name]}")
    check_accelerator(values["accelerator"])
    datamodule = load_datamodule_class(values["datamodule"])
    facts = {
        "streaming": data_dir is not None and is_streaming_source(data_dir),
        "url": data_dir is not None and is_url(data_dir),
        "own_datasets": getattr(datamodule, "datasets", ImageDataModule.datasets) is not ImageDataModule.datasets,
        "cuda": values["accelerator"] != "cpu" and torch.cuda.is_available(),
    }
    if message := conflict({**values, **facts}):
        raise UsageError(message)


def usage_error(error: Exception, names: Sequence[str]) -> UsageError:
    """Lightning's complaint about its arguments (`names`) as a usage error naming the first one it mentions."""
    message = " ".join(str(error).split())
    named = sorted((message.find(name), name) for name in names if name in message)
    return UsageError(f"argument --{named[0][1]}: {message}" if named else message)


def unfinished_write(data_dir: str) -> str | None:
    """One line for a local folder that optimize_data.py has not finished writing (no classes.json), with the
    command that completes it; None for anything else."""
    if is_url(data_dir) or not is_streaming_source(data_dir) or os.path.isfile(join(data_dir, METADATA)):
        return None
    command = None
    if os.path.isfile(join(data_dir, RECORD)):
        with open(join(data_dir, RECORD)) as f:
            command = json.load(f)["command"]
    return (
        f"--data_dir {data_dir}: a streaming dataset that optimize_data.py did not finish writing (no {METADATA}); "
        + (f"complete it with: {command}" if command else "write it again with scripts/optimize_data.py")
    )


def check_accelerator(accelerator: str) -> None:
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        found = "an Apple GPU (use --accelerator mps)" if torch.backends.mps.is_available() else "no CUDA GPU"
        raise UsageError(f"--accelerator {accelerator}: found {found}; use --accelerator cpu or auto")


def save_config(values: dict[str, Any], classes: dict[type, set[str]]) -> list[Callback]:
    """Lightning's callback that writes the flags to `<run folder>/config.yaml`, which `--config` reads back
    to repeat the run; none under fast_dev_run, which has no run folder."""
    if values["fast_dev_run"]:
        return []
    parser = train_parser(load_datamodule_class(values["datamodule"]), classes)
    return [SaveConfigCallback(parser, Namespace(values))]


def check_image_size(model: torch.nn.Module, image_size: int) -> None:
    """One forward pass of a blank image, so a backbone that cannot take `image_size` (inception_v3 needs
    75 px, the ViTs exactly 224) is a usage error now rather than a crash in the first training step."""
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    except (RuntimeError, AssertionError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(
            f"--backbone {model.hparams.backbone} cannot take --image_size {image_size} images ({reason}); "
            "pick an --image_size it accepts, or another --backbone"
        ) from None
    finally:
        model.train()
