"""DataFeedMonitor: the measured wait matches a known delay, the verdict follows the bottleneck."""

from __future__ import annotations

import csv
import time
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset, TensorDataset

from project.callbacks import DataFeedMonitor
from project.cli import train_parser
from project.feed.monitor import MODEL_ADVICE, FeedSummary, classify, recommend, workers_needed
from project.models import ImageClassifier
from project.training import build_callbacks

DELAY = 0.25  # seconds per batch


@pytest.fixture(autouse=True)
def one_thread():
    # two intra-op threads on a busy 2-core machine spin against each other; one is steadier
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RandomImages(Dataset):
    """Normalized float images ready for the model: no per-item work to speak of."""

    def __init__(self, length: int, size: int = 64) -> None:
        self.length, self.size = length, size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return torch.randn(3, self.size, self.size), index % 8


def sleepy_collate(items):
    time.sleep(DELAY)  # the known artificial delay, once per batch
    return torch.utils.data.default_collate(items)


def fit(model: L.LightningModule, loader: DataLoader, tmp_path, batches: int) -> tuple[DataFeedMonitor, L.Trainer]:
    monitor = DataFeedMonitor(log_every_n_steps=1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        logger=CSVLogger(tmp_path, name="feed"),
        callbacks=[monitor],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, train_dataloaders=loader)
    return monitor, trainer


def test_sleeping_loader_reads_data_bound_with_its_delay(tmp_path, capsys):
    # batches of 2 keep the step short even on a busy machine: the wait is what is being measured
    loader = DataLoader(RandomImages(64), batch_size=2, collate_fn=sleepy_collate)
    monitor, trainer = fit(ImageClassifier("simple_cnn", num_classes=8), loader, tmp_path, batches=6)

    summary = monitor.summary
    assert summary.steps == 4  # 6 steps minus 2 warm-up steps
    assert summary.verdict == "data-bound"
    assert summary.wait_fraction >= 0.7
    wait_per_batch = summary.wait_s / summary.steps
    assert DELAY * 0.95 <= wait_per_batch <= DELAY + 0.1  # the delay, plus the collate and hooks at most
    assert summary.samples == 8
    # no workers and spare CPUs, or no spare CPUs at all: either way the advice is a concrete change
    assert summary.advice.startswith(("raise --num_workers from 0 to", "use --"))

    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("data feed:"))
    assert "data-bound" in line and f"{summary.wait_fraction:.0%}" in line

    # logged to the logger every step after warm-up, and shown in the progress bar
    with open(next(tmp_path.glob("feed/version_*/metrics.csv"))) as file:
        rows = list(csv.DictReader(file))
    fractions = [float(r["feed/data_wait_fraction"]) for r in rows if r.get("feed/data_wait_fraction")]
    waits = [float(r["feed/data_wait_ms"]) for r in rows if r.get("feed/data_wait_ms")]
    assert len(fractions) == 6 and min(fractions[2:]) >= 0.5
    assert all(w >= 1000 * DELAY * 0.95 for w in waits[1:])
    assert {"feed/step_ms", "feed/samples_per_s"} <= set(rows[0])
    assert trainer.progress_bar_metrics["data_wait"] >= 0.5


def test_ready_tensors_under_resnet18_read_model_bound(tmp_path, capsys):
    images = torch.randn(40, 3, 64, 64)  # (N, 3, 64, 64) float, already normalized
    loader = DataLoader(TensorDataset(images, torch.arange(40) % 8), batch_size=8)
    monitor, _ = fit(ImageClassifier("resnet18", num_classes=8), loader, tmp_path, batches=5)

    summary = monitor.summary
    assert summary.verdict == "model-bound"
    assert summary.wait_fraction <= 0.2
    assert summary.advice == MODEL_ADVICE
    assert capsys.readouterr().out.count("data feed: model-bound") == 1


def test_thresholds_flip_the_verdict():
    assert classify(0.9) == "data-bound"
    assert classify(0.25) == "data-bound"
    assert classify(0.15) == "balanced"
    assert classify(0.05) == "model-bound"


def test_advice_follows_the_bottleneck():
    # waiting 2/3 of the time with 2 workers: each worker needs 3 step-times per batch -> 6 workers
    assert recommend(2 / 3, 0.2, 0.1, num_workers=2, max_workers=15) == (
        "data-bound",
        "raise --num_workers from 2 to 6",
    )
    assert recommend(2 / 3, 0.2, 0.1, num_workers=2, max_workers=4)[1] == "raise --num_workers from 2 to 4"
    # the same run once the loader keeps up
    assert recommend(0.03, 0.003, 0.1, num_workers=6, max_workers=15) == ("model-bound", MODEL_ADVICE)
    # workers maxed out: move the augmentation off the CPU, else cache the decoded images
    assert (
        recommend(0.5, 0.1, 0.1, num_workers=4, max_workers=4, on_accelerator=True, augment_on="cpu")[1]
        == "use --augment_on device"
    )
    assert recommend(0.5, 0.1, 0.1, num_workers=4, max_workers=4, on_accelerator=False)[1] == "use --cache"
    assert "--num_workers" not in recommend(0.5, 0.1, 0.1, num_workers=4, max_workers=4, cached=True)[1]


