"""The Lightning callbacks of the extras, importable from one place (`from project.callbacks import ...`),
and the set a `scripts/train.py` run uses (`build_callbacks`)."""

from project.callbacks.ema import EMA
from project.callbacks.run import (
    BAR_METRICS,
    PROGRESS_REFRESH_STEPS,
    StepMetricsBar,
    ValAccEarlyStopping,
    build_callbacks,
    early_stop_line,
)
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

__all__ = [
    "BAR_METRICS",
    "PROGRESS_REFRESH_STEPS",
    "AugmentedBatchGrid",
    "BadImageMonitor",
    "ConfusionMatrixLogger",
    "EMA",
    "DataFeedMonitor",
    "FreezeBackbone",
    "HparamsSummary",
    "InterruptCheckpoint",
    "MispredictionLogger",
    "ModelGraphLogger",
    "NonFiniteLossGuard",
    "StepMetricsBar",
    "ValAccEarlyStopping",
    "build_callbacks",
    "early_stop_line",
]
