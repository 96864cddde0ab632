"""Per-image CPU transforms (run in the loader's workers) and per-batch device transforms.

The pipeline keeps images uint8 until they reach the device: workers decode (JPEG DCT-scaled to just
above the training size), then resize, rotate and flip in one resampling, and hand over
`(3, H, W)` uint8 tensors, a quarter of the bytes of float32 to copy between processes and to the
device. Conversion to float and normalization happen on the device, batched, in
`ImageDataModule.on_after_batch_transfer` (see `DeviceTransform`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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
    augment = RandomResizeRotateFlip(None, rotation, hflip)
    return lambda image: augment(Image.fromarray(image.permute(1, 2, 0).numpy()))  # (3, S, S) -> (S, S, 3)


def resize_rotate_flip(image: Image.Image, size: int, angle: float, flip: bool) -> Image.Image:
    """Shorter side to `size`, centre square, rotated `angle` degrees counter-clockwise about the centre
    (torchvision's convention), then mirrored if `flip`: one bilinear resampling, black outside the source.

    One affine resampling replaces a resize followed by a rotation, each of which would resample every
    pixel; an image more than twice the size is first box-reduced by an integer factor, so the bilinear
    step never skips source pixels (no aliasing).
    """
    factor = min(image.size) // size
    if factor >= 2:
        image = image.reduce(factor)
    w, h = image.size
    scale = min(w, h) / size  # input pixels per output pixel
    theta = math.radians(angle)
    cos, sin = math.cos(theta) * scale, math.sin(theta) * scale
    mirror = -1.0 if flip else 1.0
    # output (x, y), relative to its centre, samples input (cos*m*x - sin*y, sin*m*x + cos*y) relative to
    # the input's centre (y down, m = mirror): rotate, then mirror, as RandomRotation + RandomHorizontalFlip
    a, b, d, e = cos * mirror, -sin, sin * mirror, cos
    half = size / 2
    c, f = w / 2 - (a + b) * half, h / 2 - (d + e) * half
    return image.transform((size, size), Image.Transform.AFFINE, (a, b, c, d, e, f), Image.Resampling.BILINEAR)


class RandomResizeRotateFlip:
    """Random rotation (uniform in [-rotation, rotation] degrees) and horizontal flip (p = 0.5) of a PIL
    image, resized to `image_size` (None: kept), as a `(3, S, S)` uint8 tensor: `resize_rotate_flip`."""

    def __init__(self, image_size: int | None, rotation: float = 0.0, hflip: bool = True) -> None:
        self.image_size, self.rotation, self.hflip = image_size, rotation, hflip

    def __call__(self, image: Image.Image) -> torch.Tensor:
        angle = float(torch.empty(1).uniform_(-self.rotation, self.rotation)) if self.rotation else 0.0
        flip = self.hflip and bool(torch.rand(1) < 0.5)
        size = self.image_size or min(image.size)
        out = resize_rotate_flip(image, size, angle, flip)
        return torch.from_numpy(np.array(out)).permute(2, 0, 1)  # (S, S, 3) -> (3, S, S) uint8, writable


def eval_transform(image_size: int) -> v2.Compose:
    """Evaluation / prediction transform on a PIL image -> `(3, S, S)` uint8 tensor."""
    return v2.Compose([*resize_crop(image_size), v2.PILToTensor()])


def rotate_flip(images: torch.Tensor, angles: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Rotate image i of a float batch by `angles[i]` degrees (counter-clockwise, like torchvision's
    `rotate`) about its centre, then mirror it where `flips[i]`: one affine grid, one `grid_sample`.

    Bilinear sampling and zero fill outside the source, as the CPU path's `RandomRotation`.
    """
    radians = torch.deg2rad(angles.to(images.dtype))
    mirror = 1.0 - 2.0 * flips.to(images.dtype)  # -1: mirrored
    cos, sin = torch.cos(radians), torch.sin(radians)
    zero = torch.zeros_like(cos)
    # output (x, y) samples input (cos(m x) - sin y, sin(m x) + cos y), m = mirror, in grid units (y down):
    # the rotated image, then mirrored, exactly as rotate-then-flip on the CPU
    theta = torch.stack(
        [torch.stack([mirror * cos, -sin, zero], 1), torch.stack([mirror * sin, cos, zero], 1)], 1
    )  # (B, 2, 3)
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
