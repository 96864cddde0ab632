"""One training run from parsed flags: DataModule + ImageClassifier + Trainer, fit, test, summary."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import docstring_parser
import lightning as L
import torch
import yaml
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveInt
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.profilers import AdvancedProfiler, PyTorchProfiler, SimpleProfiler

from project.callbacks import (
    AugmentedBatchGrid,
    BadImageMonitor,
    ConfusionMatrixLogger,
    DataFeedMonitor,
    FreezeBackbone,
    HparamsSummary,
    InterruptCheckpoint,
    MispredictionLogger,
    ModelGraphLogger,
    NonFiniteLossGuard,
)
from project.cli import (
    FlagParser,
    UsageError,
    flag_parser,
    import_class,
    is_switch,
    kwargs_for,
    parse_flags,
    switches,
    to_yaml,
)
from project.data import ImageDataModule
from project.data.streaming import is_url
from project.feed.throughput import auto_num_workers
from project.models import ImageClassifier, available_backbones
from project.runtime.checkpoints import AtomicCheckpointIO, check_resumable, model_checkpoint, resolve_ckpt_path
from project.runtime.console import configure_console
from project.runtime.faults import clear_failures

LOGS = "lightning_logs"
# the bar reads its values (a host sync on a GPU) at each refresh: every 10 steps keeps syncs off most steps
PROGRESS_REFRESH_STEPS = 10
# per-step values the bar shows: logged without prog_bar, read by StepMetricsBar at its refreshes
BAR_METRICS = ("train/loss", "data_wait")
PROFILERS = {"simple": SimpleProfiler, "advanced": AdvancedProfiler, "pytorch": PyTorchProfiler}
# The Trainer arguments train.py exposes: (the type that checks the flag, train.py's default). The types are
# narrower than the Trainer's own hints, which admit values Lightning rejects only once training starts.
TRAINER_FLAGS: dict[str, tuple[Any, Any]] = {
    "accelerator": (Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"], "auto"),
    "devices": (int | str, "auto"),
    "strategy": (str, "auto"),
    "num_nodes": (PositiveInt, 1),
    "max_epochs": (PositiveInt, 3),
    "deterministic": (bool, False),
    "default_root_dir": (str, "."),
    "limit_train_batches": (NonNegativeInt | ClosedUnitInterval, 1.0),
    "limit_val_batches": (NonNegativeInt | ClosedUnitInterval, 1.0),
    "limit_test_batches": (NonNegativeInt | ClosedUnitInterval, 1.0),
    "fast_dev_run": (NonNegativeInt, 0),
    "log_every_n_steps": (PositiveInt, 10),
    "accumulate_grad_batches": (PositiveInt, 1),
    "gradient_clip_val": (NonNegativeFloat | None, None),
}


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
    """

    datamodule: str = "project.data.ImageDataModule"
    precision: Literal["auto", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "64-true", "64"] = "auto"
    profiler: Literal["none", "simple", "advanced", "pytorch"] = "none"
    ckpt_path: str | None = None
    feed_monitor: bool = True
    freeze_backbone: bool = False
    unfreeze_at_epoch: NonNegativeInt | None = None


# set from the data, not from flags
FROM_DATA = {"num_classes", "class_names", "image_size", "mean", "std"}


def train_parser(datamodule_class: type = ImageDataModule) -> FlagParser:
    """train.py's flags: the DataModule's, ImageClassifier's, RunOptions' and TRAINER_FLAGS."""
    skip = {datamodule_class: {"collate_fn", "predict_paths", "mean", "std"}, ImageClassifier: FROM_DATA}
    parser = flag_parser(
        "train.py",
        "Train an image classifier (Lightning) on an image folder or a streaming dataset (optimize_data.py). "
        "Flags take hyphens too (--max-epochs), "
        "and yes/no flags take --cache, --no-cache or --cache true|false.",
        [datamodule_class, ImageClassifier, RunOptions],
        skip,
    )
    # the Trainer's own help, its first sentence (the rest speaks of the Trainer's defaults, not train.py's)
    docs = {
        p.arg_name: re.split(r"(?<=\.)\s", p.description or "")[0]
        for p in docstring_parser.parse(L.Trainer.__init__.__doc__ or "").params
    }
    for name, (hint, default) in TRAINER_FLAGS.items():
        parser.add_argument(f"--{name}", type=hint, default=default, help=docs.get(name))
    return parser


def datamodule_class(argv: Sequence[str]) -> type:
    """The class `--datamodule` names, in argv or in the `--config` file (read before the parser exists,
    because the class decides which flags there are)."""
    path = RunOptions.datamodule
    for i, arg in enumerate(argv):
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--datamodule" and following:
            path = following
        elif arg.startswith("--datamodule="):
            path = arg.partition("=")[2]
        elif arg == "--config" and following and Path(following).is_file():
            with contextlib.suppress(yaml.YAMLError, AttributeError):
                path = (yaml.safe_load(Path(following).read_text()) or {}).get("datamodule", path)
    return load_datamodule_class(path)


