"""Per-image CPU transforms (run in the loader's workers) and per-batch device transforms.

The pipeline keeps images uint8 until they reach the device: workers decode (JPEG DCT-scaled to just
above the training size), then resize, rotate and flip in one resampling, and hand over
`(3, H, W)` uint8 tensors, a quarter of the bytes of float32 to copy between processes and to the
device. Conversion to float and normalization happen on the device, batched, in
`ImageDataModule.on_after_batch_transfer` (see `DeviceTransform`).
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


def resize_crop(image_size: int) -> list:
    """Shorter side to `image_size`, then the centre square: no distortion, no padding."""
    return [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]


def train_transform(image_size: int, rotation: float = 0.0, hflip: bool = True) -> Callable:
    """Training transform on a PIL image -> `(3, S, S)` uint8 tensor, augmented on the CPU."""
    if not rotation and not hflip:
        return eval_transform(image_size)
    return RandomResizeRotateFlip(image_size, rotation, hflip)


def tensor_train_transform(rotation: float = 0.0, hflip: bool = True) -> Callable | None:
    """Training augmentation of an already resized `(3, S, S)` uint8 tensor (a cached image), or None."""
    if not rotation and not hflip:
        return None
    return RandomResizeRotateFlip(None, rotation, hflip)


def rotation_matrix(cos: Any, sin: Any, flip: Any, scale_x: float = 1.0, scale_y: float = 1.0) -> tuple:
    """Rows `(a, b), (d, e)` of the linear map from output to input coordinates, in `grid_sample`'s
    normalized units, of a rotation by the angle of `cos`, `sin` (counter-clockwise about the centre) and
    then a mirror where `flip`; `scale_x`, `scale_y` (at most 1) select the centred part of the input's
    width and height that the output covers. Python numbers or tensors (one entry per image) alike.

    Output (x, y) samples input (cos(m x) - sin y, sin(m x) + cos y), m = -1 where mirrored, in pixel
    units relative to the centres (y down): rotate, then mirror, as RandomRotation + RandomHorizontalFlip.
    """
    mirror = 1.0 - 2.0 * flip
    return (mirror * cos * scale_x, -sin * scale_x), (mirror * sin * scale_y, cos * scale_y)


@functools.lru_cache(maxsize=8)
def pixel_centres(size: int) -> torch.Tensor:
    """The centres of `size` pixels in [-1, 1] (`align_corners=False`), float32 on the CPU; read only."""
    return (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1


def linear_grid(a: float, b: float, d: float, e: float, size: int) -> torch.Tensor:
    """`F.affine_grid([[[a, b, 0], [d, e, 0]]], (1, C, size, size), align_corners=False)`: the same
    sampling points from one broadcast sum per coordinate, at a fraction of its CPU cost (it multiplies
    a `(size * size, 3)` base grid by theta)."""
    centres = pixel_centres(size)
    grid = torch.empty(1, size, size, 2)
    torch.add(centres * a, (centres * b).unsqueeze(1), out=grid[0, ..., 0])  # a x + b y
    torch.add(centres * d, (centres * e).unsqueeze(1), out=grid[0, ..., 1])  # d x + e y
    return grid


def pil_to_chw(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a `(3, H, W)` uint8 tensor over its `(H, W, 3)` pixels: no transposing copy
    (the channels-last strides are what `grid_sample` reads fastest on the CPU)."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def resize_rotate_flip(image: torch.Tensor, size: int, angle: float, flip: bool) -> torch.Tensor:
    """Shorter side to `size`, centre square, rotated `angle` degrees counter-clockwise about the centre
    (torchvision's convention), then mirrored if `flip`: one bilinear resampling of a `(3, H, W)` uint8
    image into a `(3, size, size)` uint8 one, black outside the source.

    One affine resampling replaces a resize followed by a rotation, each of which would resample every
    pixel; an image more than twice the size is first box-reduced by an integer factor, so the bilinear
    step never skips source pixels (no aliasing). At 224 px, `grid_sample` on a channels-last float image
    takes about half the CPU time of PIL's affine transform, whose bilinear filter is not vectorized.
    """
    # + 0.5 now, truncation at the end: rounding to nearest without a pass of its own (grid_sample is a
    # weighted mean with weights summing to 1 inside the source, and zero fill stays 0)
    x = image.unsqueeze(0).add(0.5).contiguous(memory_format=torch.channels_last)
    factor = min(x.shape[-2:]) // size
    if factor >= 2:
        x = F.avg_pool2d(x, factor, ceil_mode=True)  # partial boxes at the edges averaged over what they hold
    h, w = x.shape[-2:]
    short = min(h, w)
    radians = math.radians(angle)
    (a, b), (d, e) = rotation_matrix(math.cos(radians), math.sin(radians), flip, short / w, short / h)
    grid = linear_grid(a, b, d, e, size)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0].to(torch.uint8)


class RandomResizeRotateFlip:
    """Random rotation (uniform in [-rotation, rotation] degrees) and horizontal flip (p = 0.5) of an RGB
    PIL image or a `(3, H, W)` uint8 tensor, resized to `image_size` (None: its shorter side), as a
    `(3, S, S)` uint8 tensor: `resize_rotate_flip`."""

    def __init__(self, image_size: int | None, rotation: float = 0.0, hflip: bool = True) -> None:
        self.image_size, self.rotation, self.hflip = image_size, rotation, hflip

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        angle = float(torch.empty(1).uniform_(-self.rotation, self.rotation)) if self.rotation else 0.0
        flip = self.hflip and bool(torch.rand(1) < 0.5)
        if isinstance(image, Image.Image):
            image = pil_to_chw(image)
        return resize_rotate_flip(image, self.image_size or min(image.shape[-2:]), angle, flip)


AUTO_AUGMENT = {"ta_wide": v2.TrivialAugmentWide, "ra": v2.RandAugment, "augmix": v2.AugMix}


def then(first: Callable | None, extra: Callable | None) -> Callable | None:
    """`first`, then `extra`, either of which may be None (nothing to do)."""
    return v2.Compose([t for t in (first, extra) if t is not None]) if first and extra else first or extra


def recipe_augment(auto_augment: str, random_erase: float, mean: Sequence[float]) -> Callable | None:
    """Per-image training augmentation of a `(3, S, S)` uint8 image, after the resize: torchvision's
    TrivialAugmentWide, RandAugment or AugMix, then random erasing with probability `random_erase`. Erased
    pixels take the mean colour, which normalization maps to 0: torchvision's erasing after normalization."""
    ops = [AUTO_AUGMENT[auto_augment]()] if auto_augment != "none" else []
    if random_erase:
        ops.append(v2.RandomErasing(p=random_erase, value=[round(255 * m) for m in mean]))
    return v2.Compose(ops) if ops else None


def eval_transform(image_size: int) -> v2.Compose:
    """Evaluation / prediction transform on a PIL image -> `(3, S, S)` uint8 tensor."""
    return v2.Compose([*resize_crop(image_size), v2.PILToTensor()])


def rotate_flip(images: torch.Tensor, angles: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Rotate square image i of a float batch by `angles[i]` degrees (counter-clockwise, like
    torchvision's `rotate`) about its centre, then mirror it where `flips[i]`: one `grid_sample`.

    Bilinear sampling and zero fill outside the source, as the CPU path's `resize_rotate_flip`.
    """
    radians = torch.deg2rad(angles.to(images.dtype))
    (a, b), (d, e) = rotation_matrix(torch.cos(radians), torch.sin(radians), flips.to(images.dtype))
    zero = torch.zeros_like(a)
    theta = torch.stack([torch.stack([a, b, zero], 1), torch.stack([d, e, zero], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_rotate_flip(images: torch.Tensor, degrees: float, hflip: bool = True) -> torch.Tensor:
    """Rotate each image of a float batch by its own uniform angle in [-degrees, degrees] and mirror
    it with probability 0.5 (the distribution of `RandomRotation` + `RandomHorizontalFlip`), batched.
    """
    n = images.shape[0]
    angles = (torch.rand(n, device=images.device) * 2 - 1) * degrees
    flips = (
        torch.rand(n, device=images.device) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool, device=images.device)
    )
    return rotate_flip(images, angles, flips)


class DeviceTransform:
    """Batch work done on the device after transfer: uint8 -> float, optional augmentation, normalize.

    Args:
        mean, std: per-channel normalization in [0, 1] units.
        rotation: degrees for on-device random rotation (0 = none); used for training batches only.
        hflip: on-device random horizontal flip for training batches.
        channels_last: return NHWC-strided batches (faster convolutions with mixed precision on GPUs).
    """

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

    def _scale_shift(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(x / 255 - mean) / std as x * scale - shift: the /255 folded into the /std, one pass fewer."""
        if device not in self._affine:
            mean = torch.tensor(self.mean, dtype=torch.float64).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float64).view(1, -1, 1, 1)
            scale, shift = 1.0 / (255.0 * std), mean / std
            self._affine[device] = (scale.float().to(device), shift.float().to(device))
        return self._affine[device]

    def __call__(self, images: torch.Tensor, augment: bool) -> torch.Tensor:
        if self.channels_last:  # reorder the uint8 batch: a quarter of the bytes of the float one
            images = images.contiguous(memory_format=torch.channels_last)
        x = images.float()  # (B, 3, H, W) uint8 -> float in [0, 255], memory format kept
        if augment and (self.rotation or self.hflip):
            x = random_rotate_flip(x, self.rotation, self.hflip)  # zero fill: black, as on the CPU path
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        scale, shift = self._scale_shift(x.device)
        return x.mul_(scale).sub_(shift)
