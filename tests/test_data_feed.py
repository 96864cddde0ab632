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
from project.feed.monitor import MODEL_ADVICE, FeedSummary, classify, recommend, workers_needed
from project.models import ImageClassifier
from project.training import build_callbacks, parse_train_flags

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
    assert summary.samples == 8
    wait_per_batch = summary.wait_s / summary.steps
    # a sleep never ends early, so each wait holds at least DELAY; the collate and Lightning's hooks add
    # milliseconds, so 0.15 s more per batch leaves room for stalls of a busy machine
    assert DELAY * 0.99 <= wait_per_batch <= DELAY + 0.15
    # a step of simple_cnn on 2 images takes milliseconds: the wait share drops under 0.5 only if the
    # steps averaged over DELAY (250 ms) each
    assert summary.wait_fraction >= 0.5
    assert summary.verdict == "data-bound"
    # no workers and spare CPUs, or no spare CPUs at all: either way the advice is a concrete change
    assert summary.advice.startswith(("raise --num_workers from 0 to", "use --"))

    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("data feed:"))
    assert "data-bound" in line and f"{summary.wait_fraction:.0%}" in line

    # logged to the logger every step (warm-up included), and shown in the progress bar
    with open(next(tmp_path.glob("feed/version_*/metrics.csv"))) as file:
        rows = [r for r in csv.DictReader(file) if r.get("feed/data_wait_fraction")]
    assert len(rows) == 6
    for row in rows:
        wait, step = float(row["feed/data_wait_ms"]), float(row["feed/step_ms"])
        assert wait >= 1000 * DELAY * 0.99  # every batch sleeps DELAY in collate (see above)
        assert float(row["feed/data_wait_fraction"]) == pytest.approx(wait / (wait + step), rel=1e-3)
        assert float(row["feed/samples_per_s"]) == pytest.approx(2000 / (wait + step), rel=1e-3)
    assert trainer.callback_metrics["data_wait"] == pytest.approx(float(rows[-1]["feed/data_wait_fraction"]))


def test_ready_tensors_under_resnet18_read_model_bound(tmp_path, capsys):
    images = torch.randn(112, 3, 64, 64)  # (N, 3, 64, 64) float, already normalized
    loader = DataLoader(TensorDataset(images, torch.arange(112) % 8), batch_size=8)
    monitor, _ = fit(ImageClassifier("resnet18", num_classes=8), loader, tmp_path, batches=14)

    summary = monitor.summary
    # read over 12 steps: a resnet18 step on 8 images takes over 100 ms of CPU, fetching a ready batch
    # about 1 ms, so the share would reach 10% only if stalls added over 100 ms to the waits of these
    # 12 steps (over 3 steps, one 40 ms stall did it)
    assert summary.steps == 12
    assert summary.verdict == "model-bound"
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
    # on a GPU with augmentation already there: decode there too (the cache is the other way out)
    on_gpu = {"num_workers": 4, "max_workers": 4, "on_accelerator": True, "augment_on": "device"}
    assert recommend(0.5, 0.1, 0.1, **on_gpu)[1] == "use --decode_on device (or --cache)"
    assert recommend(0.5, 0.1, 0.1, **on_gpu, decode_on="device")[1] == "use --cache"
    assert "--decode_on" not in recommend(0.5, 0.1, 0.1, **on_gpu, cached=True)[1]
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
        return [c for c in build_callbacks(parse_train_flags(argv)) if isinstance(c, DataFeedMonitor)]

    assert len(monitors([])) == 1
    assert monitors(["--no-feed_monitor"]) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_events_measure_the_wait_on_a_real_gpu(tmp_path):
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
    # as on the CPU: a sleep never ends early; 0.15 s per batch on top leaves room for stalls
    assert DELAY * 0.99 <= summary.wait_s / summary.steps <= DELAY + 0.15


def cpu_trainer(**kw) -> SimpleNamespace:
    """The parts of a Trainer the monitor reads, for calling its hooks directly."""
    settings = {
        "log_every_n_steps": 10**9,
        "loggers": [],
        "global_step": 0,
        "num_devices": 1,
        "datamodule": None,
        "train_dataloader": SimpleNamespace(num_workers=0),
        "is_global_zero": True,
        "strategy": SimpleNamespace(root_device=torch.device("cpu")),
    }
    return SimpleNamespace(**{**settings, **kw})


