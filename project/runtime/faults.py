"""What a run does when something goes wrong: interruptions, non-finite losses, unreadable images, dead workers,
a full disk; and how it ends, so that no thread or process outlives it.

Each fault ends the run with one line that says what happened and what to do, and an interruption
leaves a checkpoint that `--ckpt_path last` resumes from.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from project.data.folder import BadImageError
from project.runtime.checkpoints import DISK_FULL, INTERRUPTED


class TrainingStopped(RuntimeError):
    """A fault that ends the run; its message is the one line shown to the user."""


class NonFiniteLossError(TrainingStopped):
    pass


class TooManyBadImagesError(TrainingStopped):
    pass


class InterruptCheckpoint(Callback):
    """SIGTERM or SIGINT: finish the current step, save `interrupted.ckpt`, end with exit code 128 + signal.

    Lightning already handles SIGTERM: its handler sets `trainer.received_sigterm` (and, under DDP, the
    loops broadcast rank 0's flag), and the loops raise `SIGTERMException` at the next batch boundary, so
    the model and optimizer state are consistent there. This callback sends Ctrl+C down the same path
    (re-raising it as SIGTERM to this process, so Lightning also forwards it to DDP child processes) rather
    than a `KeyboardInterrupt` in the middle of an optimizer step; a second Ctrl+C stops at once. The
    checkpoint is written in `on_exception`, through the trainer's (atomic) checkpoint writer, into the
    run's checkpoint folder, where `--ckpt_path last` finds it first.
    """

    def __init__(self) -> None:
        self.signal: int | None = None  # the signal that stopped the run, if one did
        self.saved: str | None = None
        self._forced = False  # a second Ctrl+C: stop now, save nothing (the step was cut off midway)
        self._previous_sigint: Any = None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signal or signal.SIGTERM)  # the shell's convention for "killed by signal N"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.signal, self.saved, self._forced = None, None, False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # here rather than in on_fit_start: Lightning installs its handlers (and saves the ones it finds to
        # restore at teardown) between the two, and would otherwise restore this one after the run
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            self._forced = True
            raise KeyboardInterrupt
        self.signal = signum
        rank_zero_info("\nCtrl+C: saving a checkpoint after the current step (press it again to stop at once)")
        os.kill(os.getpid(), signal.SIGTERM)

    def _restore(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        # a worker that died of the same SIGTERM (sent to the whole process group) surfaces as a loader error
        if not (isinstance(exception, (SIGTERMException, KeyboardInterrupt)) or trainer.received_sigterm):
            return
        if self.signal is None:
            self.signal = signal.SIGINT if isinstance(exception, KeyboardInterrupt) else signal.SIGTERM
        if self._forced or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        folder = folder or Path(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        path = os.path.join(folder, INTERRUPTED)
        trainer.save_checkpoint(path)
        self.saved = path
        rank_zero_info(
            f"{signal.Signals(self.signal).name} at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}: saved {path}; resume with the same command plus --ckpt_path last"
        )


class NonFiniteLossGuard(Callback):
    """Stop once a training loss is NaN or inf, naming the step and the learning rate it had.

    The losses of the last `check_every_n_steps` steps are kept on the device and read back together,
    one host synchronization per check rather than one per step, so the guard stays off the hot path
    on a GPU; a bad loss stops the run at most that many steps later (or at the end of its epoch).
    """

    def __init__(self, check_every_n_steps: int = 10) -> None:
        self.check_every_n_steps = check_every_n_steps
        self._lr: float | None = None
        self._step = 0
        self._window: list[tuple[torch.Tensor, int, int, int, float | None]] = []  # loss, step, epoch, batch, lr

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # the step and learning rate the loss was computed with (both move on in the optimizer step)
        self._step = trainer.global_step
        self._lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        self._window.append((loss.detach().float().mean(), self._step, trainer.current_epoch, batch_idx, self._lr))
        # checked here, also for an epoch's last batch, not in on_train_epoch_end: under DDP rank 0's progress
        # bar syncs metrics there, and a second collective at that point would deadlock the processes
        if len(self._window) >= self.check_every_n_steps or batch_idx + 1 >= trainer.num_training_batches:
            self._check(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        window, self._window = self._window, []
        losses = torch.stack([entry[0] for entry in window]) if window else torch.zeros(0)
        bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()  # the one read back to the host
        # every DDP process checks at the same steps and must stop together, or the others wait forever
        stop = trainer.strategy.reduce_boolean_decision(bool(bad), all=False) if trainer.world_size > 1 else bool(bad)
        if not stop:
            return
        if not bad:
            raise NonFiniteLossError(
                "training loss is not finite on another process; lower --lr, set "
                "--gradient_clip_val 1.0, or check the data"
            )
        loss, step, epoch, batch_idx, lr = window[bad[0]]
        lr_text = "n/a" if lr is None else f"{lr:.3g}"
        raise NonFiniteLossError(
            f"training loss is {loss.item()} at step {step} (epoch {epoch}, batch {batch_idx}) with learning "
            f"rate {lr_text}: lower --lr, set --gradient_clip_val 1.0, or check the data; the last good "
            "checkpoint is in the run folder"
        )


class BadImageMonitor(Callback):
    """With `--skip_bad_images`: count the unreadable files the DataModule skipped, report their names at the
    end of each epoch (all of them in `<run>/bad_images.txt`), log `data/bad_images`, and stop the run once
    more than `max_bad_fraction` of the images are unreadable.
    """

    def __init__(self, max_bad_fraction: float = 0.01) -> None:
        self.max_bad_fraction = max_bad_fraction
        self.bad: dict[str, None] = {}  # unique paths, in the order they were met
        self._read = 0  # entries of the DataModule's bad_images already counted
        self._reported = 0

    def _collect(self, trainer: L.Trainer) -> None:
        found = getattr(trainer.datamodule, "bad_images", [])  # only grows: read what came since the last look
        self.bad.update(dict.fromkeys(found[self._read :]))
        self._read = len(found)

    def _check(self, trainer: L.Trainer, count: int) -> None:
        datamodule = trainer.datamodule
        total = sum(
            len(d)
            for d in (getattr(datamodule, "train_set", None), getattr(datamodule, "val_set", None))
            if d is not None
        )
        if total and count > self.max_bad_fraction * total:
            names = ", ".join(list(self.bad)[:5])
            raise TooManyBadImagesError(
                f"{count} of {total} images are unreadable, more than --max_bad_fraction {self.max_bad_fraction} "
                f"(e.g. {names}); fix or delete them, or raise --max_bad_fraction"
            )

    def _on_batch_end(self, trainer: L.Trainer) -> None:
        self._collect(trainer)
        # mid-epoch only on one process: a DDP process stopping alone would leave the others waiting
        if trainer.world_size == 1:
            self._check(trainer, len(self.bad))

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._on_batch_end(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._on_batch_end(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._collect(trainer)
        # each DDP process reads its own share of the files: the run's count is the sum
        count = int(trainer.strategy.reduce(torch.tensor(float(len(self.bad))), reduce_op="sum").item())
        pl_module.log("data/bad_images", float(count))
        log_dir = trainer.log_dir  # on every rank: under DDP it is a collective call
        if len(self.bad) > self._reported:
            self._reported = len(self.bad)
            names = list(self.bad)
            more = f" and {len(names) - 10} more" if len(names) > 10 else ""
            listing = ""
            if log_dir:
                listing_path = Path(log_dir, "bad_images.txt")
                listing_path.parent.mkdir(parents=True, exist_ok=True)
                listing_path.write_text("".join(f"{name}\n" for name in names))
                listing = f" (all listed in {listing_path})"
            rank_zero_info(f"skipped {len(names)} unreadable images so far{listing}: {', '.join(names[:10])}{more}")
        self._check(trainer, count)


# what every dead DataLoader worker ends the run with, whichever way its death surfaced
WORKER_DIED = (
    "a DataLoader worker process died ({}); lower --num_workers (or --batch_size), or enlarge /dev/shm "
    "(docker: --shm-size=8g; or mount a bigger tmpfs)"
)


def _chain(error: BaseException) -> list[BaseException]:
    """`error`, then the exceptions it was raised from or while handling, each once."""
    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _worker_died(error: BaseException) -> bool:
    # PyTorch's own reports ("... is killed by signal: ...", "... exited unexpectedly"); not "Caught X in
    # DataLoader worker process N", which is the worker's dataset raising, with the worker alive
    if "DataLoader worker (pid" in str(error):
        return True
    # a worker killed while a batch was on its way breaks the connection its shared memory is handed over by
    frames = (frame.f_code.co_filename for frame, _ in traceback.walk_tb(error.__traceback__))
    return isinstance(error, (ConnectionError, EOFError)) and any("multiprocessing" in name for name in frames)


def _disk_full(error: BaseException) -> str | None:
    """The line for a full disk behind `error` (a checkpoint, a cache or a log; the writer removed its partial
    file), None when there is none."""
    full = next((c for c in _chain(error) if isinstance(c, OSError) and c.errno in DISK_FULL), None)
    if full is None:
        return None
    where = ""
    if full.filename:
        folder = os.path.dirname(os.path.abspath(full.filename))
        where = f" writing {os.path.basename(full.filename)} into {folder!r}"
    return (
        f"the disk is full ({full.strerror}){where}: free some space on it, or write to another disk "
        "(--default_root_dir for runs and checkpoints, --cache_dir for the decoded cache)"
    )


class SourceGoneError(RuntimeError):
    """The streaming source stopped answering mid-run: its folder removed or unmounted, its bucket's credentials
    expired (raised by `project.tools.streaming_reader`)."""


def named_line(error: BaseException) -> str:
    """The line of a `BadImageError` or a `SourceGoneError` that names the file or the source: from a DataLoader
    worker, PyTorch re-raises either with the worker's whole traceback as its message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        for marker in ("cannot read image ", "streaming source "):
            _, found, rest = line.partition(marker)
            if found:
                return found + rest
    return lines[-1] if lines else type(error).__name__


def explain_failure(error: BaseException) -> str | None:
    """One line saying what went wrong and what to do, for the failures a user can fix; None otherwise.

    The exceptions `error` was raised from or while handling count too: a dead worker surfaces as PyTorch's
    report, as a broken connection, or as one of them raised while the other was handled, depending on timing,
    and each way ends with the same line.
    """
    chain = _chain(error)
    for cause in chain:
        if isinstance(cause, (BadImageError, SourceGoneError)):  # a file, or the streaming source, named
            return named_line(cause)
        if isinstance(cause, TrainingStopped):
            return str(cause)
    full = _disk_full(error)
    if full is not None:
        return full
    texts = [str(cause) for cause in chain]
    died = any(_worker_died(cause) for cause in chain)
    # a bus error, or a worker's failed allocation (re-raised as "Caught ... in DataLoader worker process N")
    if (died or any("DataLoader worker" in t for t in texts)) and any(
        "shared memory" in t or "bus error" in t.lower() for t in texts
    ):
        return WORKER_DIED.format("out of shared memory")
    if died:
        return WORKER_DIED.format("killed, often by the out-of-memory killer")
    timeout = next((t for t in texts if "DataLoader timed out" in t), None)
    if timeout is not None:
        return (
            f"{timeout.strip().splitlines()[0].rstrip('.')}: a worker spent longer than --loader_timeout on one "
            "batch (slow or hung storage, a stuck decoder); raise --loader_timeout, or check the data folder's "
            "file system"
        )
    return None


@contextmanager
def _worker_reports_set_aside() -> Iterator[None]:
    """Handle a failure without PyTorch's SIGCHLD handler, then leave it no dead worker to report.

    The handler reports a DataLoader worker that is dead and not yet reaped, as a RuntimeError raised
    wherever this process happens to be when a child exits. When a worker's death surfaced first in
    another way (a broken connection), that would be in the middle of the handling; afterwards, at the
    next child's exit, in the middle of whatever runs then.
    """
    # only from the main thread, and only a handler Python can put back (None: one installed from C)
    settable = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGCHLD) is not None
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL) if settable else None
    try:
        yield
    finally:
        multiprocessing.active_children()  # reaps the children that have ended, dead workers among them
        if previous is not None:
            signal.signal(signal.SIGCHLD, previous)


