"""The built-in dataset: coloured shapes on noisy backgrounds, drawn offline and deterministically.

Written as real JPEG files in ImageFolder layout (`train/`, `val/`, `test/`, one folder per class) so decoding
costs what it costs on real data. Eight classes (chance = 0.125); a small CNN learns it to >= 0.90 val accuracy
in 3 epochs on 2 CPU cores. The same generator writes 300 px and 1024 px sets for the data-feeding experiments.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

SHAPES = ("bar", "circle", "crescent", "cross", "ring", "square", "star", "triangle")
SPLITS = {"train": 1000, "val": 100, "test": 100}  # images per class; 9,600 files in all
GENERATOR_VERSION = 1  # bump when drawing changes, so old folders are regenerated


def _outline(shape: str, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of radius `r` centred on the origin."""
    if shape == "triangle":
        return [(r * math.cos(a), r * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 4)[:3]]
    if shape in ("square", "bar"):  # rectangles of half-width w and half-height h
        w, h = (r * 0.75, r * 0.75) if shape == "square" else (r, r * 0.28)
        return [(-w, -h), (w, -h), (w, h), (-w, h)]
    if shape == "star":  # 10 vertices alternating between radius r and 0.42 r
        radii = [r if k % 2 == 0 else r * 0.42 for k in range(10)]
        return [(q * math.cos(k * math.pi / 5), q * math.sin(k * math.pi / 5)) for k, q in enumerate(radii)]
    if shape == "cross":
        b = r * 0.3
        arm = [(-b, -r), (b, -r), (b, -b)]  # the other three arms: this one turned by 90, 180 and 270 degrees
        return arm + [(-y, x) for x, y in arm] + [(-x, -y) for x, y in arm] + [(y, -x) for x, y in arm]
    raise ValueError(shape)


def draw_shape(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One `size` x `size` RGB image of `shape` at a random place, scale, angle and colour."""
    # background: a random colour, a linear gradient and pixel noise, so no class is told by its pixels' mean
    base = rng.uniform(0, 255, 3)
    ramp = np.linspace(-0.5, 0.5, size)[None, :, None] * rng.uniform(-60, 60, 3)
    noise = rng.normal(0, rng.uniform(5, 25), (size, size, 3))
    image = Image.fromarray(np.clip(base + ramp + noise, 0, 255).astype(np.uint8), "RGB")
    colour = tuple(int(c) for c in (base + rng.choice([-1, 1], 3) * rng.uniform(90, 160, 3)) % 256)
    r = size * rng.uniform(0.18, 0.34)
    cx, cy = rng.uniform(r, size - r, 2)
    angle = rng.uniform(0, 2 * math.pi)
    draw = ImageDraw.Draw(image)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r * 0.3)))
    elif shape == "crescent":
        # a disc minus an overlapping disc, cut through a mask so the background noise shows through
        mask = Image.new("L", image.size, 0)
        mask_draw = ImageDraw.Draw(mask)
        mask_draw.ellipse(box, fill=255)
        dx, dy = 0.55 * r * math.cos(angle), 0.55 * r * math.sin(angle)
        mask_draw.ellipse((cx - r + dx, cy - r + dy, cx + r + dx, cy + r + dy), fill=0)
        image.paste(colour, mask=mask)
    else:
        cos, sin = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in _outline(shape, r)], fill=colour)
    return image


def generate_shapes(
    root: str | Path,
    image_size: int = 64,
    per_class: dict[str, int] | None = None,
    seed: int = 0,
    fmt: str = "jpg",
    progress: bool = True,
) -> Path:
    """Write the shapes dataset to `root` unless an identical one is already there; return `root`.

    Written to a temporary sibling folder, then renamed, so an interrupted run never leaves one that looks complete.
    """
    root = Path(root)
    per_class = dict(per_class or SPLITS)
    manifest = {"version": GENERATOR_VERSION, "image_size": image_size, "per_class": per_class, "seed": seed}
    manifest.update(format=fmt, classes=list(SHAPES))
    manifest_path = root / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest:
        return root

    # a private temporary folder: several processes (e.g. DDP ranks under torchrun) may generate at once
    tmp = root.with_name(f"{root.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    ext, options = ("png", {}) if fmt == "png" else ("jpg", {"quality": 90})
    total = sum(per_class.values()) * len(SHAPES)
    bar = tqdm(total=total, desc=f"generating shapes dataset in {root}", unit="img", disable=not progress)
    for split_index, (split, count) in enumerate(per_class.items()):
        for class_index, shape in enumerate(SHAPES):
            folder = tmp / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                # one stream per image: the same file whatever the order or the split sizes
                image = draw_shape(shape, image_size, np.random.default_rng([seed, split_index, class_index, i]))
                image.save(folder / f"{i:05d}.{ext}", **options)
                bar.update()
    bar.close()
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest:
        shutil.rmtree(tmp)  # another process finished first
    else:
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    return root
