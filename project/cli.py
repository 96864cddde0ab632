"""Command-line flags for the scripts: flat, named exactly like the Lightning / DataLoader keyword they set.

`--config run.yaml` loads flags from a file (flags given on the command line win); every run saves
its resolved flags as `config.yaml` in its run folder, so `--config <run>/config.yaml` repeats it.
Usage errors are one line on stderr naming the flag, and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.strategies import StrategyRegistry

from project.data.datamodule import AUGMENT_ON, SAMPLERS
from project.models.backbones import available_backbones
from project.models.classifier import OPTIMIZERS

PRECISIONS = ("auto", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "64-true", "64")
PROFILERS = ("none", "simple", "advanced", "pytorch")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


class UsageError(Exception):
    """A problem with the user's flags, paths or data layout: reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, and whose --help shows every default."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_or_float(text: str) -> int | float:
    """Lightning's convention for limits: an int counts batches, a float is a fraction."""
    return float(text) if any(c in text for c in ".eE") else int(text)


def devices_type(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


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


def workers_type(text: str) -> int | str:
    """`auto` (a measured choice, see `project.feed.throughput`) or a worker count >= 0."""
    if text == "auto":
        return text
    try:
        return non_negative_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer >= 0, got {text!r}") from None


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def train_parser() -> Parser:
    p = Parser(prog="train.py", description="Train an image classifier (Lightning) on an image folder.")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML file of flags (e.g. a run's config.yaml); command-line flags override it",
    )

    g = p.add_argument_group("data")
    g.add_argument(
        "--data_dir",
        "--data-dir",
        type=Path,
        default=None,
        help="data_dir/train/<class>/*, optional val/ and test/; default: the built-in shapes dataset",
    )
    g.add_argument("--image_size", "--image-size", type=positive_int, default=64, help="training side in pixels")
    g.add_argument("--batch_size", "--batch-size", type=positive_int, default=32, help="images per batch (per device)")
    g.add_argument(
        "--num_workers",
        "--num-workers",
        type=workers_type,
        default=2,
        help="DataLoader worker processes, or auto: a short measured sweep picks the count",
    )
    g.add_argument(
        "--drop_last",
        "--drop-last",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="drop the last incomplete training batch",
    )
    g.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True, help="shuffle training data")
    g.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="random",
        help="balanced: class-balanced weighted sampling with replacement",
    )
    g.add_argument(
        "--pin_memory",
        "--pin-memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on when training on a CUDA device",
    )
    g.add_argument(
        "--persistent_workers",
        "--persistent-workers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep workers alive between epochs",
    )
    g.add_argument(
        "--prefetch_factor",
        "--prefetch-factor",
        type=positive_int,
        default=None,
        help="batches each worker loads ahead (PyTorch's default: 2)",
    )
    g.add_argument("--rotation", type=float, default=15.0, help="random rotation range in degrees (0: off)")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flips")
    g.add_argument(
        "--augment_on",
        "--augment-on",
        choices=AUGMENT_ON,
        default="auto",
        help="where augmentation runs; auto: on the device when it is not the CPU",
    )
    g.add_argument(
        "--cache",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="decode and resize every image once into a uint8 store at --image_size; later epochs "
        "and runs read memory (rebuilt when the files, --image_size or the split change)",
    )
    g.add_argument(
        "--cache_dir",
        "--cache-dir",
        type=Path,
        default=None,
        help="where --cache writes; default: data/cache/<dataset name>-<path hash>",
    )
    g.add_argument(
        "--val_fraction",
        "--val-fraction",
        type=fraction,
        default=0.1,
        help="share of train/ held out (stratified, seeded) when there is no val/",
    )
    g.add_argument(
        "--skip_bad_images",
        "--skip-bad-images",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="replace unreadable (corrupt, truncated) images by the next readable one, count and "
        "report them; default: stop with an error naming the file",
    )
    g.add_argument(
        "--max_bad_fraction",
        "--max-bad-fraction",
        type=float,
        default=0.01,
        help="with --skip_bad_images: stop once more than this share of the images is unreadable",
    )
    g.add_argument(
        "--loader_timeout",
        "--loader-timeout",
        type=float,
        default=0.0,
        help="seconds a DataLoader worker may spend on one batch before the run stops "
        "(0: no limit; with --num_workers > 0)",
    )

    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="simple_cnn", help="simple_cnn, resnet18, mobilenet_v3_small, ...")
    g.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="start from ImageNet weights (downloads them; fails clearly offline)",
    )
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="adamw, or sgd with Nesterov momentum")
    g.add_argument("--lr", type=float, default=5e-3, help="peak learning rate")
    g.add_argument(
        "--weight_decay",
        "--weight-decay",
        type=float,
        default=0.05,
        help="decoupled weight decay (not on biases and norm weights)",
    )
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument(
        "--warmup_epochs", "--warmup-epochs", type=float, default=0.5, help="linear warm-up before the cosine decay"
    )
    g.add_argument(
        "--label_smoothing", "--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing"
    )
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the backbone (pays off on GPUs for long runs; the first steps compile)",
    )
    g.add_argument(
        "--channels_last",
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="NHWC memory format for weights and batches (faster convolutions on tensor-core GPUs)",
    )
    g.add_argument(
        "--freeze_backbone",
        "--freeze-backbone",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train only the classification head; the feature extractor is frozen",
    )
    g.add_argument(
        "--unfreeze_at_epoch",
        "--unfreeze-at-epoch",
        type=non_negative_int,
        default=None,
        help="with --freeze_backbone: unfreeze the feature extractor at this epoch (0-based)",
    )

    g = p.add_argument_group("trainer")
    g.add_argument("--accelerator", choices=ACCELERATORS, default="auto", help="cpu, gpu, ... or auto")
    g.add_argument("--devices", type=devices_type, default="auto", help="a count, 'auto', or indices '0,1'")
    g.add_argument("--strategy", default="auto", help="auto, ddp, ddp_spawn, fsdp, ...")
    g.add_argument(
        "--num_nodes", "--num-nodes", type=positive_int, default=1, help="machines, each with --devices devices"
    )
    g.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help="auto: bf16-mixed on GPUs that support it, else 32-true"
    )
    g.add_argument("--max_epochs", "--max-epochs", type=positive_int, default=3, help="training epochs")
    g.add_argument("--profiler", choices=PROFILERS, default="none", help="report written into the run folder")
    g.add_argument("--seed", type=int, default=0, help="seeds torch, numpy, python and the workers")
    g.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="deterministic algorithms (bit-identical reruns on CPU)",
    )
    g.add_argument(
        "--ckpt_path",
        "--ckpt-path",
        default=None,
        help="resume from a checkpoint file, or 'last': newest checkpoint of the newest run",
    )
    g.add_argument(
        "--default_root_dir",
        "--default-root-dir",
        type=Path,
        default=Path("."),
        help="runs go to <default_root_dir>/lightning_logs/version_N",
    )
    g.add_argument(
        "--limit_train_batches",
        "--limit-train-batches",
        type=int_or_float,
        default=1.0,
        help="int: batches per epoch; float: fraction",
    )
    g.add_argument(
        "--limit_val_batches",
        "--limit-val-batches",
        type=int_or_float,
        default=1.0,
        help="int: batches per validation; float: fraction",
    )
    g.add_argument(
        "--limit_test_batches",
        "--limit-test-batches",
        type=int_or_float,
        default=1.0,
        help="int: test batches; float: fraction",
    )
    g.add_argument(
        "--fast_dev_run",
        "--fast-dev-run",
        type=non_negative_int,
        default=0,
        help="run N batches of train/val/test as a smoke test (no checkpoints)",
    )
    g.add_argument(
        "--log_every_n_steps",
        "--log-every-n-steps",
        type=positive_int,
        default=10,
        help="steps between logged training scalars",
    )
    g.add_argument(
        "--accumulate_grad_batches",
        "--accumulate-grad-batches",
        type=positive_int,
        default=1,
        help="sum gradients over this many batches per optimizer step",
    )
    g.add_argument(
        "--gradient_clip_val", "--gradient-clip-val", type=float, default=None, help="clip gradients to this norm"
    )
    g.add_argument(
        "--feed_monitor",
        "--feed-monitor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the data wait of every step and say whether data or model is the bottleneck",
    )
    return p


