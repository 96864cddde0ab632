"""One training run from parsed flags: DataModule + ImageClassifier + Trainer, fit, test, summary."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.profilers import AdvancedProfiler, PyTorchProfiler, SimpleProfiler

from project.callbacks import build_callbacks, early_stop_line
from project.feed.cache_builder import open_cache
from project.feed.device_decode import DecodeBatch
from project.feed.throughput import auto_num_workers
from project.models import ImageClassifier
from project.runtime import flags
from project.runtime.bad_images import skip_bad_images
from project.runtime.checkpoints import LOGS, AtomicCheckpointIO, check_resumable, model_checkpoint, resolve_ckpt_path
from project.runtime.console import configure_console, print_summary
from project.runtime.faults import clear_failures, end_run
from project.runtime.flags import RunOptions, TrainerOptions, UsageError, kwargs_for
from project.tools.streaming_reader import StreamingReader

PROFILERS = {"simple": SimpleProfiler, "advanced": AdvancedProfiler, "pytorch": PyTorchProfiler}
# the extras' parts the DataModule's flags need (the names: project.data.datamodule.HANDED_OVER)
HANDED_OVER = dict(
    open_stream=StreamingReader, open_cache=open_cache, decode_jpegs=DecodeBatch, bad_image_skipper=skip_bad_images
)
FROM_DATA = {"num_classes", "class_names", "image_size", "mean", "std"}  # set from the data, not from flags
FLAGS = {ImageClassifier: FROM_DATA, RunOptions: set(), TrainerOptions: set()}  # besides the DataModule's


def parse_train_flags(argv: Sequence[str]) -> dict[str, Any]:
    """train.py's flags (the DataModule's, ImageClassifier's, RunOptions' and TrainerOptions') as a flat dict;
    exits 2 with one line on a flag that is refused."""
    return flags.parse_train_flags(argv, FLAGS)


def build_datamodule(values: dict[str, Any]) -> L.LightningDataModule:
    cls = flags.load_datamodule_class(values.get("datamodule", RunOptions.datamodule))
    # num_workers auto: the DataModule's stand-in until the sweep
    return cls(**kwargs_for(cls, {**values, **HANDED_OVER}))


def build_model(values: dict[str, Any], datamodule: L.LightningDataModule) -> ImageClassifier:
    classes = list(datamodule.classes)
    kwargs = {k: v for k, v in kwargs_for(ImageClassifier, values).items() if k not in FROM_DATA}
    model = ImageClassifier(**kwargs, num_classes=len(classes), class_names=classes, **datamodule.preprocessing)
    flags.check_image_size(model, datamodule.preprocessing["image_size"])
    return model


def build_trainer(values: dict[str, Any], callbacks: list[Callback]) -> L.Trainer:
    """The Trainer from TrainerOptions; a combination Lightning refuses (devices, strategy) is a usage error."""
    kwargs = kwargs_for(TrainerOptions, values)
    profiler = PROFILERS[values["profiler"]](filename="profile") if values["profiler"] != "none" else None
    try:
        return L.Trainer(
            **kwargs,
            precision=flags.resolve_precision(values["precision"], values["accelerator"]),
            profiler=profiler,
            logger=TensorBoardLogger(save_dir=values["default_root_dir"], name=LOGS, default_hp_metric=False),
            callbacks=callbacks,
            plugins=[AtomicCheckpointIO()],
        )
    except (MisconfigurationException, ValueError, TypeError) as error:
        raise flags.usage_error(error, kwargs) from None


def train(values: dict[str, Any]) -> dict[str, Any]:
    """Fit on train.py's flags (`parse_train_flags`), validating every epoch; test the best checkpoint when there is
    a test split; print and return the summary's figures (best_val_acc, test_acc, checkpoints, log_dir, ...)."""
    configure_console()
    ckpt_path = resolve_ckpt_path(values["ckpt_path"], values["default_root_dir"])
    if values["ckpt_path"] == "last":
        print(f"resuming from {ckpt_path}")
    checkpoint = model_checkpoint()
    callbacks = [checkpoint, *flags.save_config(values, FLAGS), *build_callbacks(values)]
    trainer = build_trainer(values, callbacks)  # before any work: it checks flags

    L.seed_everything(values.get("seed", 0), workers=True, verbose=False)
    try:
        datamodule = build_datamodule(values)
        # attached as fit attaches it, so the first setup decides where data work runs for the real device
        datamodule.trainer = trainer
        datamodule.prepare_data()
        datamodule.setup("fit")  # every split's layout and cache before any training, then one line if wrong
        model = build_model(values, datamodule)
    except (OSError, ValueError) as error:  # a bad layout, a full disk, a --pretrained download that failed
        raise UsageError(str(error)) from None
    if ckpt_path:
        check_resumable(ckpt_path, model.hparams)

    if values.get("num_workers") == "auto":
        datamodule.num_workers = auto_num_workers(datamodule, model, trainer)
    with clear_failures(trainer):  # interruption: exit 128 + signal; known faults: one line, exit 1
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)

    results: dict[str, Any] = {
        "best_val_acc": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
        "best_checkpoint": checkpoint.best_model_path or None,
        "last_checkpoint": checkpoint.last_model_path or None,
        "log_dir": trainer.log_dir,
        "test_acc": None,
        "stopped_early": early_stop_line(trainer),
    }
    if getattr(datamodule, "test_set", None) is not None and not trainer.interrupted:
        with clear_failures(trainer):
            tested = trainer.test(
                model, datamodule=datamodule, ckpt_path="best" if checkpoint.best_model_path else None, verbose=False
            )
        results["test_acc"] = tested[0].get("test/acc") if tested else None
    if trainer.is_global_zero:
        print_summary(results, os.path.relpath(Path(values["default_root_dir"]) / LOGS))
    end_run(trainer)  # under DDP: the process group and the other ranks' processes end with this one
    return results
