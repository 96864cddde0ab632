"""`--num_workers auto` and the loader timing under it: steady-state rates, CPU time, the budget, the choice.

Timing bounds here rest on sleeping: a sleep never ends early, and a sleeping worker needs no CPU, so
a busy machine can only make a measured rate lower, never higher; lower bounds leave room for stalls.
"""

from __future__ import annotations

import re
import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from project.data import ImageDataModule, generate_shapes
from project.feed import throughput
from project.feed.throughput import (
    candidate_workers,
    choose_workers,
    end_to_end,
    measure_loader,
    measure_model,
    sweep_workers,
    warmup_batches,
    worker_budget,
)
from project.models import ImageClassifier

ITEM_DELAY = 0.025  # seconds per image: sleeping, so workers overlap it perfectly even on a busy machine


class SlowItems(Dataset):
    def __init__(self, length: int = 10_000) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        time.sleep(ITEM_DELAY)
        return torch.zeros(3, 8, 8), 0


def slow_loader(num_workers: int) -> DataLoader:
    return DataLoader(SlowItems(), batch_size=4, num_workers=num_workers)


def test_loader_rate_shows_the_known_delay():
    rate = measure_loader(slow_loader(0), batches=8)
    ceiling = 1 / ITEM_DELAY  # 40 img/s: one process sleeping ITEM_DELAY per image
    assert rate.samples == 8 * 4  # only the timed batches count, not the warm-up one
    # above the ceiling only if a sleep ended early; 0.6x leaves 0.5 s of stalls over the 0.8 s timed
    assert 0.6 * ceiling <= rate.per_s <= 1.02 * ceiling


def slow_start(worker_id: int) -> None:
    time.sleep(2.0)  # a worker that takes two seconds to start (imports, opening files, ...)


def test_steady_state_leaves_worker_start_up_out():
    ceiling = 2 / ITEM_DELAY  # two workers sleeping ITEM_DELAY per image: 80 img/s
    loader = DataLoader(SlowItems(), batch_size=4, num_workers=2, worker_init_fn=slow_start)
    rate = measure_loader(loader, batches=12)
    # counting the start-up would give 48 images / (2 s + 0.6 s) = 0.23x the ceiling; left out, the rate
    # is near the ceiling, and 0.5x leaves 0.6 s of stalls. No upper bound: batches the workers prefetch
    # while the main process stalls arrive at once afterwards, so a stall can push a short reading above it.
    assert rate.per_s >= 0.5 * ceiling
    assert rate.samples == 12 * 4


class CountingLoader:
    """A loader stand-in that counts the batches taken from it; it reports 2 workers prefetching 3 each."""

    num_workers, prefetch_factor = 2, 3

    def __init__(self) -> None:
        self.taken = 0

    def __iter__(self):
        while True:
            self.taken += 1
            yield torch.zeros(1, 1), torch.zeros(1)


def test_warm_up_skips_every_batch_the_workers_prefetch():
    assert warmup_batches(CountingLoader()) == 1 + 2 * 3  # the loader's own prefetch_factor, not a default
    assert warmup_batches(DataLoader(SlowItems(), num_workers=3, prefetch_factor=4)) == 13
    assert warmup_batches(DataLoader(SlowItems())) == 1  # no workers: only the first batch
    loader = CountingLoader()
    rate = measure_loader(loader, batches=5)
    assert loader.taken == 7 + 5 and rate.samples == 5


class BusyItems(Dataset):
    """Each image costs CPU_MS of CPU time in the process that loads it (spinning, not sleeping)."""

    CPU_MS = 5.0

    def __len__(self) -> int:
        return 10_000

    def __getitem__(self, index: int):
        end = time.thread_time() + self.CPU_MS / 1000
        while time.thread_time() < end:
            pass
        return torch.zeros(3, 8, 8), 0


def test_cpu_time_counts_the_workers():
    rate = measure_loader(DataLoader(BusyItems(), batch_size=4, num_workers=1), batches=10)
    # the worker spends CPU_MS per image; over the timed span it makes at least the timed batches minus
    # the 2 it may have prefetched before (8 of 10), so >= 0.8 x CPU_MS per image; the main process
    # alone spends a small fraction of a millisecond per image
    assert rate.cpu_ms_per_sample >= 0.7 * BusyItems.CPU_MS


