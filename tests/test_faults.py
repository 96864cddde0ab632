"""Faults: SIGTERM / Ctrl+C leave a resumable checkpoint, checkpoints are atomic, `last.ckpt` is the last epoch,
`--ckpt_path last` picks the right file (skipping a truncated one), a NaN loss or a dead DataLoader worker ends the run
with a line saying what to do."""

from __future__ import annotations

import multiprocessing
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

from project.data import ImageDataModule, generate_shapes
from project.runtime import faults
from project.runtime.checkpoints import (
    AtomicCheckpointIO,
    load_checkpoint_safely,
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
from project.runtime.flags import UsageError

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
    assert stopped.value.code == 1 and err == [f"train.py: error: {faults.WORKER_DIED.format(KILLED)}"]
    assert not dead_unreaped_child()  # nothing left for PyTorch's SIGCHLD handler to report later


def dead_unreaped_child() -> bool:
    """Whether a child process of this one has ended and not been reaped yet."""
    try:
        return os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # no child processes at all
        return False


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_no_dead_worker_is_left_behind_for_a_later_report(tmp_path):
    with pytest.raises(SystemExit), clear_failures(boring_trainer(tmp_path, [])):
        worker = multiprocessing.get_context("fork").Process(target=die)
        worker.start()
        while not dead_unreaped_child():
            time.sleep(0.01)
        raise RuntimeError(POLLED)
    assert not dead_unreaped_child() and worker.exitcode == -signal.SIGKILL


KILLED = "killed, often by the out-of-memory killer"


def broken_connection() -> ConnectionResetError:
    """What receiving a batch raises when its worker died while handing the batch's memory over."""
    raising = "raise ConnectionResetError(104, 'Connection reset by peer')"
    try:
        exec(compile(raising, "multiprocessing/connection.py", "exec"))  # where it is raised from
    except ConnectionResetError as error:
        return error


def raised_while_handling(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException:
            raise outer  # noqa: B904 - the implicit chain is what a SIGCHLD report raised mid-handling has
    except BaseException as error:
        return error


SIGNALLED = "DataLoader worker (pid 4242) is killed by signal: Killed. "
POLLED = "DataLoader worker (pid(s) 4242) exited unexpectedly"


@pytest.mark.parametrize(
    "surfaced",
    [
        lambda: RuntimeError(SIGNALLED),
        lambda: RuntimeError(POLLED),
        broken_connection,
        lambda: raised_while_handling(RuntimeError(SIGNALLED), broken_connection()),
        lambda: raised_while_handling(RuntimeError(POLLED), RuntimeError(SIGNALLED)),
        lambda: raised_while_handling(ValueError("in the middle of a step"), RuntimeError(SIGNALLED)),
    ],
    ids=[
        "signal-report",
        "loader-poll",
        "broken-connection",
        "report-after-connection",
        "poll-after-report",
        "chained",
    ],
)
def test_a_dead_worker_gives_the_same_line_however_it_surfaces(surfaced):
    assert explain_failure(surfaced()) == faults.WORKER_DIED.format(KILLED)


def test_a_workers_own_exception_or_a_full_shm_is_not_called_a_killed_worker():
    # a bug in the dataset, re-raised from the (living) worker: its traceback is what helps
    assert explain_failure(KeyError("Caught KeyError in DataLoader worker process 0.\nOriginal Traceback")) is None
    bus = RuntimeError(
        "DataLoader worker (pid 7) is killed by signal: Bus error. It is possible that dataloader's "
        "workers are out of shared memory. Please try to raise your shared memory limit."
    )
    assert explain_failure(bus) == faults.WORKER_DIED.format("out of shared memory")
    assert explain_failure(ConnectionResetError(104, "not from a loader")) is None


def test_a_dead_workers_report_arriving_while_the_failure_is_handled_changes_nothing(tmp_path, capsys, monkeypatch):
    def report(signum, frame):  # what PyTorch's SIGCHLD handler does while a dead worker's iterator lives
        raise RuntimeError(SIGNALLED)

    def explain_as_the_report_comes(error):
        os.kill(os.getpid(), signal.SIGCHLD)
        return explain_failure(error)

    monkeypatch.setattr(faults, "explain_failure", explain_as_the_report_comes)
    previous = signal.signal(signal.SIGCHLD, report)
    try:
        with pytest.raises(SystemExit) as stopped, clear_failures(boring_trainer(tmp_path, [])):
            raise broken_connection()
        assert signal.getsignal(signal.SIGCHLD) is report  # set aside only while handling
    finally:
        signal.signal(signal.SIGCHLD, previous)
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 1 and err == [f"train.py: error: {faults.WORKER_DIED.format(KILLED)}"]


def test_loader_timeout_reaches_the_loader_and_its_error_is_explained(tmp_path, tiny_shapes):
    dm = ImageDataModule(tiny_shapes, num_workers=1, loader_timeout=7.5)
    dm.setup("fit")
    assert dm.train_dataloader().timeout == 7.5
    with pytest.raises(RuntimeError) as error:
        next(iter(DataLoader(Slow(), num_workers=1, timeout=0.3)))
    assert "--loader_timeout" in explain_failure(error.value)
    assert explain_failure(ValueError("a bug")) is None  # unknown failures keep their traceback


def save(path: Path, step: int, mtime: float) -> Path:
    checkpoint = {"global_step": step, "state_dict": {"weights": torch.zeros(1000)}}
    checkpoint["hyper_parameters"] = {"backbone": "simple_cnn", "num_classes": 2}
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)
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


def test_a_truncated_or_damaged_last_ckpt_falls_back_to_the_newest_loadable_one_in_one_line(tmp_path, capsys):
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    good = save(folder / "best-epoch01.ckpt", 1, 1000)
    last = save(folder / "last.ckpt", 2, 2000)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a copy or a write cut short
    os.utime(last, (2000, 2000))
    assert load_checkpoint_safely(good)["global_step"] == 1
    assert resolve_ckpt_path("last", tmp_path) == str(good)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(last) in err[0] and str(good) in err[0] and "truncated" in err[0]
    with pytest.raises(UsageError, match="truncated"):
        resolve_ckpt_path(str(last), tmp_path)

    # same size, one byte of a tensor flipped: torch would load it, with wrong weights
    data = bytearray(good.read_bytes())
    data[data.find(bytes(1000 * 4)) + 7] ^= 0xFF
    good.write_bytes(bytes(data))
    with pytest.raises(UsageError, match=r"none of the 2 checkpoints .* truncated"):
        resolve_ckpt_path("last", tmp_path)


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


class LastEpochSeen(L.Callback):
    """At the start of each epoch, the epoch `last.ckpt` holds."""

    def __init__(self) -> None:
        self.epochs: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module):
        path = trainer.checkpoint_callback.last_model_path
        if path:
            self.epochs.append(torch.load(path, weights_only=True)["epoch"])


def test_last_ckpt_holds_the_last_epoch_even_when_it_is_not_the_best(tmp_path):
    checkpoint, seen = model_checkpoint(), LastEpochSeen()
    trainer = boring_trainer(tmp_path, [checkpoint, seen], max_epochs=3)
    trainer.fit(Worsening())
    assert seen.epochs == [0, 1]  # current after each epoch, though only epoch 0 improved val/acc
    last = torch.load(checkpoint.last_model_path, weights_only=True)
    best = torch.load(checkpoint.best_model_path, weights_only=True)
    assert Path(checkpoint.last_model_path).name == "last.ckpt"
    assert (last["epoch"], best["epoch"]) == (2, 0)

    # resuming from it trains the epochs that are left, and only those
    resumed = boring_trainer(tmp_path / "resumed", [model_checkpoint()], max_epochs=4)
    resumed.fit(Worsening(), ckpt_path=checkpoint.last_model_path)
    assert (resumed.current_epoch, resumed.global_step) == (4, 4 * 8)
