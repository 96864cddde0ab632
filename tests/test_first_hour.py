"""What a new user meets in the first hour: problems found before training, backbones with auxiliary heads
or size limits, a small folder with a few bad files, and a limited validation that is a fair sample."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from project.data import ImageDataModule
from project.models import ImageClassifier
from tests.conftest import train_exit_code, write_image


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_test_classes_unlike_train_stop_before_any_training(tiny_shapes, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_shapes, data)
    shutil.rmtree(next(p for p in sorted((data / "test").iterdir()) if p.is_dir()))  # test/ lacks one class
    assert train_exit_code(["--data_dir", str(data), "--default_root_dir", str(tmp_path), "--accelerator", "cpu"]) == 2
    assert "missing" in one_line(capsys)
    assert not (tmp_path / "lightning_logs").exists() or not list((tmp_path / "lightning_logs").rglob("*.ckpt"))


@pytest.mark.parametrize("backbone", ["googlenet", "inception_v3"])
def test_backbones_with_auxiliary_heads_train(backbone):
    model = ImageClassifier(backbone=backbone, num_classes=3, image_size=96)
    model.train()
    loss = model.criterion(model(torch.randn(2, 3, 96, 96)), torch.tensor([0, 2]))  # a tuple would fail here
    loss.backward()
    assert torch.isfinite(loss)


def test_a_backbone_that_needs_other_image_sizes_is_one_line_naming_both_flags(tiny_shapes, tmp_path, capsys):
    argv = ["--data_dir", str(tiny_shapes), "--default_root_dir", str(tmp_path), "--accelerator", "cpu"]
    assert train_exit_code([*argv, "--backbone", "vit_b_16", "--image_size", "32"]) == 2
    line = one_line(capsys)
    assert "--backbone vit_b_16" in line and "--image_size 32" in line


@pytest.mark.slow
def test_skip_bad_images_on_a_small_folder_finishes_and_reports(tmp_path):
    data = tmp_path / "data"
    for i in range(102):
        write_image(data / "train" / ("a" if i % 2 else "b") / f"{i}.png", size=(24, 24), seed=i)
    for i in (3, 8):  # 2 of 102 files unreadable
        (data / "train" / ("a" if i % 2 else "b") / f"{i}.png").write_bytes(b"not an image")
    argv = ["--data_dir", str(data), "--default_root_dir", str(tmp_path), "--accelerator", "cpu"]
    argv += ["--image_size", "24", "--max_epochs", "1", "--num_workers", "0", "--skip_bad_images"]
    assert train_exit_code(argv) == 0  # with the default --max_bad_fraction the run finishes
    listed = (tmp_path / "lightning_logs" / "version_0" / "bad_images.txt").read_text().split()
    assert sorted(listed) == sorted(str(data / "train" / c / f"{i}.png") for c, i in (("a", 3), ("b", 8)))


def test_validation_batches_mix_classes_in_a_seeded_order(tiny_shapes):
    def first_val_labels(seed: int) -> list[int]:
        datamodule = ImageDataModule(data_dir=tiny_shapes, image_size=32, batch_size=16, num_workers=0, seed=seed)
        datamodule.setup("fit")
        return next(iter(datamodule.val_dataloader()))[1].tolist()

    labels = first_val_labels(0)
    assert len(set(labels)) >= 4  # 8 classes, 10 images each: a class-ordered batch of 16 holds 2
    assert first_val_labels(0) == labels and first_val_labels(1) != labels
    datamodule = ImageDataModule(data_dir=tiny_shapes / "train", image_size=32, num_workers=0, val_fraction=0.5)
    datamodule.setup("fit")  # the split-off validation (no val/ folder used) is mixed too
    assert np.bincount(datamodule.val_set.targets[:16]).max() < 16
