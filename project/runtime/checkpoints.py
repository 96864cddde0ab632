"""Checkpoints: atomic writes, `last.ckpt` after every epoch, `--ckpt_path last`, and loading them as data only.

A checkpoint is written to a hidden temporary file in its own folder, flushed to disk and renamed over
the target, so a job killed mid-write leaves the previous file intact, never a half-written one.
(Lightning's own writer stages the file in the system temp folder and moves it, which is a copy, not
a rename, when that folder is on another file system.) The temporary file is named after its writer's
host and PID: what a killed writer left is removed by the next save into that folder and by the next
run's checkpoint setup, while the file of a writer that is still alive is left to it. A disk that is
too full for the checkpoint's tensors is refused before writing; one that fills up mid-write ends
with an `OSError(ENOSPC)` naming the file, and either way the previous checkpoint stays as it was.

A checkpoint is data, never code: every file is read with torch's weights-only unpickler, which builds
tensors, numbers, strings, lists and dicts and refuses anything that would import or call code. It reads
torch's legacy (non-zip) format as well as the zip format. Files it refuses, files that are not
checkpoints and checkpoints of other models end with one line naming the file and the reason.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import sys
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from project.models import ImageClassifier
from project.runtime.flags import UsageError

LOGS = "lightning_logs"
INTERRUPTED = "interrupted.ckpt"  # written when a run is stopped by SIGTERM / SIGINT (see InterruptCheckpoint)
HPARAMS = ("backbone", "num_classes")  # what marks a checkpoint as an ImageClassifier's


# errors that mean the disk (or the user's quota on it) is full
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _temp_name(path: Path) -> Path:
    # hidden and not *.ckpt, so nothing that lists checkpoints ever sees a partial file; host and PID tell
    # whether its writer is still alive
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def is_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host: a temporary file's writer, a lock's holder."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temp_files(folders: Iterable[str | os.PathLike]) -> list[Path]:
    """Remove the temporary checkpoint files in `folders` whose writer, on this host, is no longer alive.

    A writer killed mid-write (the OOM killer, `kill -9`, a pre-empted node) leaves its temporary file
    behind. One whose writer is alive belongs to a save in progress, and one from another host (a shared
    file system) cannot be checked from here: both are left alone. Returns the files removed.
    """
    pattern = re.compile(rf"\..+\.{re.escape(socket.gethostname())}\.(\d+)-[0-9a-f]{{8}}\.tmp")
    removed = []
    for folder in folders:
        with suppress(OSError):  # a folder that is not there (yet) has nothing to clean
            for entry in os.scandir(folder):
                match = pattern.fullmatch(entry.name)
                if match and not is_alive(int(match.group(1))):
                    with suppress(FileNotFoundError):  # another process cleaning the same folder
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
    return removed


def _tensor_bytes(obj: Any, seen: set[tuple[str, int]]) -> int:
    """The bytes of the tensors in `obj` (dicts, lists, tuples), each storage counted once."""
    if isinstance(obj, torch.Tensor):
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no plain storage (sparse, wrapper subclasses)
            return obj.element_size() * obj.nelement()
        key = (str(obj.device), storage.data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(value, seen) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(value, seen) for value in obj)
    return 0


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def check_free_space(folder: str | os.PathLike, needed: int, path: str | os.PathLike) -> None:
    """`OSError(ENOSPC)` naming `path` when `folder`'s disk has fewer than `needed` bytes free."""
    usage = shutil.disk_usage(folder)
    # some network and FUSE file systems report no size at all: nothing to check against there
    if usage.total and usage.free < needed:
        free = usage.free
        raise OSError(errno.ENOSPC, f"needs about {_size(needed)}, {_size(free)} free", str(path))


