"""Faults: SIGTERM / Ctrl+C leave a resumable checkpoint, checkpoints are atomic, `--ckpt_path last` picks the right
file (skipping a truncated one), a NaN loss or a dead DataLoader worker ends the run with a line saying what to do."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Dataset

from project.cli import UsageError
from project.data import ImageDataModule, generate_shapes
from project.runtime.checkpoints import (
    AtomicCheckpointIO,
    is_loadable,
    model_checkpoint,
    resolve_ckpt_path,
    run_checkpoints,
)
from project.runtime.faults import (
    InterruptCheckpoint,
    NonFiniteLossError,
    NonFiniteLossGuard,
    clear_failures,
    explain_failure,
)

ROOT = Path(__file__).resolve().parents[1]


def scalar_steps(run: Path, tag: str) -> list[int]:
    steps = []
    for events in run.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            steps += [event.step for event in accumulator.Scalars(tag)]
    return sorted(steps)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes_to_the_end(tmp_path):
    data = generate_shapes(tmp_path / "data", image_size=32, per_class={"train": 8, "val": 2}, progress=False)
    command = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        "--data_dir",
        str(data),
        "--image_size",
        "32",
        "--batch_size",
        "8",
        "--max_epochs",
        "3",
        "--num_workers",
        "1",
        "--accelerator",
        "cpu",
        "--default_root_dir",
        str(tmp_path),
        "--log_every_n_steps",
        "1",
        "--no-feed_monitor",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 120
    while not (first / "last.ckpt").exists():  # the end of epoch 0: training is under way
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert time.monotonic() - sent < 30  # stops after the current step, not after the run
    assert "resume with the same command plus --ckpt_path last" in output
    interrupted = first / "interrupted.ckpt"
    state = torch.load(interrupted, weights_only=True)
    stopped_at = state["global_step"]
    assert 8 <= stopped_at < 24  # 8 steps per epoch, 3 epochs
    assert {"optimizer_states", "lr_schedulers", "loops"} <= state.keys()
    assert not list(first.glob("*.tmp")) and not list(first.glob(".*"))  # atomic writes leave no partial files

    resumed = subprocess.run(
        [*command, "--ckpt_path", "last"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {interrupted}" in resumed.stdout
    run = tmp_path / "lightning_logs" / "version_1"
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (final["epoch"], final["global_step"]) == (2, 24)
    # the resumed run trains only the steps that were left: it did not start over
    steps = scalar_steps(run, "train/loss")
    assert steps and steps[0] >= stopped_at and len(steps) == 24 - stopped_at


class StopAt(L.Callback):
    """Sends this process a signal at a given training batch, as a user or a scheduler would."""

    def __init__(self, batch: int, signum: int, times: int = 1) -> None:
        self.batch, self.signum, self.times = batch, signum, times

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.batch:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


def boring_trainer(tmp_path: Path, callbacks: list, **kw) -> L.Trainer:
    kw = {"max_epochs": 3, "limit_train_batches": 8, "limit_val_batches": 2, **kw}
    return L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        **kw,
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_exit_code(tmp_path, signum):
    interrupt = InterruptCheckpoint()
    trainer = boring_trainer(tmp_path, [interrupt, StopAt(5, signum)])
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped, clear_failures(trainer):
        trainer.fit(BoringModel())
    assert stopped.value.code == 128 + signum
    assert trainer.global_step == 6  # the step under way when the signal came was finished, no more
    state = torch.load(Path(interrupt.saved), weights_only=True)
    assert Path(interrupt.saved).name == "interrupted.ckpt" and state["global_step"] == 6
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl+C behaves as before again


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path):
    interrupt = InterruptCheckpoint()
    trainer = boring_trainer(tmp_path, [interrupt, StopAt(5, signal.SIGINT, times=2)])
    with pytest.raises(SystemExit) as stopped, clear_failures(trainer):
        trainer.fit(BoringModel())
    assert stopped.value.code == 128 + signal.SIGINT
    assert trainer.global_step == 5 and interrupt.saved is None  # the step under way was cut off
    assert not list(tmp_path.rglob("*.ckpt"))


class NaNAfter(BoringModel):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.nan_step = step

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.global_step >= self.nan_step:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nan_loss_stops_the_run_naming_step_and_learning_rate(tmp_path, capsys):
    trainer = boring_trainer(tmp_path, [NonFiniteLossGuard(check_every_n_steps=4)])
    with pytest.raises(NonFiniteLossError, match=r"nan at step 3 .*learning rate 0\.1"):
        trainer.fit(NaNAfter(3))
    assert trainer.global_step == 4  # stopped at the first check after it, not after epochs of NaN

    trainer = boring_trainer(tmp_path, [NonFiniteLossGuard()])
    with pytest.raises(SystemExit) as stopped, clear_failures(trainer):
        trainer.fit(NaNAfter(3))
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 1 and len(err) == 1 and "--lr" in err[0]


class Killed(Dataset):
    """A worker that dies as the out-of-memory killer would kill it."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int):
        if index >= 8:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.randn(32)


