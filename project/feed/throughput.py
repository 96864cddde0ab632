"""How fast the input pipeline and the model run on their own, and the `--num_workers auto` choice.

The measuring tools, one of each, shared by `num_workers auto` and the benchmarks:

- `Rate`: samples over wall seconds, with the CPU seconds spent on them (main process and workers);
- `time_calls`: wall and CPU time of a function called once per item (per-image costs);
- `steady_loader`: a DataLoader that samples with replacement, endlessly, so no epoch boundary (and
  no worker restart) falls inside a measurement;
- `measure_loader`: a loader's steady-state rate; `warmup_batches` is the warm-up rule: the first
  batch and every batch the workers prefetch meanwhile (`num_workers * prefetch_factor`) are fetched
  before the clock starts, because they were prepared during start-up;
- `measure_model`: forward + backward of a model on a ready batch already on the device;
- `best_of`: repeated, interleaved measurements, the fastest kept.

`--num_workers auto` (`auto_num_workers`) follows this rule:

1. Candidates are 0, 1, 2, 3, 4, then steps of about x1.5, capped at `worker_budget`: the CPUs this
   process may use (its affinity mask) per device, minus one for the main process, which runs the
   training loop.
2. They are swept in ascending order, loader alone; the sweep stops once the loader with at least one
   worker outruns the model, because training then runs at the model's rate, which no further count
   can beat (so the counts left out could not change the choice).
3. Each measured count gets an expected training rate: with workers the loader runs beside the model
   and the slower one sets the pace; with none the main process loads, then computes, so their times add.
4. The choice is the smallest count whose expected rate is within 5% (at least 0.95x) of the best
   expected rate of every count the sweep measured; it prints both counts with their rates.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm import tqdm

TOLERANCE = 0.05  # counts within 5% of the best rate are as good: noise on a shared machine is about that
# samples an endless loader draws: far more than any measurement takes, small enough for len() to work
ENDLESS = 2**40


# -------------------------------------------------------------------------------------- measuring
@dataclass
class Rate:
    """A measured throughput: `samples` items over `seconds` of wall time."""

    samples: int
    seconds: float
    cpu_seconds: float = math.nan  # CPU time of the main process and its workers over the same span

    @property
    def per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.inf

    @property
    def ms_per_sample(self) -> float:
        return 1000 * self.seconds / self.samples if self.samples else math.nan

    @property
    def cpu_ms_per_sample(self) -> float:
        """The work per item, which other load on a shared machine does not inflate (unlike wall time)."""
        return 1000 * self.cpu_seconds / self.samples if self.samples else math.nan


def child_pids() -> list[int]:
    """Process ids of this process's children (a DataLoader's workers are among them), from Linux's /proc.

    Read from each thread's `children` file where the kernel has one, else from every process's
    parent id in `/proc/<pid>/stat`; empty where there is no /proc.
    """
    me = os.getpid()
    found: set[int] = set()
    listed = list(Path(f"/proc/{me}/task").glob("*/children"))
    for path in listed:
        with contextlib.suppress(OSError, ValueError):
            found.update(int(pid) for pid in path.read_text().split())
    if not listed:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):  # a process that ended meanwhile
                # fields after the command name, which is in parentheses and may hold spaces: state, ppid, ...
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == me:
                    found.add(int(stat.parent.name))
    return sorted(found)


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time used so far by this process and the given processes, all their threads.

    The others are read from Linux's /proc/<pid>/task/*/schedstat (nanoseconds; the 10 ms ticks of
    /proc/<pid>/stat are too coarse for short runs); NaN where that is unavailable.
    """
    if not Path("/proc/self/task").is_dir():
        return math.nan
    total = time.process_time()
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError, IndexError):  # a thread or process that ended meanwhile
                total += int((task / "schedstat").read_text().split()[0]) / 1e9
    return total


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` intra-op threads in this process, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def time_calls(fn: Callable[[int], Any], count: int, min_seconds: float = 0.0) -> Rate:
    """Wall and CPU time of `fn(0)`, ..., `fn(count - 1)`, after one untimed call to `fn(0)`.

    With `min_seconds`, cycles through the indices again until that much time has passed: a call of a
    fraction of a millisecond timed only a few times spans less than one scheduler time slice, so one
    preemption could double it.
    """
    fn(0)  # the first call pays for lazy imports and allocations
    calls = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    while calls < count or time.perf_counter() - start < min_seconds:
        fn(calls % count)
        calls += 1
    return Rate(calls, time.perf_counter() - start, time.process_time() - cpu_start)


def best_of(rounds: int, measures: dict[str, Callable[[], Rate]]) -> dict[str, Rate]:
    """Each measurement `rounds` times, interleaved, the fastest round of each kept.

    Other load on a shared machine only ever slows a measurement down, so the fastest round is the
    closest to the undisturbed figure; interleaving spreads a busy spell over all of them.
    """
    best: dict[str, Rate] = {}
    for _ in range(rounds):
        for name, measure in measures.items():
            rate = measure()
            if name not in best or rate.per_s > best[name].per_s:
                best[name] = rate
    return best


def steady_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, seed: int = 0, **kwargs: Any) -> DataLoader:
    """A DataLoader drawing from `dataset` with replacement, endlessly (other DataLoader keywords pass through).

    One epoch lasts longer than any measurement, so no epoch boundary, and no worker restart, ever
    falls inside one, whatever the warm-up and the number of timed batches.
    """
    sampler = RandomSampler(
        dataset, replacement=True, num_samples=ENDLESS, generator=torch.Generator().manual_seed(seed)
    )
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, **kwargs)


def warmup_batches(loader: Iterable) -> int:
    """Batches to fetch before timing `loader`: the first one, and every batch its workers prefetch
    during start-up (`num_workers * prefetch_factor`, as the loader sets them), which would inflate the rate."""
    workers = getattr(loader, "num_workers", 0) or 0
    return 1 + workers * (getattr(loader, "prefetch_factor", None) or 0)


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
        warmup: batches fetched before timing starts. Default: `warmup_batches(loader)`.
        max_seconds: stop timing after this long (at least two batches are always timed).
        progress: show a tqdm bar (a string is used as its description).
        to_batch: work done on each batch's images after the loader (e.g. the DataModule's device
            transform), timed with it.

    The CPU time counts this process and its child processes (the loader's workers; any other child
    is idle here and adds nothing).
    """
    if warmup is None:
        warmup = warmup_batches(loader)
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
    try:
        for _ in range(warmup):
            next(iterator, None)
            bar.update()
        workers = child_pids()  # started by now: the warm-up has received batches from each of them
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
    channels_last: bool = False,
    compile: bool = False,
) -> Rate:
    """Images per second of forward + backward on a random batch already on `device`.

    Runs on a copy of `model`, in training mode, so neither the weights nor the batch-norm statistics
    of the model being trained change. A cross-entropy loss against random labels is used when
    `num_classes` is given, else the sum of the outputs. `channels_last` puts the copy and the batch
    in NHWC layout; `compile` compiles the copy in place (the warm-up steps pay the compile time).
    """
    device = torch.device(device)
    model = copy.deepcopy(model).to(device).train()
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)  # (B, 3, S, S)
    labels = torch.randint(0, num_classes, (batch_size,), device=device) if num_classes else None
    if channels_last:
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if compile:
        model.compile()

    def step() -> None:
        with autocast_for(device, precision):
            out = model(images)
            loss = nn.functional.cross_entropy(out, labels) if labels is not None else out.float().sum()
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):  # lazy initialisation, compilation, cuDNN autotuning, allocator growth
        step()
    synchronize(device)
    start, cpu_start, done = time.perf_counter(), time.process_time(), 0
    for _ in range(steps):
        step()
        done += 1
        if max_seconds and done >= 2 and time.perf_counter() - start > max_seconds:
            break
    synchronize(device)
    return Rate(done * batch_size, time.perf_counter() - start, time.process_time() - cpu_start)


# -------------------------------------------------------------------------------- num_workers auto
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


def end_to_end(loader_rate: float, model_rate: float | None, num_workers: int) -> float:
    """Expected training rate: with workers the loader runs beside the model, so the slower one sets
    the pace; with `num_workers=0` the main process loads, then computes, so their times add up."""
    if not model_rate or math.isinf(model_rate):
        return loader_rate
    if num_workers == 0:
        return 1.0 / (1.0 / loader_rate + 1.0 / model_rate)
    return min(loader_rate, model_rate)


def expected_rates(rates: dict[int, float], model_rate: float | None = None) -> dict[int, float]:
    """`{num_workers: expected training img/s}` for measured loader-only rates."""
    return {n: end_to_end(rate, model_rate, n) for n, rate in rates.items()}


def best_workers(rates: dict[int, float], model_rate: float | None = None) -> int:
    """The measured count with the highest expected training rate (the smallest such count on a tie)."""
    if not rates:
        raise ValueError("no measured worker counts to choose from")
    expected = expected_rates(rates, model_rate)
    return max(sorted(expected), key=lambda n: expected[n])


def choose_workers(rates: dict[int, float], model_rate: float | None = None, tolerance: float = TOLERANCE) -> int:
    """The smallest measured count whose expected training rate is at least (1 - tolerance) x the best."""
    expected = expected_rates(rates, model_rate)
    best = expected[best_workers(rates, model_rate)]
    return min(n for n, rate in expected.items() if rate >= (1 - tolerance) * best)


def sweep_workers(
    make_loader: Callable[[int], Iterable],
    counts: Sequence[int],
    model_rate: float | None = None,
    batches: int = 10,
    max_seconds: float | None = 3.0,
    progress: bool | str = False,
    report: Callable[[int, float], None] | None = None,
) -> dict[int, float]:
    """Loader-only images/s for each worker count in `counts` (ascending), as `{num_workers: img/s}`.

    With `model_rate`, stops adding workers once the loader (with at least one worker) outruns it:
    training then runs at the model's rate, which more workers cannot raise. `report(num_workers,
    img_per_s)` is called after each measurement; `progress` names the bars (True: "num_workers=N").
    """
    rates: dict[int, float] = {}
    for n in sorted(counts):
        loader = make_loader(n)
        prefix = progress if isinstance(progress, str) else ""
        desc = f"{prefix}num_workers={n}" if progress else False
        rate = measure_loader(loader, batches=batches, max_seconds=max_seconds, progress=desc).per_s
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
    """Measure for `--num_workers auto` before fit: sweep the training loader, time the model, report, return
    the count to use (the training run sets it on the DataModule).

    `datamodule` is an `ImageDataModule`, set up with `trainer` attached, as fit will see it (where augmentation
    runs, pinned memory); its `loader(dataset, train, num_workers)` builds each candidate loader. `trainer`
    gives the device, precision and device count. Prints the measurements, the chosen count and the best one
    with their expected training rates, and logs them as `feed/auto_loader_img_per_s` (step = num_workers),
    `feed/auto_model_img_per_s` and `feed/num_workers`.
    """
    start = time.perf_counter()
    devices = max(1, trainer.num_devices)
    budget = worker_budget(devices)
    settings = datamodule.hparams
    device = trainer.strategy.root_device
    model_rate = measure_model(
        model,
        settings["batch_size"],
        settings["image_size"],
        device,
        str(trainer.precision),
        num_classes=getattr(model.hparams, "num_classes", None),
        steps=3,
        warmup=1,
        max_seconds=max_seconds,
    ).per_s

    def make_loader(n: int) -> DataLoader:
        return datamodule.loader(datamodule.train_set, train=True, num_workers=n)

    rates = sweep_workers(
        make_loader, candidate_workers(budget), model_rate=model_rate, batches=batches, max_seconds=max_seconds
    )
    chosen, best = choose_workers(rates, model_rate), best_workers(rates, model_rate)
    expected = expected_rates(rates, model_rate)
    if verbose and trainer.is_global_zero:
        measured = ", ".join(f"{n}: {rate:.0f}" for n, rate in rates.items())
        print(
            f"num_workers auto: loader img/s by num_workers {{{measured}}}; model {model_rate:.0f} img/s "
            f"on {device.type}; chose num_workers={chosen} ({expected[chosen]:.0f} img/s expected in training), "
            f"best num_workers={best} ({expected[best]:.0f} img/s): the fewest workers within "
            f"{TOLERANCE:.0%} of the best (at most {budget}: {usable_cpus()} CPUs / {devices} device(s) - 1; "
            f"sweep took {time.perf_counter() - start:.1f} s)"
        )
    for logger in trainer.loggers:
        for n, rate in rates.items():
            logger.log_metrics({"feed/auto_loader_img_per_s": rate}, step=n)
        logger.log_metrics({"feed/auto_model_img_per_s": model_rate, "feed/num_workers": chosen}, step=0)
    return chosen
