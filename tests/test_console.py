"""The console of a run: Lightning's known noise is silenced, everything else still gets through."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from project.runtime.console import LIGHTNING_LOGGERS, DropProductTips, configure_console


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.layer(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def lightning_records():
    """Everything Lightning's rank-zero loggers let through, captured after their filters ran."""
    handler = Records()
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    saved = [list(lg.filters) for lg in loggers]
    for lg in loggers:
        for f in [f for f in lg.filters if isinstance(f, DropProductTips)]:
            lg.removeFilter(f)
        lg.addHandler(handler)
    yield handler
    for lg, filters in zip(loggers, saved, strict=True):
        lg.removeHandler(handler)
        lg.filters[:] = filters


def fit_tiny(tmp_path: Path) -> None:
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        log_every_n_steps=50,  # more than the 2 batches there are: Lightning warns about it
        logger=L.pytorch.loggers.TensorBoardLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Tiny(), DataLoader(data, batch_size=4, num_workers=0))


def test_known_noise_is_silenced_and_the_rest_is_not(tmp_path: Path, lightning_records: Records) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        configure_console()
        configure_console()  # idempotent: no second filter, no error
        fit_tiny(tmp_path)
        warnings.warn("a problem the user must fix", UserWarning, stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert not any("smaller than the logging interval" in m for m in messages), messages
    assert "a problem the user must fix" in messages
    # Lightning's own information still shows; its product tips do not
    assert any("GPU available" in m for m in lightning_records.messages), lightning_records.messages
    assert not any("Tip" in m or "litlogger" in m for m in lightning_records.messages), lightning_records.messages
    for name in LIGHTNING_LOGGERS:
        assert sum(isinstance(f, DropProductTips) for f in logging.getLogger(name).filters) == 1


def test_worker_count_warning_is_silenced_but_other_possible_user_warnings_are_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lightning.fabric.utilities.warnings import PossibleUserWarning
    from lightning.pytorch.trainer.connectors import data_connector

    # Lightning suggests workers from the CPU count; pretend to be a big machine so it warns here too
    monkeypatch.setattr(data_connector, "suggested_max_num_workers", lambda num_devices: 7)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    loader = DataLoader(TensorDataset(torch.zeros(4, 1)), num_workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data_connector._worker_check(trainer, loader, "train_dataloader")
        assert any("does not have many workers" in str(w.message) for w in caught)  # the real warning, unfiltered
        caught.clear()
        configure_console()
        data_connector._worker_check(trainer, loader, "train_dataloader")
        warnings.warn("The 'val_dataloader' has a sampler that drops samples.", PossibleUserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["The 'val_dataloader' has a sampler that drops samples."]


def test_iterable_dataset_length_warning_is_silenced() -> None:
    from lightning.pytorch.utilities.data import has_len_all_ranks

    class Sized(torch.utils.data.IterableDataset):  # as litdata's StreamingDataset: iterable, with a length
        def __iter__(self):
            return iter(torch.zeros(4, 1))

        def __len__(self) -> int:
            return 4

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    loader = DataLoader(Sized())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        has_len_all_ranks(loader, trainer.strategy)
        assert any("`IterableDataset` has `__len__`" in str(w.message) for w in caught)  # the real warning
        caught.clear()
        configure_console()
        has_len_all_ranks(loader, trainer.strategy)
    assert not caught, [str(w.message) for w in caught]
