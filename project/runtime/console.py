"""What a training run prints: quiet about Lightning's known noise, loud about what the user must act on.

Each filter below names one message we know is noise for this template, matched by its text and
category, so everything else (a checkpoint folder that is not empty, a metric that was never logged,
an error in the user's data) still reaches the console.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

# Lightning's info lines and warnings are emitted through these loggers (rank zero only)
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")

# (message regex, category, why it is noise here)
NOISY_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # Lightning guesses starvation from the worker count; our --num_workers is either the user's explicit
    # choice (the CLI default is 2, above Lightning's threshold) or `auto`, which measured it, and
    # DataFeedMonitor reports the real data-wait share instead of a guess
    (r"The '\w+' does not have many workers", UserWarning),
    # tiny runs (--limit_train_batches, small folders) simply have fewer steps than the logging interval
    (r"The number of training batches \(\d+\) is smaller than the logging interval", UserWarning),
    # the one IterableDataset this template builds is litdata's StreamingDataset, which splits its samples
    # between ranks and workers itself, so its length is right (a warning about an own IterableDataset given
    # through --datamodule is silenced too: check that it shards by worker)
    (r"Your `IterableDataset` has `__len__` defined", UserWarning),
    # raised inside Lightning about its own use of torch's pytree API; nothing a user can change
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # train.py keeps two checkpoints on purpose (best by val/acc, then last) and lists the best one first,
    # which is the one test(ckpt_path="best") must use
    (r"`\.test\(ckpt_path=\"best\"\)` is called with Trainer configured with multiple `ModelCheckpoint`", UserWarning),
)


class DropProductTips(logging.Filter):
    """Drops Lightning's advertisements for other products ("💡 Tip: ... litlogger / litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("💡 Tip") or "litlogger" in message or "litmodels" in message)


def configure_console() -> None:
    """Silence the known noise listed above and show the project's own deprecations; safe to call repeatedly."""
    for pattern, category in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    # Python hides DeprecationWarnings outside __main__; ones triggered by this package's code (the code
    # a user clones and owns) are exactly the ones they must act on before an upgrade breaks it
    package = __name__.partition(".")[0]  # "project", or whatever the package was renamed to
    warnings.filterwarnings("default", category=DeprecationWarning, module=rf"{package}(\.|$)")
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropProductTips) for f in logger.filters):
            logger.addFilter(DropProductTips())


def print_summary(results: dict[str, Any], logs: str) -> None:
    """The end of a run: its accuracies, checkpoints, run folder, and how to open `logs` in TensorBoard."""

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    print(f"\nbest val/acc {fmt(results['best_val_acc'])}   test/acc {fmt(results['test_acc'])}")
    if results["stopped_early"]:
        print(results["stopped_early"])
    if results["best_checkpoint"]:
        print(f"best checkpoint: {os.path.relpath(results['best_checkpoint'])}")
    if results["last_checkpoint"]:
        print(f"last checkpoint: {os.path.relpath(results['last_checkpoint'])}")
    if results["log_dir"]:  # none under fast_dev_run, which writes no logs
        print(f"run folder:      {os.path.relpath(results['log_dir'])}")
        print(f"open it with:    tensorboard --logdir {logs}")