# how long the end of a run waits for a DDP process it started to end on its own before killing it
DDP_EXIT_GRACE_S = 60.0


def end_run(
    trainer: L.Trainer, failed: bool = False, prog: str = "train.py", grace_s: float = DDP_EXIT_GRACE_S
) -> None:
    """End what a DDP run leaves running, in order, so that nothing outlives the run; call it after fit and test.

    Lightning leaves two things running under DDP. The gloo process group: Lightning destroys only NCCL's
    at exit, and gloo's threads, alive while the interpreter shuts down, may then release a Python object
    and abort the process ("terminate called without an active exception", exit code -6, now and then).
    And the processes rank 0 started for the other ranks: its launcher does not wait for them. So every
    process waits for the others (not after a failure: one may never come), destroys the process group,
    and rank 0 waits for its processes, killing any still running after `grace_s`. Outside DDP it does
    nothing. After a run that succeeded here, a process that failed ends this one: one line, exit code 1.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if not failed:
            with suppress(RuntimeError):  # a process that failed has left: its exit code tells, below
                torch.distributed.barrier()
        # after a failure the group may be broken too; the failure's own line is what the user needs
        with suppress(RuntimeError) if failed else nullcontext():
            torch.distributed.destroy_process_group()
    launcher = trainer.strategy.launcher
    failures = []
    for rank, process in enumerate(getattr(launcher, "procs", None) or [], start=1):
        try:
            code = process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        if code != 0:
            failures.append(f"local rank {rank} (pid {process.pid}) with exit code {code}")
    if failures and not failed:
        print(f"{prog}: error: DDP process ended with an error: {', '.join(failures)}", file=sys.stderr)
        raise SystemExit(1)


@contextmanager
def clear_failures(trainer: L.Trainer, prog: str = "train.py") -> Iterator[None]:
    """Turn the end of an interrupted or failed run into an exit code and one line on stderr.

    An interruption exits with 128 + the signal number (its checkpoint is saved by `InterruptCheckpoint`);
    a failure `explain_failure` knows exits with 1; anything else propagates with its traceback.
    """
    interrupt = next((c for c in trainer.callbacks if isinstance(c, InterruptCheckpoint)), None)
    try:
        yield
    except BaseException as error:
        with _worker_reports_set_aside():
            if interrupt is not None and interrupt.signal is not None:
                code, message = interrupt.exit_code, _disk_full(error)  # its checkpoint could not be written
            elif isinstance(error, SIGTERMException):
                code, message = 128 + signal.SIGTERM, None
            else:
                code, message = 1, explain_failure(error)
            if message is not None:
                print(f"{prog}: error: {message}", file=sys.stderr)
            end_run(trainer, failed=True)  # a DDP run's other processes end too, not only this one
            if code == 1 and message is None:  # a failure nobody explains keeps its traceback
                raise
        raise SystemExit(code) from None
