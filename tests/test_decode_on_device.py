"""Decoding on the device: workers read JPEG bytes, the batch is decoded and resized after the loader.

The nvJPEG path needs CUDA; the same code runs on the CPU here (torchvision's decode_jpeg takes a device),
so everything but the decoder library is tested everywhere."""

from __future__ import annotations

import os

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import decode_jpeg

from project.data import ImageDataModule
from project.data.encoded import EncodedImageFolder, collate_encoded
from project.data.folder import ImageFolderDataset, load_image
from project.data.transforms import eval_transform
from project.feed.device_decode import DecodeBatch
from project.models import ImageClassifier
from tests.conftest import write_image


def mixed_folder(root, size=(80, 60)):
    """Two classes of JPEGs with a PNG and a PNG named .jpg among them."""
    for i in range(3):
        write_image(root / "cat" / f"{i}.jpg", size=size, seed=i)
        write_image(root / "dog" / f"{i}.jpg", size=size, seed=10 + i)
    write_image(root / "dog" / "p.png", size=size, seed=20)
    png = root / "cat" / "really_png.jpg"
    write_image(root / "cat" / "tmp.png", size=size, seed=22).rename(png)  # PNG bytes behind a .jpg name
    return root


def encoded(root, size: int) -> EncodedImageFolder:
    return EncodedImageFolder(root, transform=eval_transform(size))


def test_workers_hand_over_jpeg_bytes_and_decode_other_formats(tmp_path):
    source = ImageFolderDataset(mixed_folder(tmp_path / "data"))
    dataset = encoded(tmp_path / "data", 32)
    kinds = {}
    for i in range(len(dataset)):
        data, target = dataset[i]
        path = source.samples[i][0]
        kinds[path.rsplit("/", 1)[-1]] = (data.ndim, data.dtype, target)
        if data.ndim == 1:
            assert bytes(data[:3].tolist()) == b"\xff\xd8\xff" and len(data) == os.path.getsize(path)
    assert kinds["0.jpg"][:2] == (1, torch.uint8)  # bytes, not decoded
    assert kinds["p.png"][:2] == (3, torch.uint8) and kinds["really_png.jpg"][:2] == (3, torch.uint8)
    assert dataset.classes == source.classes and list(dataset.targets) == list(source.targets)


def test_collate_keeps_variable_length_bytes_as_a_list(tmp_path):
    dataset = encoded(mixed_folder(tmp_path / "data"), 32)
    images, labels = next(iter(DataLoader(dataset, batch_size=5, collate_fn=collate_encoded, num_workers=1)))
    assert isinstance(images, list) and len(images) == 5 and labels.shape == (5,) and labels.dtype == torch.int64
    assert len({x.numel() for x in images if x.ndim == 1}) > 1  # JPEG sizes differ: no stacking possible


def test_decoded_batch_matches_the_cpu_pipeline(tmp_path):
    source = ImageFolderDataset(mixed_folder(tmp_path / "data", size=(120, 90)))
    dataset = encoded(tmp_path / "data", 48)
    images, _ = collate_encoded([dataset[i] for i in range(len(dataset))])
    batch = DecodeBatch(48)(images, "cpu")
    assert batch.shape == (len(dataset), 3, 48, 48) and batch.dtype == torch.uint8
    expected = torch.stack([eval_transform(48)(load_image(path)) for path, _ in source.samples])
    assert (batch.float() - expected.float()).abs().mean() < 4  # decoders and resize kernels differ slightly
    assert (batch[0].float() - expected[1].float()).abs().mean() > 20  # and images are not swapped


def test_a_training_run_decodes_on_the_device_side_of_the_loader(tmp_path):
    """The DataModule's own path: bytes through the loader, decoded before transfer, augmented and normalized
    after it (here the device is the CPU, which the command line refuses, so the logic runs everywhere)."""
    data = tmp_path / "data"
    mixed_folder(data / "train", size=(96, 72))
    mixed_folder(data / "val", size=(96, 72))
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[0])

    datamodule = ImageDataModule(
        data, image_size=32, batch_size=4, num_workers=1, decode_on="device", rotation=20, decode_jpegs=DecodeBatch
    )
    model = ImageClassifier(num_classes=2, image_size=32)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
    )
    trainer.fit(model, datamodule=datamodule)
    assert isinstance(datamodule.train_set, EncodedImageFolder) and datamodule.device_transform.rotation == 20
    assert seen and all(batch.shape[1:] == (3, 32, 32) and batch.dtype == torch.float32 for batch in seen)
    assert trainer.global_step == len(seen) == 2  # 8 images in batches of 4


def test_splits_held_out_of_train_still_hand_over_bytes(tmp_path):
    """Without val/, the validation split is cut from train/: both halves keep reading JPEG bytes."""
    mixed_folder(tmp_path / "train", size=(96, 72))
    datamodule = ImageDataModule(
        tmp_path, image_size=32, num_workers=0, decode_on="device", val_fraction=0.5, decode_jpegs=DecodeBatch
    )
    datamodule.setup("fit")
    for dataset in (datamodule.train_set, datamodule.val_set):
        assert isinstance(dataset, EncodedImageFolder)
        assert any(dataset[i][0].ndim == 1 for i in range(len(dataset)))  # JPEG bytes, decoded on the device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_decodes_like_the_cpu(tmp_path):
    dataset = encoded(mixed_folder(tmp_path / "data", size=(120, 90)), 48)
    images, _ = collate_encoded([dataset[i] for i in range(len(dataset))])
    on_gpu = DecodeBatch(48)(images, "cuda")
    assert on_gpu.is_cuda and (on_gpu.cpu().float() - DecodeBatch(48)(images, "cpu").float()).abs().mean() < 3


def exif_jpeg(path, orientation: int, size=(64, 40)):
    """A JPEG whose pixels are stored sideways (or mirrored) with the EXIF tag saying how to show them."""
    array = torch.zeros(size[1], size[0], 3, dtype=torch.uint8)
    array[: size[1] // 4, : size[0] // 3] = torch.tensor([250, 20, 20], dtype=torch.uint8)  # a red top-left block
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.numpy()).save(path, quality=95, exif=exif)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.filterwarnings("ignore::UserWarning")  # torchvision.io's decoders are deprecated
def test_device_decoding_turns_images_upright_as_the_cpu_path_does(tmp_path, orientation):
    """A phone photo trains upright on either path: a JPEG whose EXIF tag turns it is decoded in the worker, as
    load_image decodes it on the CPU path, whichever decoder the device would use."""
    exif_jpeg(tmp_path / "data" / "a" / "x.jpg", orientation)
    dataset = EncodedImageFolder(tmp_path / "data", transform=eval_transform(40))
    data, _ = dataset[0]
    assert (data.ndim == 1) == (orientation == 1)  # upright JPEGs still travel as bytes
    decode = DecodeBatch(40)
    decode._decode = lambda jpegs, device: [decode_jpeg(x) for x in jpegs]  # ignores the tag, as nvJPEG does
    decoded = decode([data], "cpu")[0]
    expected = eval_transform(40)(load_image(tmp_path / "data" / "a" / "x.jpg"))
    assert (decoded.float() - expected.float()).abs().mean() < 3, "orientation differs from the CPU path"


def test_torchcodec_decodes_when_installed_with_the_same_pixels_as_torchvision(tmp_path):
    decoders = pytest.importorskip("torchcodec.decoders")
    data = torch.from_numpy(np.fromfile(exif_jpeg(tmp_path / "x.jpg", 1), dtype=np.uint8))
    assert torch.equal(decoders.decode_jpeg([data], mode="RGB")[0], decode_jpeg(data))