def load_datamodule_class(path: str) -> type:
    """The DataModule class at `path` (module.Class); the default needs no import from the working directory."""
    if path == RunOptions.datamodule:
        return ImageDataModule
    cls = import_class(path)
    if not (isinstance(cls, type) and issubclass(cls, L.LightningDataModule)):
        raise UsageError(f"--datamodule {path}: not a LightningDataModule subclass")
    return cls


def parse_train_flags(argv: Sequence[str]) -> dict[str, Any]:
    """train.py's flags as a flat dict; exits 2 with one line on a flag the parser refuses."""
    cls = datamodule_class(argv)
    trainer_switches = {name for name, (hint, _) in TRAINER_FLAGS.items() if is_switch(hint)}
    values = parse_flags(train_parser(cls), argv, switches([cls, ImageClassifier, RunOptions]) | trainer_switches)
    check_flags(values)
    return values


def check_flags(values: dict[str, Any]) -> None:
    """What no type hint can say: paths that must exist, names from registries, flags that need another."""
    data_dir, root = values.get("data_dir"), values["default_root_dir"]
    if data_dir is not None and not is_url(data_dir) and not Path(data_dir).is_dir():
        raise UsageError(f"argument --data_dir: no such folder {data_dir!r}")
    if Path(root).exists() and not Path(root).is_dir():
        raise UsageError(f"argument --default_root_dir: {root!r} is a file, not a folder")
    if values["backbone"] not in available_backbones():
        raise UsageError(
            f"argument --backbone: unknown backbone {values['backbone']!r}; choose simple_cnn, resnet18, "
            f"mobilenet_v3_small, ... (all: {', '.join(available_backbones())})"
        )
    if values["unfreeze_at_epoch"] is not None and not values["freeze_backbone"]:
        raise UsageError(
            f"--unfreeze_at_epoch {values['unfreeze_at_epoch']} needs --freeze_backbone (nothing is frozen)"
        )
    check_accelerator(values["accelerator"])
    if values.get("decode_on") == "device" and (values["accelerator"] == "cpu" or not torch.cuda.is_available()):
        raise UsageError(
            "--decode_on device: JPEGs are decoded with nvJPEG on a CUDA GPU, and none is in use; use --decode_on cpu"
        )


class SaveConfig(Callback):
    """Write the run's resolved flags to `<run folder>/config.yaml` (rank 0 only)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.text = to_yaml(values)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir  # on every rank: under DDP it is a broadcast, a collective call
        if trainer.is_global_zero and stage == "fit" and log_dir:
            path = Path(log_dir) / "config.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.text)


def resolve_precision(precision: str, accelerator: str) -> str:
    """`auto`: bf16 mixed precision where the GPU supports it (no loss scaling needed), else full fp32."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def check_accelerator(accelerator: str) -> None:
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        found = "an Apple GPU (use --accelerator mps)" if torch.backends.mps.is_available() else "no CUDA GPU"
        raise UsageError(f"--accelerator {accelerator}: found {found}; use --accelerator cpu or auto")


def build_datamodule(values: dict[str, Any]) -> L.LightningDataModule:
    cls = load_datamodule_class(values.get("datamodule", RunOptions.datamodule))
    return cls(**kwargs_for(cls, values))  # num_workers auto: the DataModule's stand-in until the sweep


def build_model(values: dict[str, Any], datamodule: L.LightningDataModule) -> ImageClassifier:
    classes = list(datamodule.classes)
    kwargs = {k: v for k, v in kwargs_for(ImageClassifier, values).items() if k not in FROM_DATA}
    model = ImageClassifier(**kwargs, num_classes=len(classes), class_names=classes, **datamodule.preprocessing)
    check_image_size(model, datamodule.preprocessing["image_size"])
    return model


def check_image_size(model: ImageClassifier, image_size: int) -> None:
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


