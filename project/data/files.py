"""Unlabelled image files for prediction: find them under files and folders, load them one by one."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from project.data.folder import IMG_EXTENSIONS, SampleList, is_hidden, load_image


def list_images(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Image files named by `inputs` (files, or folders walked recursively), in a stable order."""
    found: list[str] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            for dirpath, dirnames, filenames in sorted(os.walk(item, followlinks=True)):
                dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
                found += [
                    os.path.join(dirpath, f)
                    for f in sorted(filenames)
                    if not is_hidden(f) and f.lower().endswith(IMG_EXTENSIONS)
                ]
        elif item.is_file():
            found.append(str(item))
        else:
            raise FileNotFoundError(f"no such file or folder: {str(item)!r}")
    return found


class ImageFileDataset(torch.utils.data.Dataset):
    """Unlabelled images by path, for prediction: item `i` is `(image, i)` so outputs map back to paths."""

    def __init__(self, paths: Sequence[str], transform: Callable | None = None,
                 decode_min_size: int | None = None) -> None:
        self.samples = SampleList(paths, [-1] * len(paths))
        self.transform = transform
        self.decode_min_size = decode_min_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = load_image(self.samples.path(index), self.decode_min_size)
        if self.transform is not None:
            image = self.transform(image)
        return image, index
