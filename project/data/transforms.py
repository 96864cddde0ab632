"""Per-image CPU transforms (run in the loader's workers) and per-batch device transforms.

The pipeline keeps images uint8 until they reach the device: workers decode (JPEG DCT-scaled to just
above the training size), resize, then rotate and flip at the training resolution, and hand over
`(3, H, W)` uint8 tensors, a quarter of the bytes of float32 to copy between processes and to the
device. Conversion to float and normalization happen on the device, batched, in
`ImageDataModule.on_after_batch_transfer` (see `DeviceTransform`).
"""

from __future__ import annotations

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
    return v2.Compose([*resize_crop(image_size), *augmentations(rotation, hflip), v2.PILToTensor()])


def augmentations(rotation: float = 0.0, hflip: bool = True) -> list:
    """Random rotation (bilinear, zero fill) and horizontal flip: on PIL images or `(3, H, W)` tensors."""
    steps: list = []
    if rotation:
        steps.append(v2.RandomRotation(rotation, interpolation=v2.InterpolationMode.BILINEAR))
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return steps


def tensor_train_transform(rotation: float = 0.0, hflip: bool = True) -> v2.Compose | None:
    """Training augmentation of an already resized `(3, S, S)` uint8 tensor (a cached image), or None."""
    steps = augmentations(rotation, hflip)
    return v2.Compose(steps) if steps else None


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
