"""The batch step of `--decode_on device`: a batch of JPEG bytes (`project.data.encoded`) decoded on the device in
one call, resized and centre-cropped there. The decoder is TorchCodec's (the `gpu` extra) when it imports, else
torchvision.io's, deprecated since torchvision 0.29. `DecodeBatch` is what the training run hands the DataModule as
`decode_jpegs`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torchvision.transforms.v2 import functional as TF

_FALLBACK = "decode_on device: TorchCodec is not installed (pip install -e '.[gpu]'); decoding with torchvision.io"


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
        decoded = list(images)  # (3, S, S) uint8 where the worker decoded it (not a JPEG, or an EXIF-turned one)
        jpegs = [i for i, data in enumerate(images) if data.ndim == 1]  # (num_bytes,) uint8
        if jpegs:
            for i, image in zip(jpegs, self._decode([images[i] for i in jpegs], device), strict=True):
                decoded[i] = image  # (3, H, W) uint8, each its own size
        size = [self.image_size]
        return torch.stack([TF.center_crop(TF.resize(x.to(device), size, antialias=True), size) for x in decoded])
