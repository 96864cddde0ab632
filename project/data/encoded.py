"""JPEGs decoded on the GPU: workers read file bytes, the batch is decoded with nvJPEG, then resized there.

`ImageDataModule(decode_on="device")` uses this. Decoding is the largest per-image cost on the CPU (a
1024 px JPEG takes ~4 ms even at reduced DCT scale), so a machine with few cores per GPU stops being
bound by it: the workers only read bytes. Files that are not JPEGs (PNG, BMP, ...), and JPEGs whose EXIF tag
says to turn them, are decoded in the workers as before (upright, as `load_image` makes them) and join the batch
already decoded: decoders differ in whether they apply the tag (TorchCodec does on the CPU, torchvision.io's
nvJPEG path does not), so orientation never depends on the decode path. The decoder is TorchCodec's (the `gpu`
extra) when it imports, else torchvision.io's, deprecated since torchvision 0.29.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from project.data.folder import BadImageError, ImageFolderDataset, load_image

JPEG_MAGIC = b"\xff\xd8\xff"
EXIF_ORIENTATION = 0x0112


class EncodedImageFolder(ImageFolderDataset):
    """An image folder whose items are `(data, label)`: `data` is an upright JPEG file's bytes, a 1-D uint8
    tensor, or for other files the `(3, S, S)` uint8 tensor that `transform` makes of the decoded image."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError as error:
            raise BadImageError(f"cannot read image {path!r} ({type(error).__name__}: {error})", path) from error
        if data[:3].tobytes() == JPEG_MAGIC:
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                upright = image.getexif().get(EXIF_ORIENTATION, 1) == 1
            if upright:
                return torch.from_numpy(data), target  # (num_bytes,) uint8: decoded on the device
        image = load_image(io.BytesIO(data), self.decode_min_size, name=path)  # the bytes already read
        return (self.transform(image) if self.transform else TF.pil_to_tensor(image)), target


def collate_encoded(samples: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Byte strings differ in length, so a batch is a list of tensors (kept on the CPU, where nvJPEG reads
    them) and a `(B,)` label tensor."""
    return [data for data, _ in samples], torch.tensor([target for _, target in samples])


def jpeg_decoder() -> Any:
    """TorchCodec's batched `decode_jpeg`, else torchvision.io's (said once, in one line)."""
    try:
        from torchcodec.decoders import decode_jpeg

        return lambda jpegs, device: decode_jpeg(jpegs, mode="RGB", device=device)
    except Exception:  # not installed, or a wheel that does not load beside this torch build
        from torchvision.io import ImageReadMode, decode_jpeg

        rank_zero_info(
            "decode_on device: TorchCodec is not installed (pip install -e '.[gpu]'); decoding with torchvision.io"
        )

        def decode(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
            with warnings.catch_warnings():  # its deprecation, said above once rather than every batch
                warnings.simplefilter("ignore")
                return decode_jpeg(jpegs, ImageReadMode.RGB, device=device)

        return decode


class DecodeBatch:
    """A batch from `collate_encoded` -> `(B, 3, S, S)` uint8 on `device`: the JPEGs decoded in one call
    (nvJPEG on a CUDA device), then each image's shorter side resized to S and the centre square cut."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self._decode: Any = None  # chosen at the first batch: the DataModule may never decode on this process

    def __call__(self, images: list[torch.Tensor], device: torch.device | str) -> torch.Tensor:
        if self._decode is None:
            self._decode = jpeg_decoder()
        jpegs = [i for i, data in enumerate(images) if data.ndim == 1]
        decoded = list(images)
        if jpegs:
            for i, image in zip(jpegs, self._decode([images[i] for i in jpegs], device), strict=True):
                decoded[i] = image  # (3, H, W) uint8, each its own size
        size = [self.image_size]
        return torch.stack([TF.center_crop(TF.resize(x.to(device), size, antialias=True), size) for x in decoded])