def test_monitor_costs_far_less_than_one_percent_of_a_step():
    # the hooks alone, called as the loop calls them; a 10 ms step (a small model on a GPU) is the yardstick
    trainer = cpu_trainer()
    monitor = DataFeedMonitor(verbose=False)
    monitor.on_fit_start(trainer, None)
    monitor.on_train_epoch_start(trainer, None)
    batch = (torch.zeros(4, 3, 8, 8), torch.zeros(4))
    steps = 2000
    # this thread's CPU time: the hooks' own work, which other processes on the machine do not inflate
    start = time.thread_time()
    for i in range(steps):
        monitor.on_train_batch_start(trainer, None, batch, i)
        monitor.on_train_batch_end(trainer, None, None, batch, i)
    per_step = (time.thread_time() - start) / steps
    assert per_step < 0.01 * 0.010
    monitor.on_train_end(trainer, None)
    assert monitor.summary.steps == steps - monitor.warmup_steps


ON_CUDA = SimpleNamespace(root_device=torch.device("cuda", 0))  # a Trainer's strategy, as the monitor reads it


class FakeGpu:
    """A GPU running LAG steps behind the CPU, and stand-ins for the CUDA calls the monitor may make.

    An event recorded during step i counts as passed once the CPU is at step i + LAG. Every way to
    wait for the GPU is counted: `torch.cuda.synchronize`, `Event.synchronize`, and reading
    `elapsed_time` of an event the GPU has not passed (real CUDA would have to wait or fail).
    """

    LAG = 3

    def __init__(self) -> None:
        self.step, self.syncs, self.early_reads = 0, 0, 0
        gpu = self

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                self.time, self.step = None, None

            def record(self, stream=None) -> None:
                self.time, self.step = time.perf_counter(), gpu.step

            def query(self) -> bool:
                return gpu.step - self.step >= gpu.LAG

            def synchronize(self) -> None:
                gpu.syncs += 1

            def elapsed_time(self, end: Event) -> float:
                if not (self.query() and end.query()):
                    gpu.early_reads += 1
                return 1000 * (end.time - self.time)

        self.Event = Event

    def synchronize(self, device=None) -> None:
        self.syncs += 1

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(torch.cuda, "Event", self.Event)
        monkeypatch.setattr(torch.cuda, "synchronize", self.synchronize)


def gpu_run(monkeypatch, steps: int, wait_s: float = 0.0, step_s: float = 0.0, log_every: int = 1):
    """The monitor's hooks on a fake CUDA device for `steps` steps; returns (gpu, monitor, logged, shown)."""
    gpu = FakeGpu()
    gpu.install(monkeypatch)
    logged: list[dict] = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append(metrics))
    trainer = cpu_trainer(log_every_n_steps=log_every, loggers=[logger], strategy=ON_CUDA)
    shown = {}
    module = SimpleNamespace(log=lambda name, value, **kw: shown.update({name: value}))
    monitor = DataFeedMonitor(warmup_steps=1)
    monitor.on_fit_start(trainer, module)
    monitor.on_train_epoch_start(trainer, module)
    batch = (torch.zeros(2, 3, 8, 8), torch.zeros(2))
    for i in range(steps):
        gpu.step = i
        time.sleep(wait_s)  # waiting for the batch
        monitor.on_train_batch_start(trainer, module, batch, i)
        time.sleep(step_s)  # the step
        monitor.on_train_batch_end(trainer, module, None, batch, i)
    return gpu, monitor, logged, shown


def test_gpu_monitor_never_waits_for_the_gpu_during_training(monkeypatch, capsys):
    steps = 20
    gpu, monitor, logged, _ = gpu_run(monkeypatch, steps)
    # no synchronize of any kind, and no event read before the GPU passed it: a step's own events
    # are read LAG steps later, so a per-step sync (or reading the current step) fails here
    assert gpu.syncs == 0 and gpu.early_reads == 0
    # yet no reading is lost on the way: one logged window per step, each LAG steps late
    assert len(logged) == steps - FakeGpu.LAG
    monitor.on_train_end(cpu_trainer(strategy=ON_CUDA), None)
    assert monitor.summary.steps == steps - monitor.warmup_steps  # the rest drained at the end


def test_event_readings_arriving_late_lose_no_step(monkeypatch, capsys):
    # a long wait and a short step: pairing the events wrongly (reading the step from the previous
    # step's end, say) would put the wait inside the step and break the step bound by a wide margin
    wait_s, step_s = 0.06, 0.003
    gpu, monitor, _, shown = gpu_run(monkeypatch, 10, wait_s, step_s, log_every=3)
    monitor.on_train_end(cpu_trainer(strategy=ON_CUDA), None)
    summary = monitor.summary
    assert summary.steps == 9 and summary.samples == 18
    # sleeps never end early: lower bounds hold exactly; 40 ms per step on top leaves room for stalls
    assert wait_s <= summary.wait_s / summary.steps <= wait_s + 0.04
    assert step_s <= summary.step_s / summary.steps <= step_s + 0.04  # a mispaired step would be >= 63 ms
    assert summary.verdict == "data-bound"
    assert shown["data_wait"] > 0.25  # the progress bar got a reading although events came in late
    assert capsys.readouterr().out.startswith("data feed: data-bound")