def _disk_full(error: BaseException) -> OSError | None:
    """The out-of-space `OSError` behind `error`: torch.save reports a failed write as a RuntimeError raised
    while handling it."""
    seen: list[BaseException] = []
    while error is not None and all(error is not other for other in seen):
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            return error
        seen.append(error)
        error = error.__cause__ or error.__context__
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into a temporary file beside the target, fsync, then `os.replace` onto it; loads as data only."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own writer
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files([path.parent])
        # the tensors are nearly all of the file, and counting them costs no pickling; the previous file
        # stays until the rename, so the new one needs all of that room besides it
        check_free_space(path.parent, _tensor_bytes(checkpoint, set()), path)
        tmp = _temp_name(path)
        try:
            with open(tmp, "xb") as file:  # not mkstemp: its files are private (0600), checkpoints are not
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException as error:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            full = _disk_full(error)
            if full is None:
                raise
            free = _size(shutil.disk_usage(path.parent).free)
            raise OSError(full.errno, f"{full.strerror}, {free} free", str(path)) from error

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        # every load the Trainer makes (fit/test with ckpt_path) comes here: data only, whatever the caller
        # asked for, since Lightning leaves the choice to torch's default, which an environment variable flips
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class RollingLastModelCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that also rewrites `last.ckpt` at the end of every training epoch.

    Since Lightning 2.6, `save_last=True` rewrites `last.ckpt` only when a best-of checkpoint is written
    the same step, so after an epoch that did not improve the monitored metric it would hold an older
    epoch and a resume would repeat work. Leave `save_last` unset: this class owns `last.ckpt`. Lightning
    2.x runs the epoch's validation before `on_train_epoch_end`, so the file holds the finished epoch, the
    same state `ModelCheckpoint(save_on_train_epoch_end=True)` saves.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # a run killed mid-save left its temporary file in its own run folder, which no later save writes
        # into: a resumed run logs into a new version_N
        if trainer.is_global_zero and stage == "fit":
            runs = Path(trainer.default_root_dir, LOGS).glob("version_*/checkpoints")
            remove_stale_temp_files([*runs, *([self.dirpath] if self.dirpath else [])])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if trainer.fast_dev_run:  # as ModelCheckpoint: a smoke run writes no checkpoints
            return
        # set before saving, as ModelCheckpoint does: the path is part of the callback state in the file
        self.last_model_path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
        trainer.save_checkpoint(self.last_model_path, weights_only=self.save_weights_only)


def model_checkpoint() -> ModelCheckpoint:
    """Best checkpoint by `val/acc` plus `last.ckpt` after every epoch, in `lightning_logs/version_N/checkpoints/`."""
    return RollingLastModelCheckpoint(
        monitor="val/acc",
        mode="max",
        filename="best-epoch{epoch:02d}-val_acc{val/acc:.4f}",
        auto_insert_metric_name=False,
    )


def _unreadable(error: Exception, path: str) -> str:
    """Why torch's weights-only loader refused `path`, in a few words."""
    text = str(error)
    code = re.search(r"GLOBAL (\S+)", text)
    if code:
        return (
            f"is refused: loading it would import {code.group(1)}, and checkpoints are read as data only "
            "(tensors, numbers, strings, lists, dicts)"
        )
    if "legacy .tar format" in text:
        return (
            "is in torch's old .tar format, which cannot be read as data only; if you trust the file, convert it "
            f'once: python -c "import torch; torch.save(torch.load({path!r}, weights_only=False), {path + ".zip"!r})"'
        )
    return f"is truncated, corrupt or not a checkpoint (reading it raised {type(error).__name__})"


