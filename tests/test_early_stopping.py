"""`--early_stopping_patience`: the run stops once val/acc has not improved for that many epochs, and its
summary says when and why."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from project import training
from project.callbacks import ValAccEarlyStopping, build_callbacks, early_stop_line
from project.models import ImageClassifier

# val/acc per epoch, as if measured: best in the second epoch, then two epochs without a new best
SCRIPTED_VAL_ACC = [0.4, 0.5, 0.45, 0.5, 0.9]
LINE = "stopped early after 4 of 5 epochs: val/acc did not improve for 2 epochs (best 0.5000)"


def scripted_val_acc(self: ImageClassifier) -> None:
    self.val_metrics.reset()
    self.log("val/acc", SCRIPTED_VAL_ACC[self.current_epoch])


def train(data: Path, root: Path, *extra: str) -> dict:
    argv = ["--data_dir", str(data), "--default_root_dir", str(root), "--image_size", "32", "--batch_size", "16"]
    argv += ["--num_workers", "0", "--accelerator", "cpu", "--limit_train_batches", "1", "--limit_val_batches", "1"]
    argv += ["--max_epochs", str(len(SCRIPTED_VAL_ACC)), "--feed_monitor", "false", *extra]
    return training.train(training.parse_train_flags(argv))


@pytest.mark.slow
def test_run_stops_once_val_acc_has_not_improved_for_patience_epochs(tiny_shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ImageClassifier, "on_validation_epoch_end", scripted_val_acc)
    results = train(tiny_shapes, tmp_path, "--early_stopping_patience", "2")
    # a tie (0.5 again) is no improvement; the 0.9 of the fifth epoch is never reached
    assert torch.load(results["last_checkpoint"], weights_only=True)["epoch"] == 3
    assert results["best_val_acc"] == pytest.approx(0.5)
    assert results["stopped_early"] == LINE
    assert LINE in capsys.readouterr().out.splitlines()


def test_default_run_adds_no_callback_and_the_flag_adds_early_stopping():
    assert not any(isinstance(c, ValAccEarlyStopping) for c in build_callbacks(training.parse_train_flags([])))
    values = training.parse_train_flags(["--early_stopping_patience", "3"])
    found = [c for c in build_callbacks(values) if isinstance(c, ValAccEarlyStopping)]
    assert [(c.monitor, c.mode, c.patience) for c in found] == [("val/acc", "max", 3)]


def test_resumed_run_keeps_the_patience_it_was_given():
    stopper = ValAccEarlyStopping(patience=5)
    saved = ValAccEarlyStopping(patience=2).state_dict()
    stopper.load_state_dict(saved)
    assert stopper.patience == 5


def test_summary_line_is_for_this_runs_stop_before_its_last_epoch_only():
    stopper = ValAccEarlyStopping(patience=2)
    stopper.stopping_reason, stopper.stopped_epoch = EarlyStoppingReason.PATIENCE_EXHAUSTED, 3
    stopper.wait_count, stopper.best_score = 2, torch.tensor(0.5)

    def ended(epochs: int, max_epochs: int) -> str | None:
        trainer = SimpleNamespace(early_stopping_callback=stopper, current_epoch=epochs, max_epochs=max_epochs)
        return early_stop_line(trainer)

    assert ended(4, 10) == "stopped early after 4 of 10 epochs: val/acc did not improve for 2 epochs (best 0.5000)"
    assert ended(4, 4) is None  # stopped in its last epoch: nothing was cut short
    assert ended(7, 10) is None  # a stop restored with a checkpoint, then a resumed run interrupted at epoch 7
