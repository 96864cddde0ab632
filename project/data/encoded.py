"""JPEGs decoded on the GPU for `ImageDataModule(decode_on="device")`: workers read bytes, the batch is decoded there
(`project.feed.device_decode`). Decoding is the largest per-image CPU cost (~4 ms for a 1024 px JPEG even at reduced
DCT scale); workers that only read bytes free a machine with few cores per GPU. Non-JPEGs, and JPEGs whose EXIF tag
says to turn them, are decoded upright in the workers (`load_image`) and join the batch decoded: decoders differ on
the tag (TorchCodec applies it on the CPU, torchvision.io's nvJPEG not), so orientation never depends on the path.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from project.data.folder import BadImageError, ImageFolderDataset, load_image

JPEG_MAGIC = b"\xff\xd8\xff"
EXIF_ORIENTATION = 0x0112


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
