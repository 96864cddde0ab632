"""Checkpoints that survive interruptions: atomic writes, `--ckpt_path last`, and a fallback for truncated files.

A checkpoint is written to a hidden temporary file in its own folder, flushed to disk and renamed over
the target, so a job killed mid-write leaves the previous file intact, never a half-written one.
(Lightning's own writer stages the file in the system temp folder and moves it, which is a copy, not
a rename, when that folder is on another file system.)
"""

from __future__ import annotations

import os
import re
import uuid
import warnings
import zipfile
from contextlib import suppress
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from project.cli import UsageError

LOGS = "lightning_logs"
INTERRUPTED = "interrupted.ckpt"  # written when a run is stopped by SIGTERM / SIGINT (see InterruptCheckpoint)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into a temporary file beside the target, fsync, then `os.replace` onto it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own writer
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # hidden and not *.ckpt, so nothing that lists checkpoints ever sees a partial file
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "xb") as file:  # not mkstemp: its files are private (0600), checkpoints are not
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


class RollingLastModelCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose `last.ckpt` is rewritten at every save point, not only alongside a new best.

    Since Lightning 2.6, `save_last=True` rewrites `last.ckpt` only when a best-of checkpoint is written
    the same step, so after an epoch that did not improve the monitored metric it would hold an older
    epoch and a resume would repeat work. This saves it at the same points where the parent class saves.
    """

    def _refresh_last(self, trainer: L.Trainer, at_train_epoch_end: bool) -> None:
        # skipped when the parent already saved at this step (then it wrote last.ckpt too)
        if (
            self.save_last
            and at_train_epoch_end == self._should_save_on_train_epoch_end(trainer)
            and not self._should_skip_saving_checkpoint(trainer)
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._refresh_last(trainer, at_train_epoch_end=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._refresh_last(trainer, at_train_epoch_end=False)


def model_checkpoint() -> ModelCheckpoint:
    """Best checkpoint by `val/acc` plus `last.ckpt` after every epoch, in `lightning_logs/version_N/checkpoints/`."""
    return RollingLastModelCheckpoint(
        monitor="val/acc",
        mode="max",
        save_last=True,
        filename="best-epoch{epoch:02d}-val_acc{val/acc:.4f}",
        auto_insert_metric_name=False,
    )


def is_loadable(path: str | os.PathLike) -> bool:
    """Whether `path` is a complete checkpoint: for torch's zip format, every member's CRC checks out.

    A truncated file loses the zip directory at its end, so this catches interrupted copies and writes
    without unpickling anything.
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return archive.testzip() is None
        torch.load(path, map_location="cpu", weights_only=False)  # the legacy non-zip format
        return True
    except Exception:
        return False


def run_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Every checkpoint under `root/lightning_logs`, most recent first.

    Runs are ordered by version (newest first); within a run the checkpoint written on interruption
    comes first, then the others from newest to oldest (`last.ckpt` before a best-of written the same moment).
    """
    runs = []
    for run in Path(root, LOGS).glob("version_*"):
        match = re.fullmatch(r"version_(\d+)", run.name)
        if match:
            runs.append((int(match.group(1)), run))
    ordered: list[Path] = []
    for _, run in sorted(runs, reverse=True):
        checkpoints = [p for p in (run / "checkpoints").glob("*.ckpt") if p.is_file()]
        ordered += sorted(
            checkpoints, key=lambda p: (p.name == INTERRUPTED, p.stat().st_mtime, p.name == "last.ckpt"), reverse=True
        )
    return ordered


def resolve_ckpt_path(ckpt_path: str | None, root: str | os.PathLike) -> str | None:
    """The checkpoint `--ckpt_path` names: a file, or `last` (see `run_checkpoints`).

    `last` with no checkpoint at all is an error rather than a silent fresh start. A newest checkpoint
    that is truncated or unreadable is skipped for the next loadable one, with a warning naming both.
    """
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        if not Path(ckpt_path).is_file():
            raise UsageError(f"--ckpt_path: no such checkpoint {ckpt_path!r} (a .ckpt file, or 'last')")
        if not is_loadable(ckpt_path):
            raise UsageError(f"--ckpt_path: {ckpt_path!r} is truncated or not a checkpoint")
        return str(ckpt_path)

    candidates = run_checkpoints(root)
    if not candidates:
        raise UsageError(
            f"--ckpt_path last: no checkpoint under {str(Path(root, LOGS))!r}; "
            "run without --ckpt_path to start fresh, or pass --default_root_dir of the earlier run"
        )
    for candidate in candidates:
        if is_loadable(candidate):
            if candidate != candidates[0]:
                warnings.warn(
                    f"--ckpt_path last: {str(candidates[0])!r} is truncated or unreadable; "
                    f"resuming from {str(candidate)!r} instead",
                    UserWarning,
                    stacklevel=2,
                )
            return str(candidate)
    raise UsageError(
        f"--ckpt_path last: none of the {len(candidates)} checkpoints under "
        f"{str(Path(root, LOGS))!r} is loadable (all truncated or corrupt)"
    )
