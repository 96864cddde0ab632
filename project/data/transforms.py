"""Per-image CPU transforms (run in the loader's workers) and per-batch device transforms.

The pipeline keeps images uint8 until they reach the device: workers decode (JPEG DCT-scaled to just
above the training size), resize, then rotate and flip at the training resolution, and hand over
`(3, H, W)` uint8 tensors, a quarter of the bytes of float32 to copy between processes and to the
device. Conversion to float and normalization happen on the device, batched, in
`ImageDataModule.on_after_batch_transfer` (see `DeviceTransform`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_crop(image_size: int) -> list:
    """Shorter side to `image_size`, then the centre square: no distortion, no padding."""
    return [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]


def train_transform(image_size: int, rotation: float = 0.0, hflip: bool = True) -> v2.Compose:
    """Training transform on a PIL image -> `(3, S, S)` uint8 tensor, augmented on the CPU.

    Resizing comes first, so the rotation runs at the training resolution: at 224 px it costs a
    small fraction of what it costs on a 1024 px source.
    """
    steps = resize_crop(image_size)
    if rotation:
        steps.append(v2.RandomRotation(rotation, interpolation=v2.InterpolationMode.BILINEAR))
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose([*steps, v2.PILToTensor()])


def eval_transform(image_size: int) -> v2.Compose:
    """Evaluation / prediction transform on a PIL image -> `(3, S, S)` uint8 tensor."""
    return v2.Compose([*resize_crop(image_size), v2.PILToTensor()])


def random_rotate_flip(images: torch.Tensor, degrees: float, hflip: bool = True) -> torch.Tensor:
    """Rotate each image of a float batch by its own uniform angle in [-degrees, degrees] and
    mirror it with probability 0.5: one affine grid and one `grid_sample` for the whole batch.

    The same distribution as the CPU path's `RandomRotation` + `RandomHorizontalFlip`: bilinear
    sampling, zero fill outside the source, rotation about the image centre.
    """
    n = images.shape[0]
    angles = (torch.rand(n, device=images.device) * 2 - 1) * math.radians(degrees)
    mirror = torch.ones(n, device=images.device)
    if hflip:
        mirror = torch.where(torch.rand(n, device=images.device) < 0.5, -mirror, mirror)
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(cos)
    # output (x, y) samples input (mirror * (cos x - sin y), sin x + cos y): rotate, then mirror
    theta = torch.stack(
        [torch.stack([mirror * cos, -mirror * sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1
    )  # (B, 2, 3)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


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
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:
            mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
            self._stats[device] = (mean, std)
        return self._stats[device]

    def __call__(self, images: torch.Tensor, augment: bool) -> torch.Tensor:
        x = images.float().div_(255)  # (B, 3, H, W) uint8 -> float in [0, 1]
        if augment and (self.rotation or self.hflip):
            x = random_rotate_flip(x, self.rotation, self.hflip)
        mean, std = self._mean_std(x.device)
        x = x.sub_(mean).div_(std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