class Slow(Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        time.sleep(1.5)
        return torch.randn(32)


class LoaderModel(BoringModel):
    def __init__(self, dataset: Dataset, **loader) -> None:
        super().__init__()
        self.dataset, self.loader = dataset, loader

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=2, num_workers=1, **self.loader)


def test_a_dead_worker_ends_the_run_with_what_to_do(tmp_path, capsys):
    trainer = boring_trainer(tmp_path, [InterruptCheckpoint()], limit_val_batches=0)
    with pytest.raises(SystemExit) as stopped, clear_failures(trainer):
        trainer.fit(LoaderModel(Killed()))
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 1 and len(err) == 1
    assert "DataLoader worker" in err[0] and "--num_workers" in err[0] and "/dev/shm" in err[0]
    # the failed loader iterator lives on in the traceback; shut it down now, or PyTorch's SIGCHLD handler
    # would report the dead worker again in the middle of whatever runs next
    del stopped, trainer
    gc.collect()


def test_loader_timeout_reaches_the_loader_and_its_error_is_explained(tmp_path, tiny_shapes):
    dm = ImageDataModule(tiny_shapes, num_workers=1, loader_timeout=7.5)
    dm.setup("fit")
    assert dm.train_dataloader().timeout == 7.5
    with pytest.raises(RuntimeError) as error:
        next(iter(DataLoader(Slow(), num_workers=1, timeout=0.3)))
    assert "--loader_timeout" in explain_failure(error.value)
    assert explain_failure(ValueError("a bug")) is None  # unknown failures keep their traceback


def save(path: Path, step: int, mtime: float) -> Path:
    AtomicCheckpointIO().save_checkpoint({"global_step": step, "weights": torch.zeros(1000)}, path)
    os.utime(path, (mtime, mtime))
    return path


def test_ckpt_path_last_is_the_newest_checkpoint_of_the_newest_run(tmp_path):
    logs = tmp_path / "lightning_logs"
    with pytest.raises(UsageError, match="no checkpoint"):
        resolve_ckpt_path("last", tmp_path)
    save(logs / "version_0" / "checkpoints" / "last.ckpt", 1, 1000)
    save(logs / "version_1" / "checkpoints" / "best-epoch00.ckpt", 2, 2000)
    save(logs / "version_1" / "checkpoints" / "last.ckpt", 3, 3000)
    (logs / "version_2").mkdir()  # a run that stopped before writing any checkpoint
    assert resolve_ckpt_path("last", tmp_path) == str(logs / "version_1" / "checkpoints" / "last.ckpt")
    interrupted = save(logs / "version_1" / "checkpoints" / "interrupted.ckpt", 4, 2500)
    assert resolve_ckpt_path("last", tmp_path) == str(interrupted)  # written on interruption: it comes first
    assert run_checkpoints(tmp_path)[-1] == logs / "version_0" / "checkpoints" / "last.ckpt"


def test_a_truncated_last_ckpt_falls_back_to_the_newest_loadable_one_with_a_warning(tmp_path):
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    good = save(folder / "best-epoch01.ckpt", 1, 1000)
    last = save(folder / "last.ckpt", 2, 2000)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a copy or a write cut short
    os.utime(last, (2000, 2000))
    assert is_loadable(good) and not is_loadable(last)
    with pytest.warns(UserWarning) as warned:
        assert resolve_ckpt_path("last", tmp_path) == str(good)
    assert str(last) in str(warned[0].message) and str(good) in str(warned[0].message)
    with pytest.raises(UsageError, match="truncated"):
        resolve_ckpt_path(str(last), tmp_path)


def test_atomic_write_keeps_the_previous_file_when_a_save_fails(tmp_path):
    path = save(tmp_path / "last.ckpt", 1, 1000)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for an unpicklable object
        AtomicCheckpointIO().save_checkpoint({"global_step": 2, "oops": lambda: None}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


class Worsening(BoringModel):
    """val/acc falls every epoch, so only epoch 0 is ever the best."""

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", 1.0 / (1 + self.current_epoch))
        return super().validation_step(batch, batch_idx)


def test_last_ckpt_holds_the_last_epoch_even_when_it_is_not_the_best(tmp_path):
    checkpoint = model_checkpoint()
    trainer = boring_trainer(tmp_path, [checkpoint], max_epochs=3)
    trainer.fit(Worsening())
    last = torch.load(checkpoint.last_model_path, weights_only=True)
    best = torch.load(checkpoint.best_model_path, weights_only=True)
    assert Path(checkpoint.last_model_path).name == "last.ckpt"
    assert (last["epoch"], best["epoch"]) == (2, 0)
