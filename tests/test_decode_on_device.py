"""Decoding on the device: workers read JPEG bytes, the batch is decoded and resized after the loader.

The nvJPEG path needs CUDA; the same code runs on the CPU here (torchvision's decode_jpeg takes a device),
so everything but the decoder library is tested everywhere."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from project.data import ImageDataModule
from project.data.encoded import EncodedImageDataset, collate_encoded, decode_batch
from project.data.folder import ImageFolderDataset, load_image
from project.data.transforms import eval_transform
from project.models import ImageClassifier
from tests.conftest import load_script, write_image


def mixed_folder(root, size=(80, 60)):
    """Two classes of JPEGs with a PNG and a PNG named .jpg among them."""
    for i in range(3):
        write_image(root / "cat" / f"{i}.jpg", size=size, seed=i)
        write_image(root / "dog" / f"{i}.jpg", size=size, seed=10 + i)
    write_image(root / "dog" / "p.png", size=size, seed=20)
    png = root / "cat" / "really_png.jpg"
    write_image(root / "cat" / "tmp.png", size=size, seed=22).rename(png)  # PNG bytes behind a .jpg name
    return root


def test_workers_hand_over_jpeg_bytes_and_decode_other_formats(tmp_path):
    source = ImageFolderDataset(mixed_folder(tmp_path / "data"))
    dataset = EncodedImageDataset(source, transform=eval_transform(32))
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
    dataset = EncodedImageDataset(ImageFolderDataset(mixed_folder(tmp_path / "data")), transform=eval_transform(32))
    images, labels = next(iter(DataLoader(dataset, batch_size=5, collate_fn=collate_encoded, num_workers=1)))
    assert isinstance(images, list) and len(images) == 5 and labels.shape == (5,) and labels.dtype == torch.int64
    assert len({x.numel() for x in images if x.ndim == 1}) > 1  # JPEG sizes differ: no stacking possible


def test_decoded_batch_matches_the_cpu_pipeline(tmp_path):
    source = ImageFolderDataset(mixed_folder(tmp_path / "data", size=(120, 90)))
    dataset = EncodedImageDataset(source, transform=eval_transform(48))
    images, _ = collate_encoded([dataset[i] for i in range(len(dataset))])
    batch = decode_batch(images, 48, "cpu")
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

    datamodule = ImageDataModule(data, image_size=32, batch_size=4, num_workers=1, decode_on="device", rotation=20)
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
    assert isinstance(datamodule.train_set, EncodedImageDataset) and datamodule.device_transform.rotation == 20
    assert seen and all(batch.shape[1:] == (3, 32, 32) and batch.dtype == torch.float32 for batch in seen)
    assert trainer.global_step == len(seen) == 2  # 8 images in batches of 4


def test_the_command_line_refuses_device_decoding_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = load_script("train").main(["--decode_on", "device", "--default_root_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--decode_on device" in err and "CUDA" in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_decodes_like_the_cpu(tmp_path):
    source = ImageFolderDataset(mixed_folder(tmp_path / "data", size=(120, 90)))
    images, _ = collate_encoded([EncodedImageDataset(source, eval_transform(48))[i] for i in range(len(source))])
    on_gpu = decode_batch(images, 48, "cuda")
    assert on_gpu.is_cuda and (on_gpu.cpu().float() - decode_batch(images, 48, "cpu").float()).abs().mean() < 3
