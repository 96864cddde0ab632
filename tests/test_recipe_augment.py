"""The training recipe's augmentation: per-image policies in the workers, MixUp / CutMix batched on the device,
training batches only, and train/acc against the un-mixed labels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from project.data import ImageDataModule
from project.feed.device_decode import DecodeBatch
from project.models import ImageClassifier
from tests.conftest import write_image


class FakeTrainer:
    """What the DataModule's batch hooks read of a trainer: whether it is training, and the device."""

    def __init__(self, training: bool) -> None:
        self.training = training
        self.world_size = 1

        class Strategy:
            root_device = torch.device("cpu")

        self.strategy = Strategy()


@pytest.fixture()
def same_image(tmp_path: Path) -> Path:
    """Two classes of 8 copies of one picture: any difference inside a batch is augmentation."""
    source = write_image(tmp_path / "one.png", size=(48, 48))
    for label in ("a", "b"):
        for i in range(8):
            (tmp_path / "data" / label).mkdir(parents=True, exist_ok=True)
            Image.open(source).save(tmp_path / "data" / label / f"{i}.png")
    return tmp_path / "data"


def datamodule(root: Path, **kwargs) -> ImageDataModule:
    dm = ImageDataModule(root, image_size=32, batch_size=8, num_workers=0, rotation=0, hflip=False, **kwargs)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("flags", [{"auto_augment": "ta_wide"}, {"auto_augment": "augmix"}, {"random_erase": 1.0}])
def test_per_image_augmentation_differs_across_the_images_of_one_batch(same_image, flags):
    images, _ = next(iter(datamodule(same_image, shuffle=False, **flags).train_dataloader()))
    assert images.dtype == torch.uint8  # in the workers, on uint8
    distinct = {bytes(image.numpy()) for image in images}
    assert len(distinct) >= 4, f"one draw for the whole batch ({len(distinct)} distinct of {len(images)})"


def test_random_erasing_fills_with_the_mean_colour_which_normalization_maps_to_zero(same_image):
    dm = datamodule(same_image, random_erase=1.0)
    images, labels = next(iter(dm.train_dataloader()))
    normalized = dm.on_after_batch_transfer((images, labels), 0)[0]
    erased = (images == torch.tensor([124, 116, 104]).view(1, 3, 1, 1)).all(1)  # round(255 * ImageNet mean)
    assert erased.any(), "no rectangle erased"
    assert normalized.permute(0, 2, 3, 1)[erased].abs().max() < 0.01


@pytest.mark.parametrize("flags", [{"auto_augment": "ra", "random_erase": 1.0}, {"mixup_alpha": 1.0}])
def test_validation_batches_are_never_augmented_or_mixed(same_image, flags):
    dm = datamodule(same_image, **flags)
    images, labels = next(iter(dm.val_dataloader()))
    assert len({bytes(image.numpy()) for image in images}) == 1  # the one picture, as it is
    dm.trainer = FakeTrainer(training=False)
    out = dm.on_after_batch_transfer((images, labels), 0)
    assert len(out) == 2 and torch.equal(out[1], labels)
    assert torch.allclose(out[0], out[0][:1].expand_as(out[0]))  # nothing mixed in


@pytest.mark.parametrize(
    "flags", [{"mixup_alpha": 0.2}, {"cutmix_alpha": 1.0}, {"mixup_alpha": 1.0, "cutmix_alpha": 1.0}]
)
def test_training_batches_are_mixed_with_soft_targets_that_sum_to_one(same_image, flags):
    dm = datamodule(same_image, **flags)
    dm.trainer = FakeTrainer(training=True)
    images = torch.stack([torch.full((3, 32, 32), 40 * i, dtype=torch.uint8) for i in range(4)])  # 4 plain colours
    labels = torch.tensor([0, 1, 0, 1])
    mixed, kept, targets = dm.on_after_batch_transfer((images, labels), 0)
    assert torch.equal(kept, labels)  # the un-mixed labels ride along for train/acc
    assert targets.shape == (4, 2) and torch.allclose(targets.sum(1), torch.ones(4))
    assert (targets < 1).any(), "no image was mixed with another"
    assert mixed.shape == (4, 3, 32, 32) and mixed.dtype == torch.float32


def test_train_acc_counts_the_unmixed_labels_and_the_loss_the_soft_targets():
    model = ImageClassifier(num_classes=2, image_size=32)
    labels = torch.tensor([0, 1, 1, 0])
    soft = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.45, 0.55], [0.9, 0.1]])
    logits = torch.nn.functional.one_hot(labels, 2).float() * 20  # always right about the labels
    model.forward = lambda images: logits
    model.log = lambda *args, **kwargs: None
    loss = model._shared_step((torch.zeros(4, 3, 32, 32), labels, soft), "train")
    assert model.train_metrics.compute()["train/acc"] == 1.0
    assert torch.isclose(loss, torch.nn.functional.cross_entropy(logits, soft))  # the soft targets, not the labels


def test_recipe_flags_that_cannot_reach_the_workers_are_refused(same_image):
    for flags in ({"auto_augment": "ta_wide"}, {"random_erase": 0.5}):
        with pytest.raises(ValueError, match="cannot be combined: the workers see JPEG bytes only"):
            ImageDataModule(same_image, decode_on="device", **flags)


def test_mixing_follows_device_decoding(tmp_path):
    """With --decode_on device the batch is decoded before the transfer, then mixed after it (on the CPU here)."""
    for label in ("a", "b"):
        for i in range(4):
            write_image(tmp_path / "data" / label / f"{i}.jpg", size=(40, 40), seed=i + (10 if label == "b" else 0))
    dm = ImageDataModule(
        tmp_path / "data",
        image_size=32,
        batch_size=8,
        num_workers=0,
        decode_on="device",
        mixup_alpha=1.0,
        decode_jpegs=DecodeBatch,
    )
    dm.trainer = FakeTrainer(training=True)
    dm.setup("fit")
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    images, labels, targets = dm.on_after_batch_transfer(batch, 0)
    assert images.shape[1:] == (3, 32, 32) and targets.shape == (len(labels), 2)
    assert torch.allclose(targets.sum(1), torch.ones(len(labels)))
