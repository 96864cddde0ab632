"""Decoding on the device: workers read JPEG bytes, the batch is decoded and resized after the loader.

The nvJPEG path needs CUDA; the same code runs on the CPU here (torchvision's decode_jpeg takes a device),
so everything but the decoder library is tested everywhere."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

from project.data.encoded import EncodedImageDataset, collate_encoded, decode_batch
from project.data.folder import ImageFolderDataset, load_image
from project.data.transforms import eval_transform
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
