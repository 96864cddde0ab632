"""The Lightning callbacks of the extras, importable from one place (`from project.callbacks import ...`)."""

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
    "AugmentedBatchGrid",
    "BadImageMonitor",
    "ConfusionMatrixLogger",
    "DataFeedMonitor",
    "FreezeBackbone",
    "HparamsSummary",
    "InterruptCheckpoint",
    "MispredictionLogger",
    "ModelGraphLogger",
    "NonFiniteLossGuard",
]
