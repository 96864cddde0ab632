"""Lightning callbacks."""

from project.callbacks.data_feed import DataFeedMonitor
from project.callbacks.faults import BadImageMonitor, InterruptCheckpoint, NonFiniteLossGuard
from project.callbacks.tensorboard import (
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
    "HparamsSummary",
    "InterruptCheckpoint",
    "MispredictionLogger",
    "ModelGraphLogger",
    "NonFiniteLossGuard",
]
