"""The training-step benchmark: what Lightning itself costs per step, and what the model-side options buy.

`lightning_overhead` times training steps of `ImageClassifier` under the `Trainer` against a raw
PyTorch loop (forward, loss, backward, optimizer step) on the same backbone, the same optimizer and
the same in-memory batches, in steady state, each a `throughput.Rate` (images, wall and CPU
seconds), repeated with `throughput.best_of`. `model_variants` gives the model-only rate (the model
section's `throughput.measure_model`) with channels_last, `torch.compile` and bf16 autocast, so a
verdict of "the model is the bottleneck" has somewhere to point. Both return rows of figures (lists
of flat dicts) for the benchmark.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from project.feed.throughput import Rate, autocast_for, best_of, measure_model, synchronize
from project.models.backbones import build_backbone
from project.models.classifier import ImageClassifier, decay_groups


def make_batches(
    count: int, batch_size: int, image_size: int, num_classes: int, device: torch.device | str = "cpu", seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` normalized-looking float batches `(B, 3, S, S)` with labels, already on `device`."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device),
            torch.randint(0, num_classes, (batch_size,), generator=generator).to(device),
        )
        for _ in range(count)
    ]


class _Cycle:
    """`steps` batches taken round-robin from a few in-memory ones: a loader that costs nothing."""

    def __init__(self, batches: list, steps: int) -> None:
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator:
        return (self.batches[i % len(self.batches)] for i in range(self.steps))


def raw_step_rate(
    model: nn.Module,
    batches: list,
    steps: int = 30,
    warmup: int = 5,
    precision: str = "32-true",
    lr: float = 2e-3,
    weight_decay: float = 0.05,
) -> Rate:
    """Images per second of the plain PyTorch loop: forward, cross-entropy, backward, AdamW step.

    Its CPU seconds are this process's, which other load on a shared machine does not inflate."""
    device = batches[0][0].device
    model.to(device).train()
    optimizer = torch.optim.AdamW(decay_groups(model.parameters(), weight_decay), lr=lr)
    criterion = nn.CrossEntropyLoss()
    start = cpu_start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
        images, labels = batches[i % len(batches)]
        with autocast_for(device, precision):
            loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)
    return Rate(steps * len(batches[0][0]), time.perf_counter() - start, time.process_time() - cpu_start)


