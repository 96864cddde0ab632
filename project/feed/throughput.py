"""How fast the input pipeline and the model run on their own, and the `--num_workers auto` choice.

`measure_loader` times a DataLoader in steady state (worker start-up and the batches prefetched
during it are not counted), `measure_model` times forward + backward of a model on a ready batch
already on the device, and `sweep_workers` + `choose_workers` pick the worker count: the smallest one
whose expected end-to-end rate is within 5% of the best, where a loader faster than the model buys
nothing. Workers are bounded by `worker_budget`: the CPUs this process may use, per device, minus
one for the main process, which runs the training loop.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

TOLERANCE = 0.05  # counts within 5% of the best rate are as good: noise on a shared machine is about that


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def worker_budget(devices: int = 1, cpus: int | None = None) -> int:
    """Most DataLoader workers worth starting per device: CPUs per device minus the main process."""
    cpus = usable_cpus() if cpus is None else cpus
    return max(0, cpus // max(1, devices) - 1)


def candidate_workers(budget: int) -> list[int]:
    """Worker counts to try: every count up to 4, then roughly x1.5 steps, always ending at `budget`."""
    counts = list(range(min(budget, 4) + 1))
    n = 4
    while True:
        n = max(n + 1, round(n * 1.5))
        if n * 1.2 > budget:  # too close to the budget to tell apart from it: try the budget instead
            break
        counts.append(n)
    return sorted({*counts, budget})


@dataclass
class Rate:
    """A measured throughput: `samples` images over `seconds` of steady state."""

    samples: int
    seconds: float
    cpu_seconds: float = math.nan  # CPU time of the main process and the workers over the same span

    @property
    def per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.inf

    @property
    def cpu_ms_per_sample(self) -> float:
        """The work per image, which other load on a shared machine does not inflate (unlike wall time)."""
        return 1000 * self.cpu_seconds / self.samples if self.samples else math.nan


def cpu_seconds(worker_pids: Sequence[int]) -> float:
    """CPU time used so far by this process and the given worker processes, all their threads.

    Workers are read from Linux's /proc/<pid>/task/*/schedstat (nanoseconds; the 10 ms ticks of
    /proc/<pid>/stat are too coarse for short runs); NaN where that is unavailable.
    """
    total = time.process_time()
    for pid in worker_pids:
        tasks = Path(f"/proc/{pid}/task")
        if not tasks.is_dir():
            return math.nan
        for task in tasks.iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):  # a thread that ended meanwhile
                total += int((task / "schedstat").read_text().split()[0]) / 1e9
    return total


def _batch_len(batch: object) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    return len(first)


def measure_loader(
    loader: Iterable,
    batches: int = 20,
    warmup: int | None = None,
    max_seconds: float | None = None,
    progress: bool | str = False,
    to_batch: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Rate:
    """Images per second a loader delivers in steady state, with nothing consuming the batches.

    Args:
        loader: a DataLoader (or any iterable of `(images, labels)` batches).
        batches: batches to time after the warm-up (fewer if the loader runs out or time runs out).
        warmup: batches fetched before timing starts. Default: each worker's prefetched batches plus
            one, because those were prepared during start-up and would inflate the rate.
        max_seconds: stop timing after this long (at least two batches are always timed).
        progress: show a tqdm bar (a string is used as its description).
        to_batch: work done on each batch's images after the loader (e.g. the DataModule's device
            transform), timed with it.
    """
    if warmup is None:
        workers = getattr(loader, "num_workers", 0)
        warmup = 1 + workers * (getattr(loader, "prefetch_factor", None) or 2)
    if hasattr(loader, "__len__"):  # a short loader: fewer warm-up batches rather than no figure at all
        warmup = min(warmup, max(0, len(loader) - 2))
    bar = tqdm(
        total=warmup + batches,
        desc=progress if isinstance(progress, str) else None,
        unit="batch",
        disable=not progress,
        leave=False,
    )
    samples, timed = 0, 0
    iterator = iter(loader)
    workers = [w.pid for w in getattr(iterator, "_workers", [])]
    try:
        for _ in range(warmup):
            next(iterator, None)
            bar.update()
        start, cpu_start = time.perf_counter(), cpu_seconds(workers)
        for batch in iterator:
            bar.update()
            if to_batch is not None:
                to_batch(batch[0])
            samples += _batch_len(batch)
            timed += 1
            if timed >= batches or (max_seconds and timed >= 2 and time.perf_counter() - start > max_seconds):
                break
        seconds, cpu = time.perf_counter() - start, cpu_seconds(workers) - cpu_start
    finally:
        bar.close()
        del iterator
    if timed == 0:
        raise ValueError(f"the loader ran out after {warmup} warm-up batches: nothing left to time")
    return Rate(samples, seconds, cpu)


def autocast_for(device: torch.device, precision: str) -> torch.autocast | nullcontext:
    """The autocast context Lightning uses for `precision` ('16-mixed', 'bf16-mixed', ...)."""
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so a timer read after it covers the work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_model(
    model: nn.Module,
    batch_size: int,
    image_size: int,
    device: torch.device | str = "cpu",
    precision: str = "32-true",
    steps: int = 5,
    warmup: int = 2,
    num_classes: int | None = None,
    max_seconds: float | None = None,
) -> Rate:
    """Images per second of forward + backward on a random batch already on `device`.

    Runs on a copy of `model`, in training mode, so neither the weights nor the batch-norm statistics
    of the model being trained change. A cross-entropy loss against random labels is used when
    `num_classes` is given, else the sum of the outputs.
    """
    device = torch.device(device)
    model = copy.deepcopy(model).to(device).train()
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)  # (B, 3, S, S)
    labels = torch.randint(0, num_classes, (batch_size,), device=device) if num_classes else None

    def step() -> None:
        with autocast_for(device, precision):
            out = model(images)
            loss = nn.functional.cross_entropy(out, labels) if labels is not None else out.float().sum()
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):  # lazy initialisation, cuDNN autotuning, allocator growth
        step()
    synchronize(device)
    start, done = time.perf_counter(), 0
    for _ in range(steps):
        step()
        done += 1
        if max_seconds and done >= 2 and time.perf_counter() - start > max_seconds:
            break
    synchronize(device)
    return Rate(done * batch_size, time.perf_counter() - start)


def end_to_end(loader_rate: float, model_rate: float | None, num_workers: int) -> float:
    """Expected training rate: with workers the loader runs beside the model, so the slower one sets
    the pace; with `num_workers=0` the main process loads, then computes, so their times add up."""
    if not model_rate or math.isinf(model_rate):
        return loader_rate
    if num_workers == 0:
        return 1.0 / (1.0 / loader_rate + 1.0 / model_rate)
    return min(loader_rate, model_rate)


def choose_workers(rates: dict[int, float], model_rate: float | None = None, tolerance: float = TOLERANCE) -> int:
    """The smallest worker count whose expected end-to-end rate is within `tolerance` of the best."""
    if not rates:
        raise ValueError("no measured worker counts to choose from")
    expected = {n: end_to_end(rate, model_rate, n) for n, rate in rates.items()}
    best = max(expected.values())
    return min(n for n, rate in expected.items() if rate >= (1 - tolerance) * best)


def sweep_workers(
    make_loader: Callable[[int], DataLoader],
    counts: Sequence[int],
    model_rate: float | None = None,
    batches: int = 10,
    max_seconds: float | None = 3.0,
    progress: bool = False,
    report: Callable[[int, float], None] | None = None,
) -> dict[int, float]:
    """Loader-only images/s for each worker count in `counts` (ascending), as `{num_workers: img/s}`.

    Stops adding workers once the loader outruns `model_rate` (more cannot speed up training).
    `report(num_workers, img_per_s)` is called after each measurement.
    """
    rates: dict[int, float] = {}
    for n in sorted(counts):
        loader = make_loader(n)
        rate = measure_loader(
            loader, batches=batches, max_seconds=max_seconds, progress=f"num_workers={n}" if progress else False
        ).per_s
        del loader  # shuts its workers down before the next count starts its own
        rates[n] = rate
        if report is not None:
            report(n, rate)
        if model_rate and n > 0 and rate >= model_rate:
            break
    return rates


def auto_num_workers(
    datamodule, model: nn.Module, trainer, batches: int = 10, max_seconds: float = 2.0, verbose: bool = True
) -> int:
    """Resolve `--num_workers auto` before fit: sweep the training loader, time the model, pick, report.

    `datamodule` is an `ImageDataModule` (its `num_workers` and `hparams.num_workers` are set to the
    choice); `trainer` gives the device, precision and device count. Prints the measurements and logs
    them as `feed/auto_loader_img_per_s` (step = num_workers), `feed/auto_model_img_per_s` and
    `feed/num_workers`.
    """
    start = time.perf_counter()
    devices = max(1, trainer.num_devices)
    budget = worker_budget(devices)
    # attached now, as fit will attach it: setup and the loaders then see the real device (where the
    # augmentation runs, pinned memory) and measure the pipeline training will use
    datamodule.trainer = trainer
    datamodule.num_workers = budget  # a cache built during setup may use every worker allowed
    datamodule.setup("fit")
    device = trainer.strategy.root_device
    model_rate = measure_model(
        model,
        datamodule.batch_size,
        datamodule.image_size,
        device,
        str(trainer.precision),
        num_classes=getattr(model.hparams, "num_classes", None),
        steps=3,
        warmup=1,
        max_seconds=max_seconds,
    ).per_s

    def make_loader(n: int) -> DataLoader:
        datamodule.num_workers = n
        return datamodule.train_dataloader()

    rates = sweep_workers(
        make_loader, candidate_workers(budget), model_rate=model_rate, batches=batches, max_seconds=max_seconds
    )
    chosen = choose_workers(rates, model_rate)
    datamodule.num_workers = chosen
    datamodule.hparams["num_workers"] = chosen
    if verbose and trainer.is_global_zero:
        measured = ", ".join(f"{n}: {rate:.0f}" for n, rate in rates.items())
        print(
            f"num_workers auto: loader img/s by num_workers {{{measured}}}; model {model_rate:.0f} img/s "
            f"on {device.type}; chose num_workers={chosen} (at most {budget}: {usable_cpus()} CPUs / "
            f"{devices} device(s) - 1; sweep took {time.perf_counter() - start:.1f} s)"
        )
    for logger in trainer.loggers:
        for n, rate in rates.items():
            logger.log_metrics({"feed/auto_loader_img_per_s": rate}, step=n)
        logger.log_metrics({"feed/auto_model_img_per_s": model_rate, "feed/num_workers": chosen}, step=0)
    return chosen
