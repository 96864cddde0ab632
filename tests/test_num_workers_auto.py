"""`--num_workers auto`: steady-state loader rates, the worker budget, and the choice."""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from project.cli import train_parser
from project.data import ImageDataModule, generate_shapes
from project.feed import throughput
from project.feed.throughput import (
    candidate_workers,
    choose_workers,
    end_to_end,
    measure_loader,
    measure_model,
    sweep_workers,
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
    rate = measure_loader(slow_loader(0), batches=8).per_s
    expected = 1 / ITEM_DELAY  # 40 img/s
    assert 0.75 * expected <= rate <= 1.02 * expected


def slow_start(worker_id: int) -> None:
    time.sleep(1.0)  # a worker that takes a second to start (imports, opening files, ...)


def test_steady_state_leaves_worker_start_up_out():
    ceiling = 2 / (4 * ITEM_DELAY) * 4  # two workers, 4 images of ITEM_DELAY each per batch: 80 img/s
    quick = measure_loader(slow_loader(2), batches=6).per_s
    slow = measure_loader(
        DataLoader(SlowItems(), batch_size=4, num_workers=2, worker_init_fn=slow_start), batches=6
    ).per_s
    # counting the start-up second would cut the rate to under half; counting the batches prepared
    # during it would push it above what two workers can deliver
    assert slow >= 0.7 * quick
    assert max(quick, slow) <= 1.1 * ceiling


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
    # one worker (up to 40 img/s) already outruns 20 img/s: counts 2 and 3 are never started
    assert list(rates) == seen == [0, 1]
    assert choose_workers(rates, 20.0) == 1


def test_sweep_choice_is_within_ten_percent_of_the_best():
    rates = sweep_workers(slow_loader, [0, 1, 2], batches=6)
    chosen = choose_workers(rates)
    assert rates[chosen] >= 0.9 * max(rates.values())
    assert chosen == 2  # sleeping workers scale: the most workers is the clear best


def test_model_rate_leaves_the_model_untouched():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2)
    )
    model(torch.zeros(1, 3, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rate = measure_model(model, batch_size=4, image_size=8, steps=2, warmup=1, num_classes=2)
    assert rate.samples == 8 and rate.per_s > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats too


def test_flag_accepts_auto_and_counts(capsys):
    parser = train_parser()
    assert parser.parse_args(["--num_workers", "auto"]).num_workers == "auto"
    assert parser.parse_args(["--num-workers", "3"]).num_workers == 3
    for bad in ("-1", "many"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["--num_workers", bad])
        assert exit_info.value.code == 2
        assert "--num_workers" in capsys.readouterr().err


def test_auto_never_picks_more_workers_than_allowed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(throughput, "usable_cpus", lambda: 3)  # budget: 3 CPUs - 1 = 2 workers
    data = generate_shapes(tmp_path / "shapes", image_size=32, per_class={"train": 8, "val": 1}, progress=False)
    dm = ImageDataModule(data, image_size=32, batch_size=4, num_workers=7)
    model = ImageClassifier("simple_cnn", num_classes=8, image_size=32)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    chosen = throughput.auto_num_workers(dm, model, trainer, batches=3, max_seconds=0.5)
    assert 0 <= chosen <= 2
    assert dm.num_workers == chosen and dm.hparams["num_workers"] == chosen
    assert dm.train_dataloader().num_workers == chosen
    out = capsys.readouterr().out
    assert f"chose num_workers={chosen}" in out and "at most 2" in out


def test_a_short_loader_still_gets_a_figure():
    # 3 batches, 2 workers: the usual 5 warm-up batches would leave nothing to time
    loader = DataLoader(SlowItems(12), batch_size=4, num_workers=2)
    rate = measure_loader(loader, batches=10)
    assert rate.samples == 8  # one warm-up batch, two timed
    with pytest.raises(ValueError, match="nothing left to time"):
        measure_loader(iter([]), batches=2, warmup=0)
