"""`DataFeedMonitor`: how long each training step waits for its batch, and which side is the bottleneck.

For every training step it measures two times:

- the data wait: from the end of the previous step (or the start of the epoch) to the start of this
  one. In Lightning's loop that gap holds the fetch from the DataLoader, the transfer to the device
  and `on_after_batch_transfer` (on-device transforms);
- the step: `on_train_batch_start` to `on_train_batch_end` (forward, backward, optimizer step).

On the CPU, `time.perf_counter` timestamps are exact. On a CUDA device the CPU runs ahead of the GPU,
so CPU timestamps would count time the GPU was busy as "waiting"; there the monitor records CUDA
events in the stream instead and reads them a few steps later, once the GPU has passed them: no
synchronisation and no `.item()` per step, so its own cost stays far below 1% of a step.

It logs `feed/data_wait_fraction`, `feed/data_wait_ms`, `feed/step_ms` and `feed/samples_per_s`
every `log_every_n_steps`, logs the wait share as `data_wait` (for the progress bar, not the logger:
`train.py`'s bar reads it at its refreshes; `prog_bar=True` would cost a GPU sync every step), and at the end of
fit prints one line starting with `data feed:` with the verdict and the one change most likely to help.
The verdict's words (`classify`, and `rate_reading` for loader-only against model-only rates) are the
ones the benchmark reports too.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.data import extract_batch_size

from project.feed.throughput import worker_budget

DATA_BOUND = 0.25  # waiting a quarter of each step or more: the loader is the bottleneck
MODEL_BOUND = 0.10  # waiting under a tenth: feeding is fine, the model sets the pace
MODEL_ADVICE = "the model is the bottleneck: larger batch, mixed precision"


@dataclass
class FeedSummary:
    """What the monitor measured over a fit, and its reading."""

    steps: int
    samples: int
    wait_s: float
    step_s: float
    verdict: str
    advice: str

    @property
    def wait_fraction(self) -> float:
        total = self.wait_s + self.step_s
        return self.wait_s / total if total > 0 else 0.0

    @property
    def samples_per_s(self) -> float:
        total = self.wait_s + self.step_s
        return self.samples / total if total > 0 else 0.0

    def line(self) -> str:
        """The one-line report printed at the end of fit."""
        if self.steps == 0:
            return "data feed: no training steps were measured"
        wait_ms, step_ms = 1000 * self.wait_s / self.steps, 1000 * self.step_s / self.steps
        return (
            f"data feed: {self.verdict}: training waited for data {self.wait_fraction:.0%} of the time "
            f"(wait {wait_ms:.1f} ms + step {step_ms:.1f} ms per batch, {self.samples_per_s:.0f} img/s "
            f"over {self.steps} steps); {self.advice}"
        )


def classify(wait_fraction: float) -> str:
    """'data-bound', 'balanced' or 'model-bound' from the share of time spent waiting for data."""
    if wait_fraction >= DATA_BOUND:
        return "data-bound"
    if wait_fraction < MODEL_BOUND:
        return "model-bound"
    return "balanced"


def rate_reading(verdict: str, loader_per_s: float, model_per_s: float) -> str:
    """The verdict with "by how much": the loader-only rate against the model-only rate."""
    ratio = loader_per_s / model_per_s
    if verdict == "data-bound":
        return f"data-bound: the loader delivers {ratio:.2f}x what the model could take"
    if verdict == "model-bound":
        return f"model-bound: the loader could deliver {ratio:.2f}x what the model takes"
    return f"balanced: the loader delivers {ratio:.2f}x the model's rate"


def workers_needed(num_workers: int, wait_s: float, step_s: float) -> int:
    """Workers that would hide the measured wait, assuming they scale linearly.

    With n workers and a data-bound loop, each worker delivers one batch per n * (wait + step)
    seconds; keeping up with the model needs one per `step` seconds. With no workers the main
    process spends `wait` per batch loading, so ceil(wait / step) workers would cover it.
    """
    if step_s <= 0:
        return num_workers + 1
    per_batch = (num_workers * (wait_s + step_s)) if num_workers > 0 else wait_s
    return max(num_workers + 1, math.ceil(per_batch / step_s - 1e-9))  # 6.000000001 workers is 6


def recommend(
    wait_fraction: float,
    wait_s: float,
    step_s: float,
    num_workers: int | None,
    max_workers: int,
    on_accelerator: bool = False,
    augment_on: str | None = None,
    cached: bool = False,
    decode_on: str | None = None,
) -> tuple[str, str]:
    """(verdict, the single change most likely to help) for a measured wait share.

    `wait_s` and `step_s` are per-batch means; `max_workers` is the worker budget of this machine;
    `cached`: the images are already decoded once (or cannot be: a streaming source).
    """
    verdict = classify(wait_fraction)
    if verdict == "model-bound":
        return verdict, MODEL_ADVICE
    if num_workers is not None and num_workers < max_workers:
        target = min(max_workers, workers_needed(num_workers, wait_s, step_s))
        return verdict, f"raise --num_workers from {num_workers} to {target}"
    if on_accelerator and augment_on != "device":
        return verdict, "use --augment_on device"
    if not cached and on_accelerator and decode_on != "device":  # decoding is the largest per-image cost
        return verdict, "use --decode_on device (or --cache)"
    if not cached:
        return verdict, "use --cache"
    if verdict == "balanced":
        return verdict, MODEL_ADVICE
    return verdict, "the loader is at its limit: fewer or smaller images (--image_size), or more CPUs"


class DataFeedMonitor(Callback):
    """Measure data wait vs step time for every training step; log it, show it, and read it at the end.

    Args:
        log_every_n_steps: logging period in steps (default: the trainer's `log_every_n_steps`).
        warmup_steps: steps at the start of fit left out of the verdict: they include starting the
            workers and the first, slow iterations (allocator growth, cuDNN autotuning).
        verbose: print the `data feed:` line at the end of fit (global rank 0 only).
    """

    def __init__(self, log_every_n_steps: int | None = None, warmup_steps: int = 2, verbose: bool = True) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.warmup_steps = warmup_steps
        self.verbose = verbose
        self.summary: FeedSummary | None = None
        self._reset()

    def _reset(self) -> None:
        self._cuda = False
        self._prev_end = None  # float seconds, or a CUDA event
        self._start = None
        self._pending: deque = deque()  # CUDA: (prev_end, start, end, samples) not yet read
        self._seen = 0  # steps measured so far in this fit (warm-up included)
        self._window = [0, 0, 0.0, 0.0]  # steps, samples, wait_s, step_s since the last log
        self._total = [0, 0, 0.0, 0.0]  # the same over the fit, after warm-up

    # ------------------------------------------------------------------ timing
    def _mark(self):
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _add(self, wait_s: float, step_s: float, samples: int) -> None:
        self._seen += 1
        for acc in (self._window, self._total) if self._seen > self.warmup_steps else (self._window,):
            acc[0] += 1
            acc[1] += samples
            acc[2] += wait_s
            acc[3] += step_s

    def _drain(self, wait: bool = False) -> None:
        """Read the CUDA events the GPU has passed (all of them with `wait`)."""
        while self._pending:
            prev_end, start, end, samples = self._pending[0]
            if not wait and not end.query():
                break
            if wait:
                end.synchronize()
            self._pending.popleft()
            self._add(prev_end.elapsed_time(start) / 1000, start.elapsed_time(end) / 1000, samples)

    # ------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self.summary = None
        self._cuda = trainer.strategy.root_device.type == "cuda"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the first batch of an epoch waits for the loader's iterator (and its workers) too: real waiting
        self._prev_end = self._mark()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # validation inside an epoch is not data wait: restart the clock when training resumes
        if self._prev_end is not None:
            self._prev_end = self._mark()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._start = self._mark()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if self._start is None or self._prev_end is None:
            return
        end = self._mark()
        samples = extract_batch_size(batch)
        if self._cuda:
            self._pending.append((self._prev_end, self._start, end, samples))
            self._drain()
        else:
            self._add(self._start - self._prev_end, end - self._start, samples)
        self._prev_end, self._start = end, None

        every = self.log_every_n_steps or trainer.log_every_n_steps or 50
        if self._window[0] >= every:  # counted in measured steps: CUDA readings arrive a few steps late
            self._log_window(trainer, pl_module)

    def _log_window(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        steps, samples, wait_s, step_s = self._window
        self._window = [0, 0, 0.0, 0.0]
        total = wait_s + step_s
        fraction = wait_s / total if total > 0 else 0.0
        metrics = {
            "feed/data_wait_fraction": fraction,
            "feed/data_wait_ms": 1000 * wait_s / steps,
            "feed/step_ms": 1000 * step_s / steps,
            "feed/samples_per_s": samples / total if total > 0 else 0.0,
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        pl_module.log("data_wait", fraction, logger=False, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._cuda:
            self._drain(wait=True)
        steps, samples, wait_s, step_s = self._total
        if steps == 0:  # a run shorter than the warm-up: better a rough reading than none
            steps, samples, wait_s, step_s = self._window
        datamodule = trainer.datamodule
        loader = trainer.train_dataloader
        num_workers = getattr(loader, "num_workers", None)
        source = getattr(datamodule, "source", None)  # ImageDataModule's; any other DataModule gives no hints
        total = wait_s + step_s
        fraction = wait_s / total if total > 0 else 0.0
        verdict, advice = recommend(
            fraction,
            wait_s / max(1, steps),
            step_s / max(1, steps),
            num_workers=num_workers if isinstance(num_workers, int) else None,
            max_workers=worker_budget(max(1, trainer.num_devices)),
            on_accelerator=trainer.strategy.root_device.type != "cpu",
            augment_on=getattr(datamodule, "augment_on", None),
            cached=getattr(source, "stores_decoded", False),
            decode_on="device" if getattr(source, "decodes_on_device", False) else "cpu",
        )
        self.summary = FeedSummary(steps, samples, wait_s, step_s, verdict, advice)
        if self.verbose and trainer.is_global_zero:
            print(self.summary.line())
