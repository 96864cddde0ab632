"""The callbacks of a `scripts/train.py` run besides checkpointing, the progress bar it shows, and the line
that says why early stopping ended a run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from project.callbacks.ema import EMA
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


class ValAccEarlyStopping(EarlyStopping):
    """Lightning's `EarlyStopping` on `val/acc`: stop when it has not risen for `patience` validations.

    A resumed run keeps the patience it was given (Lightning's would take the checkpoint's).
    """

    def __init__(self, patience: int) -> None:
        super().__init__(monitor="val/acc", mode="max", patience=patience)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({**state_dict, "patience": self.patience})


def early_stop_line(trainer: L.Trainer) -> str | None:
    """The run summary's line when early stopping ended the fit before its last epoch, e.g. "stopped early
    after 4 of 10 epochs: val/acc did not improve for 2 epochs (best 0.9312)"; None otherwise."""
    stopper, epochs = trainer.early_stopping_callback, trainer.current_epoch
    if stopper is None or stopper.stopping_reason is EarlyStoppingReason.NOT_STOPPED:
        return None
    # stopped_epoch tells this run's stop from one restored with the checkpoint it resumed from; a stop
    # in the last epoch ended nothing early
    if stopper.stopped_epoch != epochs - 1 or epochs >= trainer.max_epochs:
        return None
    why = stopper.stopping_reason_message or ""
    if stopper.stopping_reason is EarlyStoppingReason.PATIENCE_EXHAUSTED:
        best = float(stopper.best_score)
        why = f"{stopper.monitor} did not improve for {stopper.wait_count} epochs (best {best:.4f})"
    return f"stopped early after {epochs} of {trainer.max_epochs} epochs: {why}"


def build_callbacks(values: dict[str, Any]) -> list[Callback]:
    """The run's callbacks besides checkpointing and the saved config, in the order they should run;
    `values` are train.py's flags."""
    callbacks: list[Callback] = [
        LearningRateMonitor(logging_interval="step"),
        StepMetricsBar(BAR_METRICS, refresh_rate=PROGRESS_REFRESH_STEPS),
    ]
    if values["freeze_backbone"]:
        callbacks.append(FreezeBackbone(unfreeze_at_epoch=values["unfreeze_at_epoch"]))
    # before DataFeedMonitor, whose step time then includes the average's update
    if values["ema_decay"]:
        callbacks.append(EMA(values["ema_decay"]))
    if values["early_stopping_patience"]:
        callbacks.append(ValAccEarlyStopping(values["early_stopping_patience"]))
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