class StepMetricsBar(TQDMProgressBar):
    """Lightning's TQDM bar, also showing the latest values of the per-step metrics `names`.

    Lightning turns every value logged with `prog_bar=True` into a Python number after every training
    step: on a GPU, a host-device sync per step, which stops the CPU from queuing the next step while the
    GPU works. These metrics are logged without `prog_bar`; the bar reads them from
    `trainer.callback_metrics` only when it refreshes, every `refresh_rate` steps.
    """

    def __init__(self, names: Sequence[str], refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.names = tuple(names)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        logged = trainer.callback_metrics
        latest = {name: float(logged[name]) for name in self.names if name in logged}
        return {**latest, **super().get_metrics(trainer, pl_module)}


def build_callbacks(values: dict[str, Any]) -> list[Callback]:
    """The run's callbacks besides checkpointing, in the order they should run."""
    callbacks: list[Callback] = [
        LearningRateMonitor(logging_interval="step"),
        SaveConfig(values),
        StepMetricsBar(BAR_METRICS, refresh_rate=PROGRESS_REFRESH_STEPS),
    ]
    if values["freeze_backbone"]:
        callbacks.append(FreezeBackbone(unfreeze_at_epoch=values["unfreeze_at_epoch"]))
    # TensorBoard views: the augmented batch, confusion matrix, mistakes, graph, flags with final metrics
    callbacks += [
        AugmentedBatchGrid(),
        ConfusionMatrixLogger(),
        MispredictionLogger(),
        ModelGraphLogger(),
        HparamsSummary(values),
    ]
    if values["feed_monitor"]:
        callbacks.append(DataFeedMonitor())
    # faults: Ctrl+C / SIGTERM leave a resumable checkpoint; a NaN loss or too many unreadable images stop the run
    callbacks += [InterruptCheckpoint(), NonFiniteLossGuard()]
    if values.get("skip_bad_images"):
        callbacks.append(BadImageMonitor(values["max_bad_fraction"]))
    return callbacks


def build_trainer(values: dict[str, Any], callbacks: list[Callback]) -> L.Trainer:
    """The Trainer from TRAINER_FLAGS; a combination Lightning refuses (devices, strategy) is a usage error."""
    root = values["default_root_dir"]
    logger = TensorBoardLogger(save_dir=root, name=LOGS, default_hp_metric=False)
    profiler = PROFILERS[values["profiler"]](filename="profile") if values["profiler"] != "none" else None
    kwargs = {name: values[name] for name in TRAINER_FLAGS}
    kwargs["fast_dev_run"] = kwargs["fast_dev_run"] or False
    try:
        return L.Trainer(
            **kwargs,
            precision=resolve_precision(values["precision"], values["accelerator"]),
            profiler=profiler,
            logger=logger,
            callbacks=callbacks,
            plugins=[AtomicCheckpointIO()],
        )
    except (MisconfigurationException, ValueError, TypeError) as error:
        message = " ".join(str(error).split())
        named = sorted((message.find(name), name) for name in TRAINER_FLAGS if name in message)  # the first named
        raise UsageError(f"argument --{named[0][1]}: {message}" if named else message) from None


def train(values: dict[str, Any]) -> dict[str, Any]:
    """Fit, validate every epoch, test the best checkpoint when there is a test split; print a summary.

    `values` are train.py's flags (`parse_train_flags`). Returns the figures of the summary:
    best_val_acc, test_acc, best_checkpoint, last_checkpoint, log_dir.
    """
    configure_console()
    ckpt_path = resolve_ckpt_path(values["ckpt_path"], values["default_root_dir"])
    if values["ckpt_path"] == "last":
        print(f"resuming from {ckpt_path}")
    checkpoint = model_checkpoint()
    trainer = build_trainer(values, [checkpoint, *build_callbacks(values)])  # before any work: it checks flags

    L.seed_everything(values.get("seed", 0), workers=True, verbose=False)
    datamodule = build_datamodule(values)
    try:
        datamodule.prepare_data()
        # every split's layout (empty class folder, val/ or test/ classes unlike train/'s) before any training
        datamodule.setup("fit")
        datamodule.setup("test")
        model = build_model(values, datamodule)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    if ckpt_path:
        check_resumable(ckpt_path, model.hparams)

    if values.get("num_workers") == "auto":
        auto_num_workers(datamodule, model, trainer)
    with clear_failures(trainer):  # interruption: exit 128 + signal; known faults: one line, exit 1
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)

    results: dict[str, Any] = {
        "best_val_acc": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
        "best_checkpoint": checkpoint.best_model_path or None,
        "last_checkpoint": checkpoint.last_model_path or None,
        "log_dir": trainer.log_dir,
        "test_acc": None,
    }
    if getattr(datamodule, "test_set", None) is not None and not trainer.interrupted:
        with clear_failures(trainer):
            tested = trainer.test(
                model, datamodule=datamodule, ckpt_path="best" if checkpoint.best_model_path else None, verbose=False
            )
        results["test_acc"] = tested[0].get("test/acc") if tested else None
    if trainer.is_global_zero:
        print_summary(results, values["default_root_dir"])
    return results


def print_summary(results: dict[str, Any], root: str) -> None:
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    logs = os.path.relpath(Path(root) / LOGS)
    print(f"\nbest val/acc {fmt(results['best_val_acc'])}   test/acc {fmt(results['test_acc'])}")
    if results["best_checkpoint"]:
        print(f"best checkpoint: {os.path.relpath(results['best_checkpoint'])}")
    if results["last_checkpoint"]:
        print(f"last checkpoint: {os.path.relpath(results['last_checkpoint'])}")
    print(f"run folder:      {os.path.relpath(results['log_dir'])}")
    print(f"open it with:    tensorboard --logdir {logs}")
