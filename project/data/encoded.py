"""JPEGs decoded on the GPU: workers read file bytes, the batch is decoded with nvJPEG, then resized there.

`ImageDataModule(decode_on="device")` uses this. Decoding is the largest per-image cost on the CPU (a
1024 px JPEG takes ~4 ms even at reduced DCT scale), so a machine with few cores per GPU stops being
bound by it: the workers only read bytes. Files that are not JPEGs (PNG, BMP, ...) are decoded in the
workers as before and join the batch already decoded. EXIF orientation is not applied to JPEGs decoded
on the GPU (nvJPEG ignores it); a corrupt JPEG stops the batch (run with decode_on="cpu" to find it).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from project.data.folder import ImageFolderDataset, bad_image_error, load_image

JPEG_MAGIC = b"\xff\xd8\xff"


class EncodedImageDataset(torch.utils.data.Dataset):
    """The samples of a folder dataset as `(data, label)`: `data` is a JPEG file's bytes, a 1-D uint8 tensor,
    or, for other formats, the `(3, S, S)` uint8 tensor that `transform` makes of the decoded image."""

    def __init__(self, source: ImageFolderDataset, transform: Callable | None = None) -> None:
        self.source = source
        self.transform = transform
        self.classes, self.class_to_idx = source.classes, source.class_to_idx

    @property
    def samples(self) -> Sequence:
        return self.source.samples

    @property
    def targets(self) -> np.ndarray:
        return self.source.targets

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.source.samples[index]
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError as error:
            raise bad_image_error(path, error) from error
        if data[:3].tobytes() == JPEG_MAGIC:
            return torch.from_numpy(data), target  # (num_bytes,) uint8: decoded on the device
        image = load_image(io.BytesIO(data), self.source.decode_min_size)  # the bytes already read, not the file again
        return (self.transform(image) if self.transform else TF.pil_to_tensor(image)), target


def collate_encoded(samples: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Byte strings differ in length, so a batch is a list of tensors (kept on the CPU, where nvJPEG
    reads them) and a `(B,)` label tensor."""
    return [data for data, _ in samples], torch.tensor([target for _, target in samples])


def decode_batch(images: list[torch.Tensor], image_size: int, device: torch.device | str) -> torch.Tensor:
    """A batch from `collate_encoded` -> `(B, 3, S, S)` uint8 on `device`: the JPEGs decoded in one call
    (nvJPEG on a CUDA device), then each image's shorter side resized to S and the centre square cut."""
    jpegs = [i for i, data in enumerate(images) if data.ndim == 1]
    decoded: list[Any] = list(images)
    if jpegs:
        found = decode_jpeg([images[i] for i in jpegs], ImageReadMode.RGB, device=device)
        for i, image in zip(jpegs, found, strict=True):
            decoded[i] = image  # (3, H, W) uint8, each its own size
    return torch.stack(
        [TF.center_crop(TF.resize(x.to(device), [image_size], antialias=True), [image_size]) for x in decoded]
    )
