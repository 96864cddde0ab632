"""`augment_on="device"`: training batches are rotated and flipped after the transfer, in one batched call;
validation, test and prediction batches are only converted and normalized, and the workers hand over
un-augmented images."""

from __future__ import annotations

from collections import defaultdict
from itertools import islice

import lightning as L
import torch

from project.data import ImageDataModule
from project.models import ImageClassifier
from project.tools.predict import PredictDataModule

BATCHES = 2


class RecordBatches(L.Callback):
    """The images of every batch each stage hands the model (after `on_after_batch_transfer`)."""

    def __init__(self) -> None:
        self.images: dict[str, list[torch.Tensor]] = defaultdict(list)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.images["train"].append(batch[0].clone())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.images["val"].append(batch[0].clone())

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.images["test"].append(batch[0].clone())

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.images["predict"].append(batch[0].clone())


def plain(dm: ImageDataModule, loader) -> list[torch.Tensor]:
    """The loader's first batches as the model would get them without augmentation."""
    return [dm.device_transform(batch[0], augment=False) for batch in islice(loader, BATCHES)]


def test_device_augmentation_changes_training_batches_only(tiny_shapes):
    L.seed_everything(0, verbose=False)
    dm = PredictDataModule(
        [tiny_shapes / "test"],
        data_dir=tiny_shapes,
        image_size=32,
        batch_size=8,
        num_workers=0,
        shuffle=False,  # the same images every epoch: any difference is the augmentation's
        augment_on="device",
        rotation=45,
        hflip=True,
    )
    record = RecordBatches()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=BATCHES,
        limit_val_batches=BATCHES,
        limit_test_batches=BATCHES,
        limit_predict_batches=BATCHES,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    model = ImageClassifier(num_classes=8, image_size=32)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    trainer.predict(model, datamodule=dm)

    # the workers do no augmenting of their own: two passes over the train loader give the same images
    first_pass, second_pass = list(islice(dm.train_dataloader(), BATCHES)), list(islice(dm.train_dataloader(), BATCHES))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first_pass, second_pass, strict=True))

    expected_train = plain(dm, dm.train_dataloader())
    assert len(record.images["train"]) == 2 * BATCHES  # two epochs
    fill = dm.device_transform(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), augment=False).flatten()
    for i, seen in enumerate(record.images["train"]):
        reference = expected_train[i % BATCHES]
        assert seen.shape == reference.shape
        changed = (seen - reference).abs().flatten(1).amax(dim=1) > 0.1  # per sample
        assert changed.float().mean() >= 0.75, changed
        # rotated by up to 45 degrees with zero fill: many corners are black (the plain shapes' never are)
        corners = seen[:, :, 0, 0]  # (B, 3) top-left pixels
        black = torch.isclose(corners, fill.expand_as(corners), atol=1e-3).all(dim=1)
        assert black.any(), corners
    # and each epoch draws anew
    for a, b in zip(record.images["train"][:BATCHES], record.images["train"][BATCHES:], strict=True):
        assert not torch.equal(a, b)

    # validation (both epochs), test and prediction batches: exactly the un-augmented ones
    expected_val = plain(dm, dm.val_dataloader())
    assert len(record.images["val"]) == 2 * BATCHES
    for i, seen in enumerate(record.images["val"]):
        assert torch.equal(seen, expected_val[i % BATCHES])
    for stage, loader in (("test", dm.test_dataloader()), ("predict", dm.predict_dataloader())):
        expected = plain(dm, loader)
        assert len(record.images[stage]) == BATCHES, stage
        assert all(torch.equal(a, b) for a, b in zip(record.images[stage], expected, strict=True)), stage


def test_cpu_augmentation_leaves_the_device_transform_plain(tiny_shapes):
    dm = ImageDataModule(tiny_shapes, image_size=32, batch_size=8, num_workers=0, shuffle=False, augment_on="cpu")
    dm.setup("fit")
    assert dm.device_transform.rotation == 0 and not dm.device_transform.hflip
    images = next(iter(dm.train_dataloader()))[0]
    assert torch.equal(dm.device_transform(images, augment=True), dm.device_transform(images, augment=False))
    # the rotation happens in the workers instead: two passes differ
    again = next(iter(dm.train_dataloader()))[0]
    assert not torch.equal(images, again)
