"""JPEGs decoded on the GPU for `ImageDataModule(decode_on="device")`: workers read bytes, the batch is decoded there.

Decoding is the largest per-image CPU cost (~4 ms for a 1024 px JPEG even at reduced DCT scale); workers that only read
bytes free a machine with few cores per GPU. Non-JPEGs, and JPEGs whose EXIF tag says to turn them, are decoded upright
in the workers (`load_image`) and join the batch decoded: decoders differ on the tag (TorchCodec applies it on the CPU,
torchvision.io's nvJPEG not). Decoder: TorchCodec's (`gpu` extra), else torchvision.io's (deprecated since 0.29).
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
_FALLBACK = "decode_on device: TorchCodec is not installed (pip install -e '.[gpu]'); decoding with torchvision.io"


class EncodedImageFolder(ImageFolderDataset):
    """Items `(data, label)`: an upright JPEG's bytes (1-D uint8), else `transform`'s `(3, S, S)` uint8 tensor."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError as error:
            raise BadImageError(f"cannot read image {path!r} ({type(error).__name__}: {error})", path) from error
        if data[:3].tobytes() == JPEG_MAGIC:
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                if image.getexif().get(EXIF_ORIENTATION, 1) == 1:
                    return torch.from_numpy(data), target  # (num_bytes,) uint8: decoded on the device
        image = load_image(io.BytesIO(data), self.decode_min_size, name=path)  # the bytes already read
        return (self.transform(image) if self.transform else TF.pil_to_tensor(image)), target


def collate_encoded(samples: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Byte strings differ in length: a list of tensors (on the CPU, where nvJPEG reads them) and `(B,)` labels."""
    return [data for data, _ in samples], torch.tensor([target for _, target in samples])


def jpeg_decoder() -> Any:
    """TorchCodec's batched `decode_jpeg`, else torchvision.io's (said once, in one line)."""
    try:
        from torchcodec.decoders import decode_jpeg
    except Exception:  # not installed, or a wheel that does not load beside this torch build
        from torchvision.io import ImageReadMode, decode_jpeg

        rank_zero_info(_FALLBACK)

        def decode(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
            with warnings.catch_warnings():  # its deprecation, said above once rather than every batch
                warnings.simplefilter("ignore")
                return decode_jpeg(jpegs, ImageReadMode.RGB, device=device)

        return decode
    return lambda jpegs, device: decode_jpeg(jpegs, mode="RGB", device=device)


class DecodeBatch:
    """A `collate_encoded` batch -> `(B, 3, S, S)` uint8 on `device`: JPEGs decoded in one call, resized, cropped."""

    def __init__(self, image_size: int) -> None:
        self.image_size, self._decode = image_size, None  # decoder picked at the first batch: may never decode here

    def __call__(self, images: list[torch.Tensor], device: torch.device | str) -> torch.Tensor:
        self._decode = self._decode or jpeg_decoder()
        decoded, jpegs = list(images), [i for i, data in enumerate(images) if data.ndim == 1]
        for i, image in zip(jpegs, self._decode([images[i] for i in jpegs], device) if jpegs else [], strict=True):
            decoded[i] = image  # (3, H, W) uint8, each its own size
        size = [self.image_size]
        return torch.stack([TF.center_crop(TF.resize(x.to(device), size, antialias=True), size) for x in decoded])
