"""Shared fixtures: tiny generated datasets, so tests are offline and fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from project.data import generate_shapes

TINY_SPLITS = {"train": 40, "val": 10, "test": 10}


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in shapes dataset at 32 px with 40/10/10 images per class (train/val/test)."""
    root = tmp_path_factory.mktemp("shapes") / "shapes32"
    return generate_shapes(root, image_size=32, per_class=TINY_SPLITS, progress=False)


def write_image(path: Path, size: tuple[int, int] = (20, 16), mode: str = "RGB", seed: int = 0) -> Path:
    """Write a random image of `mode` to `path` (format from the suffix)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array, "RGB").convert(mode).save(path)
    return path
