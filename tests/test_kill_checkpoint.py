"""A checkpoint save killed mid-write or out of disk: the previous checkpoint stays loadable, no partial file stays,
and a full disk ends the run with one line."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from project.runtime import checkpoints
from project.runtime.checkpoints import AtomicCheckpointIO, load_checkpoint_safely, model_checkpoint
from project.runtime.faults import InterruptCheckpoint, clear_failures, explain_failure
from tests.killing import Victim, leftovers

ROOT = Path(__file__).resolve().parents[1]
TEMP = ".*.tmp"  # what AtomicCheckpointIO writes before the rename

# saves a checkpoint whose writer stops halfway, its first half on disk, and waits to be killed
KILLED_MID_WRITE = """
import io
import sys

import torch

sys.path.insert(0, {root!r})
from project.runtime.checkpoints import AtomicCheckpointIO

save = torch.save


def half_then_wait(obj, file):
    buffer = io.BytesIO()
    save(obj, buffer)
    file.write(buffer.getvalue()[: buffer.tell() // 2])
    file.flush()
    print("half written", flush=True)
    sys.stdin.read()  # until killed (or until the test is gone: end of file)


torch.save = half_then_wait
checkpoint = {{"global_step": 2, "state_dict": {{"weights": torch.ones(1000)}}}}
checkpoint["hyper_parameters"] = {{"backbone": "simple_cnn", "num_classes": 2}}
AtomicCheckpointIO().save_checkpoint(checkpoint, {path!r})
"""


def save(path: Path, step: int) -> Path:
    checkpoint = {"global_step": step, "state_dict": {"weights": torch.zeros(1000)}}
    checkpoint["hyper_parameters"] = {"backbone": "simple_cnn", "num_classes": 2}
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    return path


def temp_name(target: str, pid: int) -> str:
    """The name AtomicCheckpointIO gives the temporary file of a writer with `pid` on this host."""
    return f".{target}.{socket.gethostname()}.{pid}-0123abcd.tmp"


def dead_pid() -> int:
    """The PID of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


class Scored(BoringModel):
    """BoringModel with the val/acc the project's checkpoint callback monitors."""

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", 1.0 / (1 + self.current_epoch))
        return super().validation_step(batch, batch_idx)


def scored_trainer(root: Path, max_epochs: int = 1, callbacks: tuple = ()) -> L.Trainer:
    """A Trainer with the project's checkpoint callback and writer, logging nothing."""
    return L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        max_epochs=max_epochs,
        limit_train_batches=4,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[model_checkpoint(), *callbacks],
        plugins=[AtomicCheckpointIO()],
    )


def test_a_save_killed_mid_write_keeps_the_previous_checkpoint_and_the_next_run_removes_its_temp_file(tmp_path):
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    last = save(folder / "last.ckpt", step=1)
    code = KILLED_MID_WRITE.format(root=str(ROOT), path=str(last))
    with Victim([sys.executable, "-c", code], env={"OMP_NUM_THREADS": "1"}) as victim:
        victim.wait_for_line("half written", timeout=120)
        victim.kill()
        assert not victim.strays()
    partial = leftovers(folder, TEMP)
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the kill did land mid-write
    assert load_checkpoint_safely(last)["global_step"] == 1

    # the next run logs into a new folder; its checkpoint setup cleans the earlier runs' folders,
    # leaving the temporary file of a writer that is still alive (this process stands in for it)
    alive = folder / temp_name("best.ckpt", os.getpid())
    alive.write_bytes(b"a save in progress")
    scored_trainer(tmp_path).fit(Scored())
    assert leftovers(tmp_path, TEMP) == [alive]
    assert load_checkpoint_safely(last)["global_step"] == 1


def test_the_next_save_removes_the_temp_files_of_dead_writers_only(tmp_path):
    last = save(tmp_path / "last.ckpt", step=1)
    dead = tmp_path / temp_name("best-epoch03.ckpt", dead_pid())
    alive = tmp_path / temp_name("last.ckpt", os.getpid())
    elsewhere = tmp_path / f".last.ckpt.another-host.{dead_pid()}-0123abcd.tmp"  # cannot tell from here
    for path in (dead, alive, elsewhere):
        path.write_bytes(b"partial")
    save(last, step=2)
    assert leftovers(tmp_path, TEMP) == sorted([alive, elsewhere])
    assert load_checkpoint_safely(last)["global_step"] == 2


class FillingFile:
    """A file on a disk that fills up after `room` bytes."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def fill_disk(monkeypatch, where: str, after_saves: int = 0) -> None:
    """Make checkpoint saves after the first `after_saves` fail with ENOSPC, in a write or in the fsync."""
    opened = []

    def filling_open(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)  # noqa: SIM115 - the writer closes it
        opened.append(path)
        full = len(opened) > after_saves
        return FillingFile(file, 1000) if full and where == "write" else file

    fsync = os.fsync

    def full_fsync(fd):
        if len(opened) > after_saves:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fsync(fd)

    monkeypatch.setattr(checkpoints, "open", filling_open, raising=False)  # the module's, before the builtin
    if where == "fsync":  # delayed allocation: the writes land in memory, the flush to disk fails
        monkeypatch.setattr(checkpoints.os, "fsync", full_fsync)


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_disk_that_fills_up_mid_write_keeps_the_previous_checkpoint_and_leaves_no_partial_file(
    tmp_path, monkeypatch, where
):
    last = save(tmp_path / "last.ckpt", step=1)
    before = last.read_bytes()
    fill_disk(monkeypatch, where)
    with pytest.raises(OSError) as error:
        save(last, step=2)
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(last)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert last.read_bytes() == before
    message = explain_failure(error.value)
    assert "disk is full" in message and repr(str(tmp_path)) in message


def test_a_disk_too_full_for_the_tensors_is_refused_before_writing(tmp_path, monkeypatch):
    last = save(tmp_path / "last.ckpt", step=1)
    before = last.read_bytes()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda folder: usage._replace(free=1000))
    opened = []

    def recording_open(*args, **kwargs):
        opened.append(args)
        return open(*args, **kwargs)  # noqa: SIM115 - the writer closes it

    monkeypatch.setattr(checkpoints, "open", recording_open, raising=False)
    with pytest.raises(OSError) as error:
        save(last, step=2)  # 1000 float32 weights: 4 KB
    assert error.value.errno == errno.ENOSPC and not opened
    message = explain_failure(error.value)
    assert "needs about 4.0 KB, 1.0 KB free" in message and repr(str(tmp_path)) in message
    assert last.read_bytes() == before


def test_a_full_disk_ends_the_run_with_one_line_naming_the_folder_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, capsys
):
    fill_disk(monkeypatch, "write", after_saves=2)  # epoch 0 writes its best and last checkpoints; then full
    trainer = scored_trainer(tmp_path, max_epochs=3)
    with pytest.raises(SystemExit) as stop, clear_failures(trainer):
        trainer.fit(Scored())
    assert stop.value.code == 1
    err = capsys.readouterr().err
    folder = tmp_path / "checkpoints"
    lines = [line for line in err.splitlines() if line.startswith("train.py: error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert "disk is full" in lines[0] and repr(str(folder)) in lines[0], lines[0]
    assert torch.load(folder / "last.ckpt", weights_only=True)["epoch"] == 0
    assert not leftovers(tmp_path, TEMP)


class TermAtStep(L.Callback):
    """Sends this process SIGTERM at a training step, as a scheduler would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_full_disk_when_an_interrupted_run_saves_its_checkpoint_is_said_in_one_line(tmp_path, monkeypatch, capsys):
    fill_disk(monkeypatch, "write")
    trainer = scored_trainer(tmp_path, callbacks=(InterruptCheckpoint(), TermAtStep(2)))
    with pytest.raises(SystemExit) as stop, clear_failures(trainer):
        trainer.fit(Scored())
    assert stop.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train.py: error:")]
    assert "Traceback" not in err and len(lines) == 1 and "disk is full" in lines[0], err
    assert "interrupted.ckpt" in lines[0] and not leftovers(tmp_path, "*.ckpt", TEMP)
