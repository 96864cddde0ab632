"""Reproducibility: --seed with --deterministic gives bit-identical results on CPU, with DataLoader workers too,
while each worker (and each sample) still draws its own augmentation."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from project.data import ImageDataModule, generate_shapes
from project.models import ImageClassifier
from tests.conftest import load_script


def scalars(run: Path, tag: str) -> list[float]:
    accumulator = EventAccumulator(str(next(run.glob("events.out.tfevents.*"))))
    accumulator.Reload()
    return [event.value for event in accumulator.Scalars(tag)]


@pytest.fixture
def deterministic_algorithms_off():
    """Start with torch's deterministic mode off and put back whatever it was afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.slow
def test_seed_and_deterministic_give_bit_identical_runs_with_workers(tmp_path, deterministic_algorithms_off):
    data = generate_shapes(tmp_path / "data", image_size=32, per_class={"train": 6, "val": 2}, progress=False)
    train = load_script("train")
    runs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        argv = [
            "--data_dir",
            str(data),
            "--default_root_dir",
            str(tmp_path / name),
            "--image_size",
            "32",
            "--batch_size",
            "8",
            "--max_epochs",
            "2",
            "--limit_train_batches",
            "3",
            "--num_workers",
            "2",
            "--accelerator",
            "cpu",
            "--seed",
            str(seed),
            "--deterministic",
            "--rotation",
            "30",
            "--no-feed_monitor",
        ]
        torch.use_deterministic_algorithms(False)
        assert train.main(argv) == 0
        # --deterministic reached the Trainer, which switched torch to deterministic algorithms
        assert torch.are_deterministic_algorithms_enabled()
        runs.append(tmp_path / name / "lightning_logs" / "version_0")
    first, second, other = (scalars(run, "val/loss") for run in runs)
    assert len(first) == 2 and first == second  # exact float equality, every epoch
    checkpoints = [torch.load(run / "checkpoints" / "last.ckpt", weights_only=True) for run in runs]
    weights = [checkpoint["state_dict"] for checkpoint in checkpoints]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    # another seed: other initial weights, shuffling and augmentation, so other results
    assert other != first
    convolutions = [k for k in weights[0] if k.endswith("weight") and weights[0][k].ndim == 4]
    assert convolutions and all(not torch.equal(weights[0][k], weights[2][k]) for k in convolutions)
    # the seed also reaches the DataModule, where it seeds the split of train/ when there is no val/
    assert [c["datamodule_hyper_parameters"]["seed"] for c in checkpoints] == [7, 7, 8]


class KeepBatches(L.Callback):
    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.images.append(batch[0].clone())


def augmented_batches(data: Path, seed: int) -> list[torch.Tensor]:
    """The first two training batches of a real fit: batch 0 comes from worker 0, batch 1 from worker 1."""
    L.seed_everything(seed, workers=True, verbose=False)
    dm = ImageDataModule(
        data, image_size=16, batch_size=4, num_workers=2, rotation=45, augment_on="cpu", persistent_workers=False
    )
    keep = KeepBatches()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=[keep],
    )
    trainer.fit(ImageClassifier(num_classes=2, image_size=16), datamodule=dm)
    return keep.images


def test_augmentation_differs_across_workers_and_samples_but_repeats_with_the_seed(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for label in ("a", "b"):  # every file is the same picture: any difference is the augmentation's
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(image).save(tmp_path / "train" / label / f"{i}.png")
    first = augmented_batches(tmp_path, seed=3)
    assert len(first) == 2
    assert not torch.equal(first[0], first[1])  # the two workers draw differently
    assert not torch.equal(first[0][0], first[0][1])  # so do samples within one worker's batch
    again = augmented_batches(tmp_path, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # and the seed repeats them
