"""The one-pass CPU augmentation: the same picture as torchvision's resize, centre crop, rotate and flip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from project.data.transforms import RandomResizeRotateFlip, linear_grid, pil_to_chw, resize_rotate_flip


def smooth_image(width: int, height: int) -> Image.Image:
    """Gradients and a few blocks: every pixel differs from its mirror and its rotations."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rgb = np.stack([255 * x / width, 255 * y / height, 127 + 60 * np.sin(x / 17) * np.cos(y / 23)], axis=-1)
    rgb[height // 5 : height // 3, width // 6 : width // 2] = (250, 30, 30)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def reference(image: Image.Image, size: int, angle: float, flip: bool) -> torch.Tensor:
    x = TF.center_crop(TF.resize(TF.pil_to_tensor(image), size, antialias=True), size)
    x = TF.rotate(x, angle, interpolation=v2.InterpolationMode.BILINEAR)
    return TF.horizontal_flip(x) if flip else x


@pytest.mark.parametrize(("angle", "flip"), [(0.0, False), (23.0, False), (-17.5, True), (90.0, True)])
@pytest.mark.parametrize("source", [(300, 240), (960, 1280)])  # a mild downscale, and one box-reduced first
def test_one_resampling_matches_resize_crop_rotate_flip(angle, flip, source):
    image, size = smooth_image(*source), 96
    ours = resize_rotate_flip(pil_to_chw(image), size, angle, flip)
    expected = reference(image, size, angle, flip)
    inner = slice(size // 4, 3 * size // 4)  # away from the zero-filled corners, whose edges differ by a pixel
    difference = (ours[:, inner, inner].float() - expected[:, inner, inner].float()).abs().mean()
    assert ours.shape == expected.shape == (3, size, size)
    assert difference < 3.0  # grey levels; a wrong angle, direction or flip gives tens
    if angle or flip:  # and the augmentation is not the plain resize
        assert (ours.float() - reference(image, size, 0.0, False).float()).abs().mean() > 10


def test_random_angles_and_flips_follow_the_requested_distribution():
    torch.manual_seed(0)
    image = smooth_image(64, 64)
    augment = RandomResizeRotateFlip(64, rotation=30.0, hflip=True)
    outputs = torch.stack([augment(image) for _ in range(400)]).float()
    block = (outputs[:, 0] > 200) & (outputs[:, 2] < 50)  # the red block's pixels: nothing else is red and not blue
    red_right = block[:, :, 32:].sum((1, 2)) > block[:, :, :32].sum((1, 2))
    assert 0.4 < red_right.float().mean() < 0.6  # flipped about half the time
    corners = (outputs.sum(1)[:, :4, :4] == 0).float().mean((1, 2))  # black fill appears with |angle| > 0
    assert 0.5 < (corners > 0).float().mean() < 1.0  # most draws rotate visibly; not every one
    torch.manual_seed(1)
    first = augment(image)
    torch.manual_seed(1)
    assert torch.equal(first, augment(image))  # torch's RNG: seeded per worker by seed_everything(workers=True)


def test_a_much_larger_image_is_not_aliased():
    checkerboard = (np.indices((1000, 1000)).sum(0) % 2 * 255).astype(np.uint8)  # 1-pixel squares: grey when shrunk
    image = Image.fromarray(np.stack([checkerboard] * 3, axis=-1))
    ours = resize_rotate_flip(pil_to_chw(image), 96, 0.0, False).double()
    assert abs(ours.mean() - 127.5) < 10 and ours.std() < 10  # bilinear taps every 10.4 pixels would not be


def test_a_tensor_and_a_pil_image_give_the_same_augmentation():
    image = smooth_image(120, 90)
    chw = pil_to_chw(image).contiguous()  # a cached image's layout, not the PIL image's channels-last one
    torch.manual_seed(3)
    from_pil = RandomResizeRotateFlip(64, rotation=30.0, hflip=True)(image)
    torch.manual_seed(3)
    assert torch.equal(from_pil, RandomResizeRotateFlip(64, rotation=30.0, hflip=True)(chw))


def test_linear_grid_samples_where_torch_affine_grid_does():
    a, b, d, e = 0.9, -0.3, 0.25, 0.8
    expected = torch.nn.functional.affine_grid(
        torch.tensor([[[a, b, 0.0], [d, e, 0.0]]]), [1, 3, 7, 7], align_corners=False
    )
    torch.testing.assert_close(linear_grid(a, b, d, e, 7), expected)