def load_checkpoint_safely(path: str | os.PathLike, flag: str = "--checkpoint") -> dict[str, Any]:
    """Read an `ImageClassifier` checkpoint as data only (torch's weights-only loader, on the CPU).

    Raises `UsageError` with one line naming `flag`, the file and the reason: no such file; a file the
    loader refuses (it would run code) or cannot read (truncated, corrupt, not a checkpoint); a
    plain state_dict or another model's checkpoint (no `hyper_parameters` with backbone and num_classes).
    """
    name = repr(str(path))
    if not Path(path).is_file():
        raise UsageError(f"{flag}: no such checkpoint file {name}")
    try:
        # torch reads a zip without checking its CRCs: a file damaged in a copy would load with wrong weights
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if archive.testzip() is not None:
                    raise zipfile.BadZipFile("a CRC does not match")
        with warnings.catch_warnings():  # its notes on odd pickles would break the one-line error
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"{flag}: {name} {_unreadable(error, str(path))}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        plain = isinstance(checkpoint, dict) and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
        what = "a plain state_dict" if plain else f"a {type(checkpoint).__name__}"
        raise UsageError(f"{flag}: {name} holds {what}, not a checkpoint written by train.py")
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or not all(key in hparams for key in HPARAMS):
        raise UsageError(
            f"{flag}: {name} is a checkpoint of another model: its hyper_parameters lack "
            f"{' and '.join(HPARAMS)}, which train.py's checkpoints carry"
        )
    return checkpoint


# what a resumed run cannot change, and what to change back: the weights' shapes and the labels' meaning
FIXED_ON_RESUME = {
    "backbone": "--backbone",
    "num_classes": "the data's classes",
    "class_names": "the data's classes",
}


def check_resumable(path: str | os.PathLike, hparams: Mapping[str, Any], flag: str = "--ckpt_path") -> None:
    """`UsageError` in one line when the run's model differs from checkpoint `path`'s in what resuming
    cannot change (Lightning would fail with a traceback over mismatched weights, or, for renamed classes
    of the same count, resume with labels that mean something else)."""
    saved = load_checkpoint_safely(path, flag)["hyper_parameters"]
    for key, remedy in FIXED_ON_RESUME.items():
        if key not in saved or key not in hparams:
            continue
        was, now = saved[key], hparams[key]
        if key == "class_names":  # a list in one, a tuple in the other is the same classes
            was, now = list(was), list(now)
        if was != now:
            raise UsageError(
                f"{flag}: {str(path)!r} was trained with {key} {was!r}, this run has {now!r}; "
                f"resume with the same {remedy}, or start fresh without --ckpt_path"
            )


def load_classifier(path: str | os.PathLike, flag: str = "--checkpoint") -> ImageClassifier:
    """The `ImageClassifier` in checkpoint `path`, on the CPU, after `load_checkpoint_safely` accepted the file."""
    load_checkpoint_safely(path, flag)
    try:
        return ImageClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except (TypeError, ValueError, KeyError, RuntimeError) as error:  # hyperparameters or weights that do not fit
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UsageError(
            f"{flag}: {str(path)!r} does not fit ImageClassifier ({type(error).__name__}: {first})"
        ) from None


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
    """The checkpoint `--ckpt_path` names, after `load_checkpoint_safely` accepted it: a file, or `last`.

    `last` (see `run_checkpoints`) with no checkpoint at all is an error rather than a silent fresh start;
    a newer checkpoint that cannot be loaded safely is skipped for the next one, with a line on stderr
    naming it and the reason.
    """
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        load_checkpoint_safely(ckpt_path, "--ckpt_path")
        return str(ckpt_path)

    candidates = run_checkpoints(root)
    if not candidates:
        raise UsageError(
            f"--ckpt_path last: no checkpoint under {str(Path(root, LOGS))!r}; "
            "run without --ckpt_path to start fresh, or pass --default_root_dir of the earlier run"
        )
    skipped: list[str] = []
    for candidate in candidates:
        try:
            load_checkpoint_safely(candidate, "--ckpt_path last")
        except UsageError as error:
            skipped.append(str(error))
            continue
        for reason in skipped:
            print(f"{reason}; skipped it for {str(candidate)!r}", file=sys.stderr)
        return str(candidate)
    raise UsageError(
        f"--ckpt_path last: none of the {len(candidates)} checkpoints under {str(Path(root, LOGS))!r} "
        f"can be loaded; the newest: {skipped[0].removeprefix('--ckpt_path last: ')}"
    )
