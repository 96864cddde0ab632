"""Per-image CPU transforms (run in the loader's workers) and per-batch device transforms.

Images stay uint8 until the device: workers decode (JPEG DCT-scaled to just above the training size), then resize,
rotate and flip in one resampling, handing over `(3, H, W)` uint8 tensors, a quarter of float32's bytes to copy between
processes and to the device. `DeviceTransform` converts and normalizes there, batched, in `on_after_batch_transfer`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUTO_AUGMENT = {"ta_wide": v2.TrivialAugmentWide, "ra": v2.RandAugment, "augmix": v2.AugMix}


def resize_crop(image_size: int) -> list:
    """Shorter side to `image_size`, then the centre square: no distortion, no padding."""
    return [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]


def train_transform(image_size: int, rotation: float = 0.0, hflip: bool = True) -> Callable:
    """Training transform on a PIL image -> `(3, S, S)` uint8 tensor, augmented on the CPU."""
    return RandomResizeRotateFlip(image_size, rotation, hflip) if rotation or hflip else eval_transform(image_size)


def tensor_train_transform(rotation: float = 0.0, hflip: bool = True) -> Callable | None:
    """Training augmentation of an already resized `(3, S, S)` uint8 tensor (a cached image), or None."""
    return RandomResizeRotateFlip(None, rotation, hflip) if rotation or hflip else None


def rotation_matrix(cos: Any, sin: Any, flip: Any, scale_x: float = 1.0, scale_y: float = 1.0) -> tuple:
    """Rows `(a, b), (d, e)` of the output-to-input map in `grid_sample` units: rotate by the angle of `cos`, `sin`
    (counter-clockwise), then mirror where `flip`, as RandomRotation + RandomHorizontalFlip; `scale_x`, `scale_y` (<= 1)
    pick the centred part of the input covered. Numbers or per-image tensors alike. Output (x, y) samples input
    (cos(m x) - sin y, sin(m x) + cos y) in pixels from the centres (y down), m = -1 where mirrored."""
    mirror = 1.0 - 2.0 * flip
    return (mirror * cos * scale_x, -sin * scale_x), (mirror * sin * scale_y, cos * scale_y)


@functools.lru_cache(maxsize=8)
def pixel_centres(size: int) -> torch.Tensor:
    """The centres of `size` pixels in [-1, 1] (`align_corners=False`), float32 on the CPU; read only."""
    return (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1


def linear_grid(a: float, b: float, d: float, e: float, size: int) -> torch.Tensor:
    """`F.affine_grid([[[a, b, 0], [d, e, 0]]], (1, C, size, size), align_corners=False)` from one broadcast sum per
    coordinate, at a fraction of its CPU cost (it multiplies a `(size * size, 3)` base grid by theta)."""
    centres, grid = pixel_centres(size), torch.empty(1, size, size, 2)
    torch.add(centres * a, (centres * b).unsqueeze(1), out=grid[0, ..., 0])  # a x + b y
    torch.add(centres * d, (centres * e).unsqueeze(1), out=grid[0, ..., 1])  # d x + e y
    return grid


def pil_to_chw(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> `(3, H, W)` uint8 view of its `(H, W, 3)` pixels, no copy: `grid_sample` reads those fastest."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def resize_rotate_flip(image: torch.Tensor, size: int, angle: float, flip: bool) -> torch.Tensor:
    """Shorter side to `size`, centre square, rotated `angle` degrees counter-clockwise (torchvision's convention),
    then mirrored if `flip`: one bilinear resampling of `(3, H, W)` uint8 into `(3, size, size)` uint8, black outside.
    Replaces a resize and a rotation that each resample every pixel; an image over twice `size` is first box-reduced
    by an integer factor so no source pixel is skipped (no aliasing). At 224 px, `grid_sample` on channels-last floats
    takes about half the CPU time of PIL's unvectorized bilinear affine."""
    # + 0.5 now, truncation at the end: rounding to nearest for free (grid_sample's weights sum to 1, zero fill stays 0)
    x = image.unsqueeze(0).add(0.5).contiguous(memory_format=torch.channels_last)
    if (factor := min(x.shape[-2:]) // size) >= 2:
        x = F.avg_pool2d(x, factor, ceil_mode=True)  # partial boxes at the edges averaged over what they hold
    h, w = x.shape[-2:]
    radians = math.radians(angle)
    (a, b), (d, e) = rotation_matrix(math.cos(radians), math.sin(radians), flip, min(h, w) / w, min(h, w) / h)
    return F.grid_sample(x, linear_grid(a, b, d, e, size), align_corners=False)[0].to(torch.uint8)


class RandomResizeRotateFlip:
    """Random rotation (uniform in [-rotation, rotation] degrees) and horizontal flip (p = 0.5) of an RGB PIL image
    or a `(3, H, W)` uint8 tensor, resized to `image_size` (None: its shorter side): `resize_rotate_flip`."""

    def __init__(self, image_size: int | None, rotation: float = 0.0, hflip: bool = True) -> None:
        self.image_size, self.rotation, self.hflip = image_size, rotation, hflip

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        angle = float(torch.empty(1).uniform_(-self.rotation, self.rotation)) if self.rotation else 0.0
        flip = self.hflip and bool(torch.rand(1) < 0.5)
        image = pil_to_chw(image) if isinstance(image, Image.Image) else image
        return resize_rotate_flip(image, self.image_size or min(image.shape[-2:]), angle, flip)


def then(first: Callable | None, extra: Callable | None) -> Callable | None:
    """`first`, then `extra`, either of which may be None (nothing to do)."""
    return v2.Compose([t for t in (first, extra) if t is not None]) if first and extra else first or extra


def recipe_augment(auto_augment: str, random_erase: float, mean: Sequence[float]) -> Callable | None:
    """Per-image augmentation of a resized `(3, S, S)` uint8 image: TrivialAugmentWide, RandAugment or AugMix, then
    erasing with probability `random_erase` to the mean colour (0 once normalized: torchvision's erasing after it)."""
    ops = [AUTO_AUGMENT[auto_augment]()] if auto_augment != "none" else []
    if random_erase:
        ops.append(v2.RandomErasing(p=random_erase, value=[round(255 * m) for m in mean]))
    return v2.Compose(ops) if ops else None


def eval_transform(image_size: int) -> v2.Compose:
    """Evaluation / prediction transform on a PIL image -> `(3, S, S)` uint8 tensor."""
    return v2.Compose([*resize_crop(image_size), v2.PILToTensor()])


def rotate_flip(images: torch.Tensor, angles: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Rotate square image i of a float batch by `angles[i]` degrees (counter-clockwise, as torchvision's `rotate`)
    about its centre, then mirror it where `flips[i]`: one bilinear `grid_sample`, zero fill, as on the CPU."""
    radians = torch.deg2rad(angles.to(images.dtype))
    (a, b), (d, e) = rotation_matrix(torch.cos(radians), torch.sin(radians), flips.to(images.dtype))
    theta = F.pad(torch.stack([a, b, d, e], 1).view(-1, 2, 2), (0, 1))  # (B, 2, 3), no translation
    return F.grid_sample(images, F.affine_grid(theta, list(images.shape), align_corners=False), align_corners=False)


def random_rotate_flip(images: torch.Tensor, degrees: float, hflip: bool = True) -> torch.Tensor:
    """Rotate each image of a float batch by its own uniform angle in [-degrees, degrees] and mirror it with p = 0.5
    (the distribution of `RandomRotation` + `RandomHorizontalFlip`), batched."""
    n, device = images.shape[0], images.device
    angles = (torch.rand(n, device=device) * 2 - 1) * degrees
    flips = torch.rand(n, device=device) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool, device=device)
    return rotate_flip(images, angles, flips)


class DeviceTransform:
    """Batch work done on the device after transfer: uint8 -> float, random `rotation` (degrees) and `hflip` for
    training batches, normalization by `mean`, `std` ([0, 1] units); NHWC-strided with `channels_last`."""

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        rotation: float = 0.0,
        hflip: bool = False,
        channels_last: bool = False,
    ) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self.rotation, self.hflip, self.channels_last = rotation, hflip, channels_last
        self._affine: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor, augment: bool) -> torch.Tensor:
        if self.channels_last:  # reorder the uint8 batch: a quarter of the bytes of the float one
            images = images.contiguous(memory_format=torch.channels_last)
        x = images.float()  # (B, 3, H, W) uint8 -> float in [0, 255], memory format kept
        if augment and (self.rotation or self.hflip):
            x = random_rotate_flip(x, self.rotation, self.hflip)  # zero fill: black, as on the CPU path
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        if x.device not in self._affine:  # (x / 255 - mean) / std as x * scale - shift: one pass fewer
            mean, std = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in (self.mean, self.std))
            self._affine[x.device] = ((1.0 / (255.0 * std)).float().to(x.device), (mean / std).float().to(x.device))
        scale, shift = self._affine[x.device]
        return x.mul_(scale).sub_(shift)