def test_budget_is_cpus_per_device_minus_the_main_process(monkeypatch):
    assert worker_budget(1, cpus=16) == 15
    assert worker_budget(2, cpus=16) == 7
    assert worker_budget(1, cpus=2) == 1
    assert worker_budget(4, cpus=2) == 0
    monkeypatch.setattr(throughput.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert throughput.usable_cpus() == 4
    assert worker_budget(1) == 3


@pytest.mark.parametrize("budget", [0, 1, 2, 3, 5, 7, 15, 31, 63])
def test_candidates_never_exceed_the_budget(budget):
    counts = candidate_workers(budget)
    assert counts[0] == 0 and counts[-1] == budget and max(counts) <= budget
    assert counts == sorted(set(counts))
    assert len(counts) <= 12  # a short sweep even on a large machine


def test_choice_is_the_smallest_count_near_the_best():
    rates = {0: 100.0, 1: 190.0, 2: 200.0, 3: 201.0}
    assert choose_workers(rates) == 2  # 200 is within 5% of 201, 190 is not
    # a model taking 150 img/s: one worker already keeps up; no workers means load-then-compute
    assert choose_workers(rates, model_rate=150.0) == 1
    assert end_to_end(100.0, 150.0, 0) == pytest.approx(60.0)
    # in-memory data: no workers is fastest and the model is slow: no worker processes at all
    assert choose_workers({0: 5000.0, 1: 3000.0}, model_rate=50.0) == 0


def test_sweep_stops_once_the_loader_outruns_the_model():
    seen = []
    rates = sweep_workers(slow_loader, [0, 1, 2, 3], model_rate=20.0, batches=4, report=lambda n, rate: seen.append(n))
    # one worker (up to 40 img/s; under 20 only if stalls took half the time) outruns 20 img/s:
    # counts 2 and 3 are never started
    assert list(rates) == seen == [0, 1]
    assert choose_workers(rates, 20.0) == 1


def fake_run(monkeypatch, tmp_path, loader_rates: dict[int, float], model_rate: float):
    """auto_num_workers on a real DataModule and Trainer, with the sweep and the model timing replaced
    by known rates; returns (chosen, printed line, the counts the sweep was asked to measure)."""
    asked = []

    def sweep(make_loader, counts, model_rate=None, **kw):
        asked.extend(counts)
        return {n: rate for n, rate in loader_rates.items() if n in counts}

    monkeypatch.setattr(throughput, "usable_cpus", lambda: 8)
    monkeypatch.setattr(throughput, "sweep_workers", sweep)
    monkeypatch.setattr(throughput, "measure_model", lambda *a, **kw: throughput.Rate(int(model_rate), 1.0))
    data = generate_shapes(tmp_path / "shapes", image_size=32, per_class={"train": 8, "val": 1}, progress=False)
    dm = ImageDataModule(data, image_size=32, batch_size=4, num_workers=0)
    model = ImageClassifier("simple_cnn", num_classes=8, image_size=32)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    dm.trainer = trainer  # as the training run attaches it before its first setup
    dm.setup("fit")
    chosen = throughput.auto_num_workers(dm, model, trainer)
    return chosen, dm, asked


def test_auto_picks_within_5_percent_of_the_best_it_measured_and_prints_both(monkeypatch, tmp_path, capsys):
    # the model takes 1000 img/s, more than any loader here: the loader alone sets the training rate
    rates = {0: 100.0, 1: 150.0, 2: 190.0, 3: 200.0, 4: 170.0, 7: 110.0}
    chosen, dm, asked = fake_run(monkeypatch, tmp_path, rates, model_rate=1000.0)
    assert asked == [0, 1, 2, 3, 4, 7]  # up to the budget: 8 CPUs - 1
    expected = {n: end_to_end(rate, 1000.0, n) for n, rate in rates.items()}
    assert chosen == 2  # the fewest workers at >= 0.95 x the best (200 at 3 workers)
    assert expected[chosen] >= 0.95 * max(expected.values())
    assert dm.hparams["num_workers"] == dm.num_workers == 0  # measured only: the training run sets the choice
    line = capsys.readouterr().out
    chose = re.search(r"chose num_workers=(\d+) \((\d+) img/s", line)
    best = re.search(r"best num_workers=(\d+) \((\d+) img/s", line)
    assert chose and best, line
    assert (int(chose[1]), int(chose[2])) == (2, 190) and (int(best[1]), int(best[2])) == (3, 200)


def test_auto_reports_the_same_count_as_best_when_one_wins_clearly(monkeypatch, tmp_path, capsys):
    chosen, _, _ = fake_run(monkeypatch, tmp_path, {0: 50.0, 1: 400.0, 2: 300.0}, model_rate=1000.0)
    assert chosen == 1
    assert "chose num_workers=1 (400 img/s" in capsys.readouterr().out


def test_model_rate_leaves_the_model_untouched():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2)
    )
    model(torch.zeros(1, 3, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rate = measure_model(model, batch_size=4, image_size=8, steps=2, warmup=1, num_classes=2)
    assert rate.samples == 8 and rate.per_s > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats too


def test_auto_never_picks_more_workers_than_allowed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(throughput, "usable_cpus", lambda: 3)  # budget: 3 CPUs - 1 = 2 workers
    data = generate_shapes(tmp_path / "shapes", image_size=32, per_class={"train": 8, "val": 1}, progress=False)
    dm = ImageDataModule(data, image_size=32, batch_size=4, num_workers=7)
    model = ImageClassifier("simple_cnn", num_classes=8, image_size=32)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    dm.trainer = trainer
    dm.setup("fit")
    chosen = throughput.auto_num_workers(dm, model, trainer, batches=3, max_seconds=0.5)
    assert 0 <= chosen <= 2
    out = capsys.readouterr().out
    assert f"chose num_workers={chosen}" in out and "at most 2" in out


def test_a_short_loader_still_gets_a_figure():
    # 3 batches, 2 workers: the usual 5 warm-up batches would leave nothing to time
    loader = DataLoader(SlowItems(12), batch_size=4, num_workers=2)
    rate = measure_loader(loader, batches=10)
    assert rate.samples == 8  # one warm-up batch, two timed
    with pytest.raises(ValueError, match="nothing left to time"):
        measure_loader(iter([]), batches=2, warmup=0)
