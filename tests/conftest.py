"""Shared fixtures: tiny generated datasets, so tests are offline and fast."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from project.data import generate_shapes

TINY_SPLITS = {"train": 40, "val": 10, "test": 10}
ROOT = Path(__file__).resolve().parents[1]


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


def load_script(name: str) -> ModuleType:
    """`scripts/<name>.py` as a module, so tests call its `main(argv)` in-process."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_exit_code(argv: list[str]) -> int:
    """`scripts/train.py`'s exit code for `argv`, whether `main` returns it or the parser exits with it."""
    try:
        return load_script("train").main(argv)
    except SystemExit as stop:
        return stop.code