class _StepTimer(L.Callback):
    """Wall and CPU time from the end of step `warmup` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, (0.0, 0.0), (0.0, 0.0), 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx + 1 >= self.warmup:
            synchronize(pl_module.device)
            now = (time.perf_counter(), time.process_time())
            if batch_idx + 1 == self.warmup:
                self.start = now
            else:
                self.end, self.steps = now, self.steps + 1


def trainer_step_rate(
    module: ImageClassifier,
    batches: list,
    steps: int = 30,
    warmup: int = 5,
    precision: str = "32-true",
    logged: bool = True,
    callbacks: list[L.Callback] | None = None,
) -> Rate:
    """Images per second of training steps of `module` under `L.Trainer`, fed the same in-memory batches.

    `logged`: with a TensorBoard logger (written to a temporary folder) and the progress bar, as
    `scripts/train.py` runs; without: both off, Lightning's loop alone. `callbacks`: more of them, e.g.
    the ones `scripts/train.py` adds.
    """
    device = batches[0][0].device
    timer = _StepTimer(max(1, warmup))
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            accelerator="cuda" if device.type == "cuda" else "cpu",
            devices=1,
            precision=precision,
            max_steps=warmup + steps,
            max_epochs=1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=TensorBoardLogger(root, name="overhead") if logged else False,
            enable_progress_bar=logged,
            enable_model_summary=False,
            enable_checkpointing=False,
            log_every_n_steps=10,
            callbacks=[timer, *(callbacks or [])],
            default_root_dir=root,
        )
        trainer.fit(module, train_dataloaders=_Cycle(batches, warmup + steps))
    return Rate(timer.steps * len(batches[0][0]), timer.end[0] - timer.start[0], timer.end[1] - timer.start[1])


def lightning_overhead(
    backbone: str = "simple_cnn",
    image_size: int = 64,
    batch_size: int = 32,
    num_classes: int = 8,
    device: str = "cpu",
    precision: str = "32-true",
    steps: int = 30,
    warmup: int = 5,
    rounds: int = 2,
    run_callbacks: Callable[[], list[L.Callback]] | None = None,
) -> list[dict[str, Any]]:
    """Raw loop vs `ImageClassifier` under the Trainer: bare, with logger + progress bar, and, given
    `run_callbacks`, with the callbacks it makes (a training run's: the caller's, as this package imports
    neither the run nor the callbacks).

    Each is timed `rounds` times, interleaved, and the fastest kept (other load on a shared machine
    only ever slows a run down). Rows: `{"loop", "backbone", "device", "ms_per_step", "images_per_s",
    "vs_raw", "cpu_ms_per_step", "cpu_vs_raw"}`, where `vs_raw` is the loop's step time over the raw loop's
    (1.10 = 10 % slower) and the `cpu_` figures count this process's CPU time instead of wall time:
    on a CPU they are the steadier measure when other processes share the machine.
    """
    torch.manual_seed(0)
    batches = make_batches(4, batch_size, image_size, num_classes, device)
    module = ImageClassifier(backbone=backbone, num_classes=num_classes, image_size=image_size)
    hparams = module.hparams
    loops = {
        "raw PyTorch loop": lambda: raw_step_rate(
            copy.deepcopy(module.model), batches, steps, warmup, precision, hparams.lr, hparams.weight_decay
        ),
        "Lightning Trainer, no logger or progress bar": lambda: trainer_step_rate(
            copy.deepcopy(module), batches, steps, warmup, precision, logged=False
        ),
        "Lightning Trainer, TensorBoard logger + progress bar": lambda: trainer_step_rate(
            copy.deepcopy(module), batches, steps, warmup, precision, logged=True
        ),
    }
    if run_callbacks is not None:  # fresh ones each round: callbacks keep state
        loops["Lightning Trainer, train.py's callbacks (LR and feed monitors, views, fault guards)"] = lambda: (
            trainer_step_rate(copy.deepcopy(module), batches, steps, warmup, precision, True, run_callbacks())
        )
    best = best_of(rounds, loops)
    raw = best["raw PyTorch loop"]
    return [
        {
            "loop": name,
            "backbone": backbone,
            "device": device,
            "ms_per_step": round(rate.ms_per_sample * batch_size, 2),
            "images_per_s": round(rate.per_s, 1),
            "vs_raw": round(raw.per_s / rate.per_s, 3),
            "cpu_ms_per_step": round(rate.cpu_ms_per_sample * batch_size, 2),
            "cpu_vs_raw": round(rate.cpu_ms_per_sample / raw.cpu_ms_per_sample, 3),
        }
        for name, rate in best.items()
    ]


def model_variants(
    backbone: str = "simple_cnn",
    image_size: int = 64,
    batch_size: int = 32,
    num_classes: int = 8,
    device: str = "cpu",
    steps: int = 10,
    warmup: int = 3,
    include: Iterable[str] = ("eager", "channels_last", "bf16", "compile"),
) -> list[dict[str, Any]]:
    """Model-only rate (forward + backward on a ready batch, `throughput.measure_model`, the model
    section's timer) for each model-side option.

    Rows: `{"variant", "images_per_s", "vs_eager"}`. `compile` includes no compile time (the warm-up
    steps pay it); `bf16` is autocast to bfloat16 (Lightning's "bf16-mixed").
    """
    rows = []
    for variant in include:
        torch.manual_seed(0)
        rate = measure_model(
            build_backbone(backbone, num_classes),
            batch_size,
            image_size,
            device,
            precision="bf16-mixed" if variant == "bf16" else "32-true",
            steps=steps,
            warmup=warmup,
            num_classes=num_classes,
            channels_last=variant == "channels_last",
            compile=variant == "compile",
        )
        rows.append({"variant": variant, "backbone": backbone, "device": device, "images_per_s": round(rate.per_s, 1)})
    eager = next((r["images_per_s"] for r in rows if r["variant"] == "eager"), None)
    for row in rows:
        row["vs_eager"] = round(row["images_per_s"] / eager, 2) if eager else None
    return rows