def test_workers_needed_scales_with_the_wait():
    assert workers_needed(0, wait_s=0.25, step_s=0.05) == 5  # main process loads 5 step-times per batch
    assert workers_needed(4, wait_s=0.1, step_s=0.1) == 8
    assert workers_needed(4, wait_s=0.0, step_s=0.1) == 5  # never "raise" to the same count


def test_summary_line_reports_the_figures():
    summary = FeedSummary(steps=10, samples=640, wait_s=3.0, step_s=1.0, verdict="data-bound", advice="use --cache")
    assert summary.wait_fraction == pytest.approx(0.75)
    assert summary.samples_per_s == pytest.approx(160.0)
    line = summary.line()
    assert line.startswith("data feed: data-bound")
    assert "75%" in line and "300.0 ms" in line and "100.0 ms" in line and line.endswith("use --cache")


def test_monitor_is_on_by_default_and_off_with_the_flag():
    def monitors(argv):
        return [c for c in build_callbacks(train_parser().parse_args(argv)) if isinstance(c, DataFeedMonitor)]

    assert len(monitors([])) == 1
    assert monitors(["--no-feed_monitor"]) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_events_measure_the_wait_without_syncing(tmp_path):
    loader = DataLoader(RandomImages(48), batch_size=4, collate_fn=sleepy_collate)
    monitor = DataFeedMonitor(log_every_n_steps=1)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=6,
        limit_val_batches=0,
        enable_checkpointing=False,
        logger=False,
        callbacks=[monitor],
        default_root_dir=tmp_path,
    )
    trainer.fit(ImageClassifier("simple_cnn", num_classes=8), train_dataloaders=loader)
    summary = monitor.summary
    assert summary.steps == 4 and summary.verdict == "data-bound"
    assert DELAY * 0.95 <= summary.wait_s / summary.steps <= DELAY + 0.1


def test_monitor_costs_far_less_than_one_percent_of_a_step():
    # the hooks alone, called as the loop calls them; a 10 ms step (a small model on a GPU) is the yardstick
    trainer = SimpleNamespace(
        log_every_n_steps=10**9, loggers=[], global_step=0, strategy=SimpleNamespace(root_device=torch.device("cpu"))
    )
    monitor = DataFeedMonitor()
    monitor.on_fit_start(trainer, None)
    monitor.on_train_epoch_start(trainer, None)
    batch = (torch.zeros(4, 3, 8, 8), torch.zeros(4))
    steps = 2000
    start = time.perf_counter()
    for i in range(steps):
        monitor.on_train_batch_start(trainer, None, batch, i)
        monitor.on_train_batch_end(trainer, None, None, batch, i)
    per_step = (time.perf_counter() - start) / steps
    assert per_step < 0.01 * 0.010
    assert monitor._total[0] == steps - monitor.warmup_steps


class LaggingEvent:
    """Stands in for torch.cuda.Event: a timestamp that the 'GPU' reports as passed only every other query."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.time, self.queries = None, 0

    def record(self) -> None:
        self.time = time.perf_counter()

    def query(self) -> bool:
        self.queries += 1
        return self.queries % 2 == 0

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other: LaggingEvent) -> float:
        return 1000 * (other.time - self.time)


def test_event_readings_arriving_late_lose_no_step(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "Event", LaggingEvent)
    trainer = SimpleNamespace(
        log_every_n_steps=3,
        loggers=[],
        global_step=0,
        num_devices=1,
        datamodule=None,
        train_dataloader=SimpleNamespace(num_workers=0),
        is_global_zero=True,
        strategy=SimpleNamespace(root_device=torch.device("cuda", 0)),
    )
    shown = {}
    module = SimpleNamespace(log=lambda name, value, **kw: shown.update({name: value}))
    monitor = DataFeedMonitor(warmup_steps=1)
    monitor.on_fit_start(trainer, module)
    monitor.on_train_epoch_start(trainer, module)
    batch = (torch.zeros(2, 3, 8, 8), torch.zeros(2))
    for i in range(7):
        time.sleep(0.03)  # waiting for the batch
        monitor.on_train_batch_start(trainer, module, batch, i)
        time.sleep(0.01)  # the step
        monitor.on_train_batch_end(trainer, module, None, batch, i)
    assert monitor._pending  # some readings were still outstanding when training ended
    monitor.on_train_end(trainer, module)
    summary = monitor.summary
    assert summary.steps == 6 and summary.samples == 12
    assert 0.03 <= summary.wait_s / summary.steps <= 0.05
    assert 0.01 <= summary.step_s / summary.steps <= 0.03
    assert summary.verdict == "data-bound"
    assert shown["data_wait"] > 0.5  # the progress bar got a reading although events came in late
    assert capsys.readouterr().out.startswith("data feed: data-bound")