def load_config(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Flags from a YAML mapping, checked against the parser's flags and converted by their types."""
    if not path.is_file():
        parser.error(f"argument --config: no such file {str(path)!r}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        parser.error(f"argument --config: {str(path)!r} is not valid YAML ({str(error).splitlines()[0]})")
    if not isinstance(values, dict):
        parser.error(f"argument --config: {str(path)!r} must hold a mapping of flag: value")
    actions = {a.dest: a for a in parser._actions}
    config = {}
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if key not in actions or key in ("config", "help"):
            parser.error(f"argument --config: unknown flag {key!r} in {str(path)!r}")
        action = actions[key]
        if value is not None and action.type is not None and not isinstance(value, bool):
            try:
                value = action.type(str(value))
            except (ValueError, argparse.ArgumentTypeError) as error:
                parser.error(f"argument --{key} (from {str(path)!r}): {error}")
        if action.choices is not None and value not in action.choices:
            parser.error(f"argument --{key} (from {str(path)!r}): {value!r} is not one of {list(action.choices)}")
        config[key] = value
    return config


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `argv`, with defaults taken from `--config FILE` when given. Exits 2 on a usage error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first, _ = parser.parse_known_args(argv)
    if getattr(first, "config", None) is not None:
        parser.set_defaults(**load_config(first.config, parser))
    args = parser.parse_args(argv)
    check_args(args, parser)
    return args


def _limit(value: Any) -> bool:
    return value >= 0 if isinstance(value, int) else 0.0 <= value <= 1.0


# flag -> (accepts the value, what would work); checked only for the flags a parser has
RANGES: dict[str, tuple[Any, str]] = {
    "lr": (lambda v: v > 0, "must be > 0"),
    "weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "momentum": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "warmup_epochs": (lambda v: v >= 0, "must be >= 0"),
    "label_smoothing": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "rotation": (lambda v: 0 <= v <= 180, "must be in [0, 180] degrees"),
    "gradient_clip_val": (lambda v: v >= 0, "must be >= 0"),
    "max_bad_fraction": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "loader_timeout": (lambda v: v >= 0, "must be >= 0 seconds (0: no limit)"),
    "seed": (lambda v: 0 <= v <= 2**32 - 1, "must be in [0, 2**32 - 1]"),
    "limit_train_batches": (_limit, "must be an int >= 0 (batches) or a float in [0, 1] (a fraction)"),
    "limit_val_batches": (_limit, "must be an int >= 0 (batches) or a float in [0, 1] (a fraction)"),
    "limit_test_batches": (_limit, "must be an int >= 0 (batches) or a float in [0, 1] (a fraction)"),
}


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Checks argparse cannot do per flag: ranges, paths that must exist, names from registries.

    Runs on the final values, so flags from `--config` are checked like those typed; a failure is
    `parser.error`: one line naming the flag, exit code 2, before any work starts.
    """
    values = vars(args)

    def fail(flag: str, message: str) -> None:
        parser.error(f"argument --{flag}: {message}")

    for flag, (accepts, expected) in RANGES.items():
        value = values.get(flag)
        if value is None or isinstance(value, bool):
            continue
        if (isinstance(value, float) and not math.isfinite(value)) or not accepts(value):
            fail(flag, f"{expected}, got {value}")

    data_dir = values.get("data_dir")
    if data_dir is not None and not Path(data_dir).is_dir():
        fail("data_dir", f"no such folder {str(data_dir)!r}")
    ckpt_path = values.get("ckpt_path")
    if ckpt_path is not None and ckpt_path != "last" and not Path(ckpt_path).is_file():
        fail("ckpt_path", f"no such checkpoint file {str(ckpt_path)!r}; give a .ckpt file, or 'last' for the newest")
    root = values.get("default_root_dir")
    if root is not None and Path(root).exists() and not Path(root).is_dir():
        fail("default_root_dir", f"{str(root)!r} is a file, not a folder")

    devices = values.get("devices")
    if isinstance(devices, int) and devices < 1 and devices != -1:
        fail("devices", f"must be a count >= 1, -1 (all), 'auto' or indices like 0,1; got {devices}")
    if isinstance(devices, str) and devices != "auto" and not re.fullmatch(r"\d+(,\d+)*,?", devices):
        fail("devices", f"must be a count >= 1, -1 (all), 'auto' or indices like 0,1; got {devices!r}")
    strategy = values.get("strategy")
    if strategy is not None:
        known = ["auto", *StrategyRegistry.available_strategies()]
        if strategy not in known:
            fail("strategy", f"unknown strategy {strategy!r}; choose one of {', '.join(known[:8])}, ...")
    backbone = values.get("backbone")
    if backbone is not None and backbone not in available_backbones():
        fail("backbone", f"unknown backbone {backbone!r}; choose simple_cnn, resnet18, mobilenet_v3_small, ...")


def to_yaml(args: argparse.Namespace) -> str:
    """The resolved flags as YAML that `--config` reads back (paths as strings)."""
    values = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "config"}
    return yaml.safe_dump(values, sort_keys=False)
