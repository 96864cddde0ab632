"""One training run from parsed flags: DataModule + ImageClassifier + Trainer, fit, test, summary."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.profilers import AdvancedProfiler, PyTorchProfiler, SimpleProfiler

from project.cli import UsageError, to_yaml
from project.data import ImageDataModule
from project.feed.monitor import DataFeedMonitor
from project.feed.throughput import auto_num_workers, worker_budget
from project.models import ImageClassifier
from project.runtime.checkpoints import AtomicCheckpointIO, model_checkpoint, resolve_ckpt_path
from project.runtime.console import configure_console
from project.runtime.faults import BadImageMonitor, InterruptCheckpoint, NonFiniteLossGuard, clear_failures
from project.tools.finetune import FreezeBackbone
from project.views.tensorboard import (
    AugmentedBatchGrid,
    ConfusionMatrixLogger,
    HparamsSummary,
    MispredictionLogger,
    ModelGraphLogger,
)

LOGS = "lightning_logs"
# the bar reads its metrics (a host sync on a GPU) at each refresh: every 10 steps keeps syncs off most steps
PROGRESS_REFRESH_STEPS = 10
PROFILERS = {"simple": SimpleProfiler, "advanced": AdvancedProfiler, "pytorch": PyTorchProfiler}


class SaveConfig(Callback):
    """Write the run's resolved flags to `<run folder>/config.yaml` (rank 0 only)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.text = to_yaml(args)

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


def build_datamodule(args: argparse.Namespace) -> ImageDataModule:
    return ImageDataModule(
        data_dir=args.data_dir,
        image_size=args.image_size,
        batch_size=args.batch_size,
        # `auto` is resolved by a measured sweep just before fit; until then, every worker allowed
        num_workers=worker_budget() if args.num_workers == "auto" else args.num_workers,
        drop_last=args.drop_last,
        shuffle=args.shuffle,
        sampler=args.sampler,
        pin_memory=args.pin_memory,
        persistent_workers=args.persistent_workers,
        prefetch_factor=args.prefetch_factor,
        rotation=args.rotation,
        hflip=args.hflip,
        augment_on=args.augment_on,
        cache=args.cache,
        cache_dir=args.cache_dir,
        channels_last=args.channels_last,
        val_fraction=args.val_fraction,
        seed=args.seed,
        skip_bad_images=args.skip_bad_images,
        max_bad_fraction=args.max_bad_fraction,
        loader_timeout=args.loader_timeout,
    )


def build_model(args: argparse.Namespace, datamodule: ImageDataModule) -> ImageClassifier:
    classes = datamodule.classes
    return ImageClassifier(
        backbone=args.backbone,
        num_classes=len(classes),
        class_names=classes,
        pretrained=args.pretrained,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing,
        compile=args.compile,
        channels_last=args.channels_last,
        **datamodule.preprocessing,
    )


def build_callbacks(args: argparse.Namespace) -> list[Callback]:
    """The run's callbacks besides checkpointing, in the order they should run."""
    callbacks: list[Callback] = [
        LearningRateMonitor(logging_interval="step"),
        SaveConfig(args),
        TQDMProgressBar(refresh_rate=PROGRESS_REFRESH_STEPS),
    ]
    if args.unfreeze_at_epoch is not None and not args.freeze_backbone:
        raise UsageError(f"--unfreeze_at_epoch {args.unfreeze_at_epoch} needs --freeze_backbone (nothing is frozen)")
    if args.freeze_backbone:
        callbacks.append(FreezeBackbone(unfreeze_at_epoch=args.unfreeze_at_epoch))
    # TensorBoard views: the augmented batch, confusion matrix, mistakes, graph, flags with final metrics
    callbacks += [
        AugmentedBatchGrid(),
        ConfusionMatrixLogger(),
        MispredictionLogger(),
        ModelGraphLogger(),
        HparamsSummary({k: v for k, v in vars(args).items() if k != "config"}),
    ]
    if args.feed_monitor:
        callbacks.append(DataFeedMonitor())
    # faults: Ctrl+C / SIGTERM leave a resumable checkpoint; a NaN loss or too many unreadable images stop the run
    callbacks += [InterruptCheckpoint(), NonFiniteLossGuard()]
    if args.skip_bad_images:
        callbacks.append(BadImageMonitor(args.max_bad_fraction))
    return callbacks


def build_trainer(args: argparse.Namespace, callbacks: list[Callback]) -> L.Trainer:
    logger = TensorBoardLogger(save_dir=str(args.default_root_dir), name=LOGS, default_hp_metric=False)
    profiler = PROFILERS[args.profiler](filename="profile") if args.profiler != "none" else None
    return L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        num_nodes=args.num_nodes,
        precision=resolve_precision(args.precision, args.accelerator),
        max_epochs=args.max_epochs,
        profiler=profiler,
        deterministic=args.deterministic,
        default_root_dir=str(args.default_root_dir),
        limit_train_batches=args.limit_train_batches,
        limit_val_batches=args.limit_val_batches,
        limit_test_batches=args.limit_test_batches,
        fast_dev_run=args.fast_dev_run or False,
        log_every_n_steps=args.log_every_n_steps,
        accumulate_grad_batches=args.accumulate_grad_batches,
        gradient_clip_val=args.gradient_clip_val,
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Fit, validate every epoch, test the best checkpoint when there is a test split; print a summary.

    Returns the figures of the summary: best_val_acc, test_acc, best_checkpoint, last_checkpoint, log_dir.
    """
    configure_console()
    check_accelerator(args.accelerator)
    ckpt_path = resolve_ckpt_path(args.ckpt_path, args.default_root_dir)
    if args.ckpt_path == "last":
        print(f"resuming from {ckpt_path}")

    L.seed_everything(args.seed, workers=True, verbose=False)
    datamodule = build_datamodule(args)
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")  # layout errors (empty class folder, val/ classes differ) before any work
        model = build_model(args, datamodule)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None

    checkpoint = model_checkpoint()
    trainer = build_trainer(args, [checkpoint, *build_callbacks(args)])
    if args.num_workers == "auto":
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
    if datamodule.has_test and not trainer.interrupted:
        with clear_failures(trainer):
            tested = trainer.test(
                model, datamodule=datamodule, ckpt_path="best" if checkpoint.best_model_path else None, verbose=False
            )
        results["test_acc"] = tested[0].get("test/acc") if tested else None
    if trainer.is_global_zero:
        print_summary(results, args)
    return results


def print_summary(results: dict[str, Any], args: argparse.Namespace) -> None:
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    logs = os.path.relpath(Path(args.default_root_dir) / LOGS)
    print(f"\nbest val/acc {fmt(results['best_val_acc'])}   test/acc {fmt(results['test_acc'])}")
    if results["best_checkpoint"]:
        print(f"best checkpoint: {os.path.relpath(results['best_checkpoint'])}")
    if results["last_checkpoint"]:
        print(f"last checkpoint: {os.path.relpath(results['last_checkpoint'])}")
    print(f"run folder:      {os.path.relpath(results['log_dir'])}")
    print(f"open it with:    tensorboard --logdir {logs}")
