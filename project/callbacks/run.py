"""The callbacks of a `scripts/train.py` run besides checkpointing, and the progress bar it shows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, TQDMProgressBar

from project.feed.monitor import DataFeedMonitor
from project.runtime.faults import BadImageMonitor, InterruptCheckpoint, NonFiniteLossGuard
from project.tools.finetune import FreezeBackbone
from project.views.tensorboard import (
    AugmentedBatchGrid,
    ConfusionMatrixLogger,
    HparamsSummary,
    MispredictionLogger,
    ModelGraphLogger,
)

# the bar reads its values (a host sync on a GPU) at each refresh: every 10 steps keeps syncs off most steps
PROGRESS_REFRESH_STEPS = 10
# per-step values the bar shows: logged without prog_bar, read by StepMetricsBar at its refreshes
BAR_METRICS = ("train/loss", "data_wait")


class StepMetricsBar(TQDMProgressBar):
    """Lightning's TQDM bar, also showing the latest values of the per-step metrics `names`.

    Lightning turns every value logged with `prog_bar=True` into a Python number after every training
    step: on a GPU, a host-device sync per step, which stops the CPU from queuing the next step while the
    GPU works. These metrics are logged without `prog_bar`; the bar reads them from
    `trainer.callback_metrics` only when it refreshes, every `refresh_rate` steps.
    """

    def __init__(self, names: Sequence[str], refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.names = tuple(names)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        logged = trainer.callback_metrics
        latest = {name: float(logged[name]) for name in self.names if name in logged}
        return {**latest, **super().get_metrics(trainer, pl_module)}


def build_callbacks(values: dict[str, Any]) -> list[Callback]:
    """The run's callbacks besides checkpointing and the saved config, in the order they should run;
    `values` are train.py's flags."""
    callbacks: list[Callback] = [
        LearningRateMonitor(logging_interval="step"),
        StepMetricsBar(BAR_METRICS, refresh_rate=PROGRESS_REFRESH_STEPS),
    ]
    if values["freeze_backbone"]:
        callbacks.append(FreezeBackbone(unfreeze_at_epoch=values["unfreeze_at_epoch"]))
    # TensorBoard views: the augmented batch, confusion matrix, mistakes, graph, flags with final metrics
    callbacks += [
        AugmentedBatchGrid(),
        ConfusionMatrixLogger(),
        MispredictionLogger(),
        ModelGraphLogger(),
        HparamsSummary(values),
    ]
    if values["feed_monitor"]:
        callbacks.append(DataFeedMonitor())
    # faults: Ctrl+C / SIGTERM leave a resumable checkpoint; a NaN loss or too many unreadable images stop the run
    callbacks += [InterruptCheckpoint(), NonFiniteLossGuard()]
    if values.get("skip_bad_images"):
        callbacks.append(BadImageMonitor(values["max_bad_fraction"]))
    return callbacks
